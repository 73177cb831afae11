"""A merchant's webhook receiver on loopback, for the tests and the webhook benchmark: a real HTTP server that checks every
delivery three times, independently: Payments-Signature with the code the README gives merchants
(taken from the README itself, so the snippet is tested) and with Stripe's own library (`stripe`,
pinned in requirements.lock), and the Standard Webhooks headers with that project's reference
library (`standardwebhooks`). It deduplicates by event id as the README says, and can be taken down
and brought back on the same port.
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import sys
import threading
import time
from pathlib import Path

import standardwebhooks
import stripe

ROOT = Path(__file__).resolve().parent.parent
# A server that delivers fast, for tests: its job every second, loopback receivers allowed (the
# development setting), retries after 0.2 s doubling to at most 1 s, a 2-second deadline an attempt.
FAST_WEBHOOKS = {
    "PAYMENTS_JOBS_ENABLED": "true",
    "PAYMENTS_WEBHOOK_INTERVAL_SECONDS": "1",
    "PAYMENTS_WEBHOOK_ALLOW_LOOPBACK": "true",
    "PAYMENTS_WEBHOOK_TIMEOUT_SECONDS": "2",
    "PAYMENTS_WEBHOOK_RETRY_BASE_SECONDS": "0.2",
    "PAYMENTS_WEBHOOK_RETRY_MAX_DELAY_SECONDS": "1",
}


def readme_block(first_line: str) -> dict:
    """What the README's Python block beginning with `first_line` defines, executed from its text."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(" + re.escape(first_line) + r".*?)```", text, re.S)
    assert block, f"README.md has no Python block beginning {first_line!r}"
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    return scope


def readme_verifier():
    """The README's `verify(secret, header, body)` (the one without a library), executed from its text."""
    scope = readme_block("# verify a webhook")
    return scope["verify"], scope


def standard_verifies(secret: str, headers: dict, body: bytes) -> bool:
    """Standard Webhooks' reference library on webhook-id, webhook-timestamp and webhook-signature."""
    try:
        standardwebhooks.Webhook(secret).verify(body, headers, json_parse=False)
        return True
    except standardwebhooks.WebhookVerificationError:
        return False


def stripe_verifies(secret: str, header: str | None, body: bytes) -> bool:
    """Stripe's library on the value of Payments-Signature (its Stripe-Signature scheme)."""
    try:
        return stripe.WebhookSignature.verify_header(body, header, secret, tolerance=300)
    except stripe.SignatureVerificationError:
        return False


class _Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that hung up mid-answer (the sender's deadline, a killed server) is expected here."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Receiver:
    """Deliveries arrive at `url`; `events` are the verified, first-seen ones in arrival order,
    `arrivals` every whole POST (duplicates included), `bad` those that any of the three verifiers
    refused (each with the names of those that did, under "refused"), `incomplete` how many were cut
    off before their body ended. `standard_secret`, when set, is what the Standard Webhooks library
    is given instead of `secret` (an endpoint's secret from before Standard Webhooks, in the standard
    alphabet as docs/webhooks.md says)."""

    def __init__(self, secret: str = "", port: int = 0, status: int = 200):
        self.secret = secret
        self.standard_secret = ""
        self.status = status  # what it answers
        self.reply_headers: dict[str, str] = {}  # sent with every answer (e.g. Retry-After)
        self.delay = 0.0  # seconds before answering
        self.events: list[dict] = []
        self.arrivals: list[dict] = []
        self.bad: list[dict] = []
        self.incomplete = 0  # requests cut off before their body ended
        self.seen: set[str] = set()
        self.lock = threading.Lock()
        self.verify, _ = readme_verifier()
        self._port = port
        self._server: http.server.ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/payments"

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                if len(body) < length:  # the sender went away mid-request (a killed server): not a delivery
                    with receiver.lock:
                        receiver.incomplete += 1
                    return
                if receiver.delay:
                    time.sleep(receiver.delay)
                headers = {k.lower(): v for k, v in self.headers.items()}
                entry = {"headers": headers, "body": body, "path": self.path, "at": time.time()}
                refused = receiver.refused(headers, body)
                ok = not refused
                with receiver.lock:
                    receiver.arrivals.append(entry)
                    if not ok:
                        receiver.bad.append({**entry, "refused": refused})
                    elif receiver.status < 300:
                        event = json.loads(body)
                        if event["id"] not in receiver.seen:  # deduplicate by event id, as the README says
                            receiver.seen.add(event["id"])
                            receiver.events.append(event)
                self.send_response(receiver.status if ok else 400)
                for name, value in receiver.reply_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        server = _Quiet(("127.0.0.1", self._port), Handler)
        server.daemon_threads = True
        self._port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def refused(self, headers: dict, body: bytes) -> list[str]:
        """Which verifiers refuse this delivery: none when all three accept it."""
        secret = self.secret
        if not secret:
            return ["no secret"]
        checks = {"readme": lambda: self.verify(secret, headers.get("payments-signature", ""), body),
                  "stripe": lambda: stripe_verifies(secret, headers.get("payments-signature"), body),
                  "standardwebhooks": lambda: standard_verifies(self.standard_secret or secret, headers, body)}
        return [name for name, check in checks.items() if not check()]

    @property
    def port(self) -> int:
        return self._port

    def stop(self) -> None:
        """Down: nothing listens on the port (connections are refused)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "deliveries"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(self):
                    return
            time.sleep(0.05)
        with self.lock:
            raise AssertionError(f"timed out waiting for {what}: {len(self.events)} events, "
                                 f"{len(self.arrivals)} arrivals, {len(self.bad)} bad")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
