"""One clock for every replica (server/infra/clock.py): on PostgreSQL the database's time, read
every few seconds and carried forward with the monotonic clock, so a replica whose wall clock runs
ahead (or steps back) decides expiry, the confirm window, job ticks and leases as the others do."""

from __future__ import annotations

import datetime as dt

import pytest

from server.domain.payments import PaymentDraft, PaymentRules
from server.domain.paging import PageTokens
from server.infra import clock as clocks
from server.infra import storage
from tests.conftest import ALICE

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


class Fake:
    def __init__(self):
        self.mono, self.db, self.reads, self.fail = 100.0, T0, 0, False

    def monotonic(self) -> float:
        return self.mono

    def read(self) -> dt.datetime:
        self.reads += 1
        if self.fail:
            raise OSError("the database is away")
        return self.db


def test_the_database_is_read_once_per_refresh_and_carried_forward_between():
    f = Fake()
    clock = clocks.DatabaseClock(f.read, refresh_seconds=10, monotonic=f.monotonic)
    assert clock() == T0 and f.reads == 1
    f.mono += 4
    f.db += dt.timedelta(seconds=4)
    assert clock() == T0 + dt.timedelta(seconds=4) and f.reads == 1  # carried by the monotonic clock
    f.mono += 6
    f.db += dt.timedelta(seconds=6, milliseconds=3)  # the database's own clock: 3 ms more
    assert clock() == T0 + dt.timedelta(seconds=10, milliseconds=3) and f.reads == 2  # read again


def test_a_database_that_cannot_be_read_leaves_the_last_reading_carried_forward():
    f = Fake()
    clock = clocks.DatabaseClock(f.read, refresh_seconds=10, monotonic=f.monotonic,
                                 fallback=lambda: dt.datetime(1999, 1, 1, tzinfo=dt.UTC))
    f.fail = True
    assert clock() == dt.datetime(1999, 1, 1, tzinfo=dt.UTC)  # nothing read yet: the wall clock stands in
    f.fail = False
    assert clock() == T0
    f.fail, f.mono = True, f.mono + 30
    assert clock() == T0 + dt.timedelta(seconds=30)  # a failed refresh: the last reading, carried


@pytest.mark.parametrize("backend", ["postgres"])  # SQLite is one host's file: its replicas share that host's clock
def test_a_replica_whose_wall_clock_runs_an_hour_ahead_expires_nothing_early(database, backend, monkeypatch):
    honest = clocks.for_database(database)
    monkeypatch.setattr(clocks, "wall", lambda: dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    ahead = clocks.for_database(database)  # a replica on a host whose wall clock is an hour fast
    (db_now,) = database.execute_sql("SELECT statement_timestamp()").fetchone()
    assert abs((ahead() - db_now.replace(tzinfo=dt.UTC)).total_seconds()) < 0.5
    rules = {name: PaymentRules(page_tokens=PageTokens(b"k" * 16), payment_ttl=dt.timedelta(minutes=30),
                                queries=storage.PaymentQueries(), clock=c) for name, c in (("honest", honest), ("ahead", ahead))}
    made = rules["honest"].create(ALICE, PaymentDraft(email=ALICE.email, amount=100))
    assert rules["ahead"].expire_due(rules["ahead"].clock()) == 0
    assert rules["ahead"].confirm(type(ALICE)(subject="usr_admin", email="admin@example.com", role="admin"),
                                  made.id).status == "success"


def test_the_servers_session_check_decides_expiry_by_the_assemblys_clock(settings, monkeypatch):
    """A session ends when the one clock (the database's time on PostgreSQL) says its end has come,
    in the session check of every process as in a refresh: the check is handed the assembly's
    clock, not its host's wall clock. The test moves that clock past the session's end (and back)."""
    import dataclasses

    import grpc

    from server.edge import app
    from server.edge.pb import payments_pb2 as pb
    from server.edge.pb import payments_pb2_grpc as pb_grpc
    from tests.conftest import Clock, rich_status

    moved = Clock(dt.datetime.now(dt.UTC))
    monkeypatch.setattr(clocks, "for_database", lambda database: moved)
    settings = dataclasses.replace(settings, refresh_ttl_seconds=3600, revocation_check_seconds=0.0)
    running = app.build(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            auth, payments = pb_grpc.AuthServiceStub(channel), pb_grpc.PaymentServiceStub(channel)
            auth.Register(pb.RegisterRequest(email="clock@example.com", password="a long password"))
            login = auth.Login(pb.LoginRequest(email="clock@example.com", password="a long password"))
            metadata = (("authorization", f"Bearer {login.access_token}"),)
            moved.advance(seconds=3590)
            payments.ListPayments(pb.ListPaymentsRequest(), metadata=metadata)  # ten seconds left
            moved.advance(seconds=-7200)  # stepped back: still live
            payments.ListPayments(pb.ListPaymentsRequest(), metadata=metadata)
            moved.advance(seconds=7211)  # one second past its end, by the one clock (the host's is an hour short)
            with pytest.raises(grpc.RpcError) as e:
                payments.ListPayments(pb.ListPaymentsRequest(), metadata=metadata)
            assert rich_status(e.value)[1].reason == "TOKEN_REVOKED" and "expired" in e.value.details()
    finally:
        running.stop(grace=0.5)
