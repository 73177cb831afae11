"""The disk under SQLite fills up while the server runs: writes fail with UNAVAILABLE (503 over
REST through Envoy), reason DATABASE_FULL and a message that says the disk is full; reads (and the
session check every call makes) keep working; once space is freed, writes succeed again without a
restart, and every payment acknowledged before, during or after is there, also after a restart.

The data directory is a 2 MiB tmpfs mounted for this test (root only: CI runs as root); a filler
file takes every free block, and deleting it is "the operator freed space".
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from server.infra import config, storage
from tests.conftest import ALICE, rich_status
from tests.faults.conftest import create_request, payment_stub
from tests.support.rest import Client, loopback_address
from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD, Envoy, Server, server_env

THREADS = 4
CAROL = ("carol@example.com", "carol's long password")


@pytest.fixture
def small_disk(work):
    """work/data on a 2 MiB tmpfs of its own, unmounted afterwards."""
    data = work / "data"
    data.mkdir()
    why = None
    if os.geteuid() != 0:
        why = "mounting a tmpfs needs root (CI runs the fault tests as root)"
    else:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(data)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            why = f"mount -t tmpfs is not permitted here: {done.stderr.strip()}"
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    try:
        yield data
    finally:
        if subprocess.run(["umount", str(data)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(data)], check=False)


def fill(disk: Path) -> Path:
    """Take every free block of `disk` with one file; returns the file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\xff" * size)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0
    return filler


def count_on_a_new_connection(env: dict[str, str]) -> int:
    """Payments counted through a connection opened now, as a server thread (re)opens one."""
    database = storage.make_database(config.load(env))
    database.connect()
    try:
        return database.execute_sql("SELECT count(*) FROM payments").fetchone()[0]
    finally:
        database.close()


