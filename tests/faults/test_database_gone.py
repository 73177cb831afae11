"""PostgreSQL goes away while the server runs: calls fail UNAVAILABLE (503 over REST through
Envoy) with a clear message, the process stays up, and it recovers by itself, without a
restart, once the database is back.

The database is a private instance (tests/support/private_pg.py): stopping the cluster the
other suites share would break them.
"""

from __future__ import annotations

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from tests.conftest import ALICE, rich_status
from tests.support.rest import Client
from tests.faults.conftest import create_request, payment_stub
from tests.support.private_pg import PrivatePostgres
from tests.support.stack import Envoy, Server, server_env

THREADS = 4


def burst(stub, payment_id: str, md) -> None:
    """Twice as many concurrent GetPayment calls as worker threads; all must succeed."""
    calls = [stub.GetPayment.future(pb.GetPaymentRequest(id=payment_id), metadata=md, timeout=15)
             for _ in range(THREADS * 2)]
    for call in calls:
        assert call.result().id == payment_id


@pytest.fixture
def private_pg():
    pg = PrivatePostgres()
    try:
        pg.start()
        pg.create_database()
        yield pg
    finally:
        pg.destroy()


def test_database_outage_is_unavailable_then_heals_without_a_restart(private_pg, work, token_for):
    server = Server.start(work, server_env(work, DATABASE_URL=private_pg.url, PAYMENTS_WORKER_THREADS=str(THREADS)))
    envoy = Envoy.start(work, server.port)
    token = token_for(ALICE)
    md = (("authorization", f"Bearer {token}"),)
    api = Client(envoy.url)
    channel, stub = payment_stub(f"127.0.0.1:{server.port}")
    try:
        first = stub.CreatePayment(create_request(ALICE.email, "before-outage"), metadata=md, timeout=10)
        # Concurrent calls put every worker thread to work, so each holds a connection.
        burst(stub, first.id, md)

        private_pg.stop("fast")

        # Two calls during the outage: fewer than the worker threads, so most threads still
        # hold a connection from before it.
        with pytest.raises(grpc.RpcError) as e:
            stub.CreatePayment(create_request(ALICE.email, "during-outage"), metadata=md, timeout=15)
        code, info, _ = rich_status(e.value)
        assert (code, info.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        assert "database is unavailable" in e.value.details()
        r = api.get(f"/v1/payments/{first.id}", token=token)
        assert r.status == 503
        assert r.error()[:2] == (14, "DATABASE_UNAVAILABLE")
        assert "database is unavailable" in r.json["message"]
        assert server.proc.poll() is None, "the server stays up without its database"

        private_pg.start()  # returns once PostgreSQL accepts connections

        # Healed by itself: every call from now on succeeds, on every worker thread (no stale
        # connection from before the outage is left to fail on).
        for _ in range(3):
            burst(stub, first.id, md)
        for n in range(THREADS):
            stub.CreatePayment(create_request(ALICE.email, f"after-{n}"), metadata=md, timeout=10)
        r = api.get(f"/v1/payments/{first.id}", token=token)
        assert r.status == 200, r.text
        assert server.proc.poll() is None
    finally:
        channel.close()
        envoy.stop()
        server.stop()
