"""kill -9 under a create load: nothing acknowledged is lost, and retries with the same
request_id never duplicate a payment, on both backends."""

from __future__ import annotations

import threading
import time

import grpc

from server.infra import storage
from server.infra.storage import Payment
from tests.conftest import ALICE
from tests.faults.conftest import create_request, payment_stub
from tests.support.stack import Server, server_env

CLIENTS = 6
ACKS_BEFORE_KILL = 40


def test_kill_9_loses_no_acknowledged_create_and_retries_do_not_duplicate(settings, work, token_for):
    env = server_env(work, PAYMENTS_DATA_DIR=str(settings.data_dir))
    if settings.database_url:
        env["DATABASE_URL"] = settings.database_url
    server = Server.start(work, env)
    md = (("authorization", f"Bearer {token_for(ALICE)}"),)
    channel, stub = payment_stub(f"127.0.0.1:{server.port}")
    attempted: list[str] = []
    acked: dict[str, str] = {}  # request_id -> payment id the client was told about
    lock, stop = threading.Lock(), threading.Event()

    def client(n: int):
        seq = 0
        while not stop.is_set():
            seq += 1
            request_id = f"crash-{n}-{seq}"
            with lock:
                attempted.append(request_id)
            try:
                created = stub.CreatePayment(create_request(ALICE.email, request_id), metadata=md, timeout=10)
            except grpc.RpcError:
                time.sleep(0.05)  # outcome unknown: retried after the restart
                continue
            with lock:
                acked[request_id] = created.id

    clients = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    try:
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < ACKS_BEFORE_KILL and time.monotonic() < deadline and server.proc.poll() is None:
            time.sleep(0.01)
        assert len(acked) >= ACKS_BEFORE_KILL, f"only {len(acked)} creates before the deadline"
        server.proc.kill()  # SIGKILL: no drain, no commit of anything in flight
        server.proc.wait(timeout=10)
    finally:
        stop.set()
        for t in clients:
            t.join(15)
        channel.close()
    assert server.proc.returncode == -9

    restarted = Server.start(work, env)
    try:
        channel, stub = payment_stub(f"127.0.0.1:{restarted.port}")
        with channel:
            # Every acknowledged create survived the crash.
            db = storage.open_database(settings)
            try:
                stored = {p.request_id: p.id for p in Payment.select().where(Payment.created_by == ALICE.subject)}
            finally:
                db.close()
            missing = {rid for rid in acked if stored.get(rid) != acked[rid]}
            assert not missing, f"acknowledged creates lost or changed: {sorted(missing)[:5]}"

            # Every client retries everything it sent (acknowledged or not) with the same request_id.
            for request_id in attempted:
                again = stub.CreatePayment(create_request(ALICE.email, request_id), metadata=md, timeout=10)
                if request_id in acked:
                    assert again.id == acked[request_id], request_id

        db = storage.open_database(settings)
        try:
            rows = list(Payment.select(Payment.request_id).where(Payment.created_by == ALICE.subject))
        finally:
            db.close()
        per_request = {}
        for row in rows:
            per_request[row.request_id] = per_request.get(row.request_id, 0) + 1
        assert set(per_request) == set(attempted)
        assert all(count == 1 for count in per_request.values()), "a retry created a duplicate"
    finally:
        restarted.stop()