def assert_full(error: grpc.RpcError) -> None:
    code, info, _ = rich_status(error)
    assert (code, info.reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_FULL"), (code, info.reason, error.details())
    assert "disk is full" in error.details(), error.details()


def assert_full_over_rest(r) -> None:
    assert r.status == 503, (r.status, r.text)
    code, reason, body = r.error()
    assert (code, reason) == (14, "DATABASE_FULL"), body
    assert "disk is full" in body["message"], body


def test_full_disk_refuses_writes_clearly_keeps_reads_and_heals_without_a_restart(small_disk, work, token_for):
    env = server_env(work, PAYMENTS_WORKER_THREADS=str(THREADS),
                     # the session check asks the database on (nearly) every call: it must keep working
                     PAYMENTS_REVOCATION_CHECK_SECONDS="0.05")
    server = Server.start(work, env)
    envoy = Envoy.start(work, server.port)
    api = Client(envoy.url).from_address(loopback_address())
    token = token_for(ALICE)
    md = (("authorization", f"Bearer {token}"),)
    channel, stub = payment_stub(f"127.0.0.1:{server.port}")
    acked: dict[str, int] = {}  # id -> amount of every create the server acknowledged

    def create(request_id: str, amount: int):
        made = stub.CreatePayment(create_request(ALICE.email, request_id, amount), metadata=md, timeout=10)
        acked[made.id] = made.amount
        return made

    def everything() -> dict[str, int]:
        seen, page_token = {}, ""
        while True:
            page = stub.ListPayments(pb.ListPaymentsRequest(page_size=100, page_token=page_token), metadata=md, timeout=10)
            seen.update({p.id: p.amount for p in page.payments})
            page_token = page.next_page_token
            if not page_token:
                return seen

    def read_on_every_thread() -> None:
        """Twice as many concurrent reads as worker threads, three times over: every thread's
        connection serves reads (and the session check) on the full disk."""
        ids = list(acked)
        for _ in range(3):
            calls = [stub.GetPayment.future(pb.GetPaymentRequest(id=ids[n % len(ids)]), metadata=md, timeout=10)
                     for n in range(THREADS * 2)]
            assert [c.result().id for c in calls] == [ids[n % len(ids)] for n in range(THREADS * 2)]
            time.sleep(0.06)  # past the session check's memory: the next calls ask the database

    try:
        r = api.post("/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        assert r.status == 200, r.text
        admin = r.json["access_token"]
        assert api.post("/v1/auth/register", {"email": CAROL[0], "password": CAROL[1]}).status == 200
        r = api.post("/v1/auth/login", {"email": CAROL[0], "password": CAROL[1]})
        assert r.status == 200, r.text
        carol, carol_refresh = r.json["access_token"], r.json["refresh_token"]
        for n in range(5):
            create(f"before-{n}", 1000 + n)

        filler = fill(small_disk)

        # Writes: the disk may still hold a frame or two of the WAL's tail; from the first refusal
        # on, every write is refused the same clear way.
        refused = []
        for n in range(40):
            try:
                create(f"full-{n}", 2000 + n)
            except grpc.RpcError as e:
                assert_full(e)
                refused.append((f"full-{n}", 2000 + n))
                break
        assert refused, "40 creates fitted on a full 2 MiB disk"
        for n in range(3):
            with pytest.raises(grpc.RpcError) as e:
                create(f"full-again-{n}", 3000 + n)
            assert_full(e.value)
            refused.append((f"full-again-{n}", 3000 + n))
        r = api.post("/v1/payments", {"email": ALICE.email, "amount": 4000, "currency": "IDR",
                                      "request_id": "full-rest"}, token=token)
        assert_full_over_rest(r)
        refused.append(("full-rest", 4000))

        # Reads keep working, on every worker thread, after the refusals above.
        read_on_every_thread()
        assert everything() == acked
        assert count_on_a_new_connection(env) == len(acked)  # opening one writes nothing
        first = next(iter(acked))
        assert [e.action for e in stub.ListPaymentEvents(pb.ListPaymentEventsRequest(payment_id=first),
                                                         metadata=md, timeout=10).events]
        r = api.get(f"/v1/payments/{first}", token=token)
        assert r.status == 200, r.text
        assert api.get("/v1/payments?page_size=100", token=token).status == 200

        # Logins: a wrong password is still told so (reading only); a right one has to store a
        # session, so it is refused with the same clear reason, never a generic error.
        r = api.post("/v1/auth/login", {"email": CAROL[0], "password": "not carol's password"})
        assert r.status == 401 and r.error()[1] == "BAD_CREDENTIALS", r.text
        r = api.post("/v1/auth/login", {"email": CAROL[0], "password": CAROL[1]})
        assert_full_over_rest(r)

        # Every other kind of write: the same clear refusal, never INTERNAL or a generic 5xx.
        ids = list(acked)
        for method, path, body, tok in [
            ("POST", f"/v1/payments/{ids[0]}:confirm", {}, admin),
            ("POST", f"/v1/payments/{ids[1]}:cancel", {}, token),
            ("DELETE", f"/v1/payments/{ids[2]}", None, token),
            ("POST", "/v1/auth/register", {"email": "dave@example.com", "password": "dave's long password"}, None),
            ("POST", "/v1/auth/refresh", {"refresh_token": carol_refresh}, None),
            ("POST", "/v1/auth/logout", {}, carol),
            ("POST", "/v1/webhookEndpoints", {"url": "https://hooks.example.com/payments",
                                              "event_types": ["*"], "enabled": True}, admin),
        ]:
            # Each from an address of its own: this one's login bucket at Envoy may be spent.
            assert_full_over_rest(api.from_address(loopback_address()).request(method, path, body, token=tok))
        # A write the rules refuse before touching the disk is refused for its own reason.
        r = api.post(f"/v1/payments/{ids[2]}:undelete", {}, token=admin)
        assert r.status == 400 and r.error()[0] == 9, r.text  # FAILED_PRECONDITION: not deleted
        read_on_every_thread()
        assert set(everything()) == set(acked)
        assert server.proc.poll() is None, "the server stays up on a full disk"

        filler.unlink()  # the operator frees space

        # Healed without a restart: the refused creates, retried with their request_ids, are made
        # once each; new creates and logins succeed, on every worker thread.
        for request_id, amount in refused:
            again = create(request_id, amount)
            assert create(request_id, amount).id == again.id  # a retry is a replay, not a second payment
        calls = [stub.CreatePayment.future(create_request(ALICE.email, f"after-{n}", 5000 + n), metadata=md, timeout=10)
                 for n in range(THREADS * 2)]
        for call in calls:
            made = call.result()
            acked[made.id] = made.amount
        r = api.from_address(loopback_address()).post("/v1/auth/login", {"email": CAROL[0], "password": CAROL[1]})
        assert r.status == 200, r.text
        read_on_every_thread()
        assert everything() == acked

        # Nothing acknowledged is lost, across a restart either.
        channel.close()
        envoy.stop()
        server.stop()
        server = Server.start(work, env)
        channel, stub = payment_stub(f"127.0.0.1:{server.port}")
        assert everything() == acked
    finally:
        channel.close()
        envoy.stop()
        server.stop()
