"""Run the shop: `python -m shop --payments 127.0.0.1:8080 --listen 127.0.0.1:8090` from
clients/python, with PAYMENTS_CLIENT_ID, PAYMENTS_CLIENT_SECRET (a service client's, holding
payments.create and payments.read) and SHOP_WEBHOOK_SECRET (the whsec_ secret of the webhook
endpoint registered for http://<listen>/hooks/payments) in the environment.

HTTP: POST /orders {"email": ..., "amount": <int>} answers the order (201); GET /orders/<id> the
order; POST /hooks/payments takes the service's deliveries. One JSON line per event on stdout,
the first {"event": "listening", "url": ...}."""

from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import os
import sys

from payments_client import ClientCredentials, PaymentsClient
from shop.app import Shop


def say(record: dict) -> None:
    print(json.dumps(record), flush=True)


def handler_for(shop: Shop):
    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict | None = None) -> None:
            data = json.dumps(body or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def do_POST(self):  # noqa: N802
            if self.path == "/hooks/payments":
                return self._answer(shop.webhook(dict(self.headers.items()), self._body()))
            if self.path != "/orders":
                return self._answer(404)
            try:
                asked = json.loads(self._body())
                email, amount = str(asked["email"]), asked["amount"]
                if isinstance(amount, bool) or not isinstance(amount, int):
                    raise ValueError("amount is an integer")
            except (ValueError, KeyError, TypeError) as error:
                return self._answer(400, {"error": str(error)})
            return self._answer(201, dataclasses.asdict(shop.checkout(email, amount)))

        def do_GET(self):  # noqa: N802
            order = shop.orders.get(self.path.removeprefix("/orders/"))
            return self._answer(200, dataclasses.asdict(order)) if order else self._answer(404)

        def log_message(self, *args):
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shop", description=__doc__.splitlines()[0])
    parser.add_argument("--payments", default="127.0.0.1:8080", help="Envoy's host:port (native gRPC)")
    parser.add_argument("--listen", default="127.0.0.1:8090", help="host:port the shop serves on (port 0: any)")
    parser.add_argument("--scope", default="payments.create payments.read")
    args = parser.parse_args(argv)
    tokens = ClientCredentials(os.environ["PAYMENTS_CLIENT_ID"], os.environ["PAYMENTS_CLIENT_SECRET"], scope=args.scope)
    host, _, port = args.listen.rpartition(":")
    with PaymentsClient(args.payments, tokens) as payments:
        shop = Shop(payments, os.environ["SHOP_WEBHOOK_SECRET"], say)
        server = http.server.ThreadingHTTPServer((host, int(port)), handler_for(shop))
        say({"event": "listening", "url": f"http://{host}:{server.server_address[1]}"})
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
