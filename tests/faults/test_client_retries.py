"""The Python client's retry argument against the real server behind the real Envoy: a create
whose answer is lost after the server has made the payment is retried with the same request_id,
and the retry gets that payment back; never a second one. On SQLite and PostgreSQL.

A TCP proxy on loopback sits between the client and Envoy. On its first connection it passes the
handshake both ways and the client's bytes on, and from the request's first frame drops every byte
coming back, until the test has seen the payment in the server (an admin's list over REST) and
cuts that connection: the client sees UNAVAILABLE for a call
the server carried out, which is the case the request_id exists for. Later connections pass through.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest

from tests.conftest import own_pg_database
from tests.e2e.conftest import PASSWORD, new_email
from tests.support.python_client import import_from, shared_copy
from tests.support.rest import Client, loopback_address
from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD, running_stack


class H2Frames:
    """Reads the client's side of an HTTP/2 connection (preface, then frames) just enough to tell
    when a request begins: the first HEADERS frame (type 1) on a stream. Until then the handshake
    (SETTINGS both ways) passes, which gRPC waits for before it sends a call."""

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self):
        self.buffer = b""
        self.preface_left = len(self.PREFACE)

    def request_started(self, data: bytes) -> bool:
        self.buffer += data
        if self.preface_left:
            taken = min(self.preface_left, len(self.buffer))
            self.buffer, self.preface_left = self.buffer[taken:], self.preface_left - taken
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            kind, stream = self.buffer[3], int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            if kind == 1 and stream:
                return True
            if len(self.buffer) < 9 + length:
                break
            self.buffer = self.buffer[9 + length:]
        return False


class LosingProxy:
    """Forwards 127.0.0.1:<port> to `upstream`; the first connection's answers are lost."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.losing = threading.Event()
        self.connections = 0
        self.sent_upstream_on_first = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            first = self.connections == 0
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server, first, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, first, False), daemon=True).start()
            if first:
                threading.Thread(target=self._cut_later, args=(client, server), daemon=True).start()

    def _pump(self, source, sink, first: bool, upward: bool):
        frames = H2Frames() if first and upward else None
        try:
            while data := source.recv(65536):
                if frames is not None:
                    self.sent_upstream_on_first += len(data)
                    if frames.request_started(data):
                        self.losing.set()  # from here on, nothing comes back on this connection
                if upward or not (first and self.losing.is_set()):
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)

    def _cut_later(self, client, server):
        self.cut.wait(60)
        for s in (client, server):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self):
        self.cut.set()
        self.listener.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def edge(request, tmp_path_factory, keys_dir):
    work = tmp_path_factory.mktemp(f"retries-{request.param}")
    with (contextlib.nullcontext("") if request.param == "sqlite"
          else own_pg_database(f"payments_test_{os.getpid()}_retries")) as url:
        with running_stack(work, keys_dir, database_url=url) as (_, envoy):
            yield envoy


def test_a_create_whose_answer_was_lost_is_retried_into_the_same_payment(edge, tmp_path_factory):
    pc = import_from(shared_copy(tmp_path_factory))
    api = Client(edge.url)
    admin = api.from_address(loopback_address()).post("/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    admin_token = admin.json["access_token"]
    made = api.post("/v1/clients", {"name": "checkout", "permissions": ["payments.create"]}, token=admin_token)
    assert made.status == 200, made.text
    buyer = new_email("retried")
    assert api.from_address(loopback_address()).post("/v1/auth/register", {"email": buyer, "password": PASSWORD}).status == 200
    # The token comes straight from Envoy, so the proxy's first connection carries only the create.
    with pc.PaymentsClient(f"127.0.0.1:{edge.port}", pc.ClientCredentials(made.json["client"]["id"], made.json["secret"])) as direct:
        token = direct.tokens.token()

    proxy = LosingProxy(edge.port)
    answers: list = []

    def checkout():
        with pc.PaymentsClient(f"127.0.0.1:{proxy.port}", pc.StaticToken(token), deadline=20) as client:
            try:
                answers.append(client.create_payment(buyer, 4200, request_id="order-lost-answer"))
            except pc.PaymentsError as error:
                answers.append(error)

    caller = threading.Thread(target=checkout)
    caller.start()
    try:
        deadline = time.monotonic() + 20  # the server makes the payment; its answer is being dropped
        while True:
            listed = api.get(f"/v1/payments?email={buyer}", token=admin_token).json.get("payments", [])
            if listed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [p["request_id"] for p in listed] == ["order-lost-answer"], (listed, proxy.sent_upstream_on_first)
        assert answers == []  # the client has not heard back
        proxy.cut.set()  # the connection breaks: UNAVAILABLE for a call the server carried out
        caller.join(30)
    finally:
        proxy.close()
    [payment] = answers
    assert not isinstance(payment, Exception), payment
    assert proxy.connections == 2  # the retry, on a new connection
    assert payment.id == listed[0]["id"] and payment.request_id == "order-lost-answer"
    after = api.get(f"/v1/payments?email={buyer}", token=admin_token).json["payments"]
    assert [p["id"] for p in after] == [payment.id]  # one payment, whatever the attempts
