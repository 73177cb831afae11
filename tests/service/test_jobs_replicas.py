"""Three server processes (`python -m server`) on one PostgreSQL database, with 1-second job
intervals: each tick of each job runs in exactly one of them, while all three contend for it.

The proof comes from the processes' own JSON logs: one "job run" line per (job, tick) across all
three logs, the same runs the job_runs table recorded, and skip lines showing the other replicas
tried the same ticks. The payments they create expire and are purged once, seen through any replica.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import peewee
from playhouse.db_url import parse as parse_db_url
import pytest

from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from server.infra import config
from tests.conftest import ALICE, ROOT, _reset_postgres, seed_accounts_into
from tests.support.jobs import wait_for

REPLICAS = 3
TICKS_WANTED = 5  # per job, all three replicas up


class Replica:
    def __init__(self, index: int, env: dict, log_path: Path):
        self.index, self.log_path = index, log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.port = 0

    def lines(self) -> list[dict]:
        entries = []
        for raw in self.log_path.read_text().splitlines():
            try:
                entries.append(json.loads(raw))
            except ValueError:
                entries.append({"message": raw})  # e.g. a traceback: kept, so the test can show it
        return entries

    def listening_port(self) -> int:
        if self.proc.poll() is not None:
            raise AssertionError(f"replica {self.index} exited: {self.log_path.read_text()[-2000:]}")
        for entry in self.lines():
            if entry.get("message") == "listening":
                self.port = entry["port"]
        return self.port

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def replicas(pg_session_url, keys_dir, tmp_path):
    _reset_postgres(pg_session_url)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PAYMENTS_", "DATABASE_URL"))},
        "DATABASE_URL": pg_session_url,
        "PAYMENTS_LISTEN_ADDR": "127.0.0.1:0",  # each process binds a free port and logs it
        "PAYMENTS_METRICS_ADDR": "127.0.0.1:0",  # and its metrics endpoint too
        "PAYMENTS_JWT_PRIVATE_KEY_FILE": str(keys_dir / "jwt-private.pem"),
        "PAYMENTS_JWKS_FILE": str(keys_dir / "jwks.json"),
        "PAYMENTS_PAGE_TOKEN_SECRET": "replicas-test-page-token-secret",
        "PAYMENTS_LOG_LEVEL": "DEBUG",  # skipped ticks log at DEBUG
        "PAYMENTS_JOBS_ENABLED": "true",
        "PAYMENTS_EXPIRE_INTERVAL_SECONDS": "1",
        "PAYMENTS_PURGE_INTERVAL_SECONDS": "1",
        "PAYMENTS_PAYMENT_TTL_SECONDS": "1",
        "PAYMENTS_DELETE_RETENTION_SECONDS": "0",
        "PAYMENTS_GRACE_SECONDS": "2",
        "PAYMENTS_DB_POOL_SIZE": "4",
    }
    started = []
    try:
        # All at once, on an empty database, as a first rollout does: they also take turns creating the schema.
        for i in range(REPLICAS):
            started.append(Replica(i, {**env, "PAYMENTS_DATA_DIR": str(tmp_path / f"data{i}")},
                                   tmp_path / f"replica{i}.log"))
        for r in started:
            wait_for(r.listening_port, timeout=30, what=f"replica {r.index} to listen")
        seed_accounts_into(config.load(env))  # the sessions behind token_for's tokens
        yield started
    finally:
        for r in started:
            r.stop()


def job_runs(url: str) -> list[tuple[str, str, str, str]]:
    params = parse_db_url(url)
    db = peewee.PostgresqlDatabase(params.pop("database"), **params)
    with db.connection_context():
        rows = db.execute_sql("SELECT job, tick_at, replica, outcome FROM job_runs").fetchall()
    return [(job, tick_at.strftime("%Y-%m-%dT%H:%M:%S+00:00"), replica, outcome) for job, tick_at, replica, outcome in rows]


@pytest.mark.parametrize("backend", ["postgres"])
def test_each_tick_runs_once_across_three_replicas(replicas, pg_session_url, token_for, backend):
    md = (("authorization", f"Bearer {token_for(ALICE)}"),)
    channels = [grpc.insecure_channel(f"127.0.0.1:{r.port}") for r in replicas]
    try:
        stubs = [pb_grpc.PaymentServiceStub(ch) for ch in channels]
        created = [s.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=ALICE.email, amount=100 + i)),
                                   metadata=md) for i, s in enumerate(stubs)]
        doomed = stubs[0].CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=ALICE.email, amount=9)),
                                        metadata=md)
        try:  # not pending any more, so the expiry job leaves it alone...
            stubs[0].CancelPayment(pb.CancelPaymentRequest(id=doomed.id), metadata=md)
        except grpc.RpcError as e:  # ...unless a tick expired it first (its TTL is one second)
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
        doomed_expired = stubs[2].GetPayment(pb.GetPaymentRequest(id=doomed.id),
                                             metadata=md).failure_reason == pb.Payment.EXPIRED
        stubs[1].DeletePayment(pb.DeletePaymentRequest(id=doomed.id), metadata=md)

        def read(i, p):  # through another replica than the one that created it
            return stubs[(i + 1) % REPLICAS].GetPayment(pb.GetPaymentRequest(id=p.id), metadata=md)

        wait_for(lambda: all(read(i, p).failure_reason == pb.Payment.EXPIRED for i, p in enumerate(created)),
                 timeout=30, what="every payment to expire")
        for i, p in enumerate(created):
            assert read(i, p).status == pb.Payment.FAILED

        def enough_ticks():
            done = Counter(job for job, _, _, outcome in job_runs(pg_session_url) if outcome == "ok")
            return done["expire"] >= TICKS_WANTED and done["purge"] >= TICKS_WANTED

        wait_for(enough_ticks, timeout=30, what=f"{TICKS_WANTED} ticks of each job")
    finally:
        for ch in channels:
            ch.close()
    exit_codes = [r.stop() for r in replicas]
    assert exit_codes == [0] * REPLICAS  # SIGTERM stops each cleanly, scheduler included

    logs = {r.index: r.lines() for r in replicas}
    scheduled = {i: [e for e in lines if e.get("message") == "jobs scheduled"] for i, lines in logs.items()}
    assert all(len(s) == 1 for s in scheduled.values()), scheduled
    replica_ids = {s[0]["replica"] for s in scheduled.values()}
    assert len(replica_ids) == REPLICAS

    # The webhook job runs in every replica (it claims deliveries, not ticks: test_webhooks_replicas.py)
    # and is not recorded in job_runs; every other job runs once per tick.
    runs = [(e["job"], e["tick_at"], e["replica"], e["outcome"])
            for lines in logs.values() for e in lines if e.get("message") == "job run" and e["job"] != "webhooks"]
    per_tick = Counter((job, tick) for job, tick, _, _ in runs)
    assert per_tick and max(per_tick.values()) == 1, [k for k, n in per_tick.items() if n > 1]
    failures = [e for lines in logs.values() for e in lines if e.get("message") == "job failed"]
    assert failures == []
    # The log lines and the job_runs records tell the same story, run for run.
    assert sorted(runs) == sorted(job_runs(pg_session_url))

    # All three contended: other replicas logged skipping ticks that one of them ran.
    attempts = defaultdict(set)
    for job, tick, replica, _ in runs:
        attempts[(job, tick)].add(replica)
    for lines in logs.values():
        for e in lines:
            if e.get("message") == "job skipped":
                attempts[(e["job"], e["tick_at"])].add(e["replica"])
    assert max(len(who) for who in attempts.values()) == REPLICAS
    assert {who for tick in attempts.values() for who in tick} == replica_ids

    # Each payment expired once: the rows all runs changed add up to the payments there were.
    assert sum(e["rows"] for lines in logs.values() for e in lines
               if e.get("message") == "job run" and e["job"] == "expire") == len(created) + doomed_expired
    assert sum(e["rows"] for lines in logs.values() for e in lines
               if e.get("message") == "job run" and e["job"] == "purge") == 1
