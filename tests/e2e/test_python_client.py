"""The Python client's example shop (clients/python/shop) against the real stack, as a Shopping
service would run it: its own process, the package's client-credentials token from TokenService,
native gRPC through the real Envoy, and the outcome learnt from the server's signed webhooks on a
loopback receiver (allowed here as in development: devstack/webhook_receiver.FAST_WEBHOOKS).

checkout -> the shop's client creates the payment (request_id = the order's id) -> a second client,
holding payments.confirm and payments.cancel, confirms it through the same package -> the shop
verifies payment.succeeded (Standard Webhooks headers) and marks the order paid; the same with a
cancelled payment failing the order; a payment the service refuses fails the checkout at once;
a delivery not signed with the endpoint's secret changes nothing. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import own_pg_database
from tests.e2e.conftest import new_email, registered
from tests.support.python_client import import_from, shared_copy
from tests.support.rest import Client, loopback_address
from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD, running_stack
from devstack.webhook_receiver import FAST_WEBHOOKS, free_port


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def shop_stack(request, tmp_path_factory, keys_dir):
    work = tmp_path_factory.mktemp(f"shop-{request.param}")
    if request.param == "sqlite":
        with running_stack(work, keys_dir, server_overrides=FAST_WEBHOOKS) as pair:
            yield pair
    else:
        with own_pg_database(f"payments_test_{os.getpid()}_shop") as url, \
                running_stack(work, keys_dir, database_url=url, server_overrides=FAST_WEBHOOKS) as pair:
            yield pair


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    return shared_copy(tmp_path_factory)


@pytest.fixture(scope="module")
def api(shop_stack) -> Client:
    return Client(shop_stack[1].url)


@pytest.fixture(scope="module")
def admin_token(api) -> str:
    login = api.from_address(loopback_address()).post("/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert login.status == 200, login.text
    return login.json["access_token"]


def new_client(api, admin_token: str, name: str, permissions: list[str]) -> tuple[str, str]:
    made = api.post("/v1/clients", {"name": name, "permissions": permissions}, token=admin_token)
    assert made.status == 200, made.text
    return made.json["client"]["id"], made.json["secret"]


class Shop:
    """The example as a subprocess: its JSON lines gathered by a thread, its HTTP port known."""

    def __init__(self, copy, target: str, client: tuple[str, str], webhook_secret: str, port: int):
        env = {**os.environ, "PAYMENTS_CLIENT_ID": client[0], "PAYMENTS_CLIENT_SECRET": client[1],
               "SHOP_WEBHOOK_SECRET": webhook_secret, "PYTHONPATH": str(copy)}
        self.process = subprocess.Popen([sys.executable, "-m", "shop", "--payments", target,
                                         "--listen", f"127.0.0.1:{port}"], cwd=copy, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue = queue.Queue()
        self.said: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()
        first = self.lines.get(timeout=30)
        assert first == {"event": "listening", "url": f"http://127.0.0.1:{port}"}, first
        self.url = first["url"]

    def _read(self):
        for line in self.process.stdout:
            record = json.loads(line)
            self.said.append(record)
            self.lines.put(record)

    def post(self, path: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json",
                                                                             **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def order(self, order_id: str) -> dict:
        with urllib.request.urlopen(f"{self.url}/orders/{order_id}", timeout=10) as answer:
            return json.loads(answer.read())

    def wait_for(self, order_id: str, status: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            order = self.order(order_id)
            if order["status"] == status:
                return order
            time.sleep(0.05)
        raise AssertionError(f"order {order_id} still {self.order(order_id)} after {timeout}s; said {self.said}")

    def wait_said(self, record: dict, timeout: float = 10) -> None:
        """The shop printed `record` (its lines are read by another thread)."""
        deadline = time.monotonic() + timeout
        while record not in self.said:
            assert time.monotonic() < deadline, f"the shop never said {record}: {self.said}"
            time.sleep(0.02)

    def stop(self) -> str:
        self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return err


@pytest.fixture(scope="module")
def shop(shop_stack, api, admin_token, copy):
    port = free_port()
    hook = api.post("/v1/webhookEndpoints", {"url": f"http://127.0.0.1:{port}/hooks/payments",
                                             "event_types": ["payment.succeeded", "payment.failed"],
                                             "enabled": True}, token=admin_token)
    assert hook.status == 200, hook.text
    client = new_client(api, admin_token, "shopping checkout", ["payments.create", "payments.read"])
    running = Shop(copy, f"127.0.0.1:{shop_stack[1].port}", client, hook.json["secret"], port)
    yield running
    stderr = running.stop()
    assert api.delete(f"/v1/webhookEndpoints/{hook.json['endpoint']['id']}", token=admin_token).status == 200
    assert "Traceback" not in stderr, stderr


@pytest.fixture(scope="module")
def back_office(shop_stack, api, admin_token, copy):
    """A second service client, through the same package: it settles payments (confirm, cancel)."""
    pc = import_from(copy)
    client_id, secret = new_client(api, admin_token, "back office", ["payments.confirm", "payments.cancel"])
    with pc.PaymentsClient(f"127.0.0.1:{shop_stack[1].port}", pc.ClientCredentials(client_id, secret)) as client:
        yield client


@pytest.fixture
def buyer(api) -> str:
    return registered(api, "buyer")


def test_a_confirmed_payment_marks_the_order_paid(shop, back_office, api, admin_token, buyer):
    status, order = shop.post("/orders", {"email": buyer, "amount": 150000})
    assert status == 201 and order["status"] == "awaiting_payment", order
    payment = api.get(f"/v1/payments/{order['payment_id']}", token=admin_token).json
    assert (payment["status"], payment["request_id"], payment["amount"], payment["email"]) == (
        "PENDING", order["id"], "150000", buyer)
    assert back_office.confirm_payment(order["payment_id"]).status == 2  # SUCCESS
    paid = shop.wait_for(order["id"], "paid")
    assert paid["failure"] == "" and paid["payment_id"] == order["payment_id"]
    shop.wait_said({"event": "order_paid", "order": order["id"], "payment": order["payment_id"]})


def test_a_cancelled_payment_fails_the_order(shop, back_office, buyer):
    status, order = shop.post("/orders", {"email": buyer, "amount": 99000})
    assert status == 201 and order["status"] == "awaiting_payment", order
    assert back_office.cancel_payment(order["payment_id"]).status == 3  # FAILED
    failed = shop.wait_for(order["id"], "failed")
    assert failed["failure"] == "CANCELLED"


def test_a_payment_the_service_refuses_fails_the_checkout_at_once_with_its_reason(shop):
    status, order = shop.post("/orders", {"email": new_email("nobody"), "amount": 1000})
    assert status == 201 and order["status"] == "failed" and order["payment_id"] == ""
    assert order["failure"] == "FAILED_PRECONDITION/NO_ACCOUNT", order


def test_a_delivery_not_signed_with_the_endpoints_secret_changes_nothing(shop, api, admin_token, buyer):
    status, order = shop.post("/orders", {"email": buyer, "amount": 5000})
    assert status == 201
    payment = api.get(f"/v1/payments/{order['payment_id']}", token=admin_token).json
    forged = json.dumps({"id": "evt_forged", "type": "payment.succeeded",
                         "payment": {**payment, "status": "SUCCESS"}}).encode()
    headers = {"webhook-id": "evt_forged", "webhook-timestamp": str(int(time.time())),
               "webhook-signature": "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}
    answer, _ = shop.post("/hooks/payments", forged, headers)
    assert answer == 400
    assert shop.order(order["id"])["status"] == "awaiting_payment"
    shop.wait_said({"event": "webhook_refused", "webhook_id": "evt_forged"})
