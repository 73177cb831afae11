"""The API under job churn: creates while the scheduled jobs drain a backlog, beside the same load
with the jobs off, on a database seeded like a busy deployment's (30% of the rows pending and
overdue, 20% deleted past retention).

For each backlog size (and each database): the server with jobs off, CreatePayment over gRPC in
OFF_WINDOWS windows of --seconds; then the server again with the jobs on (5 s ticks), the same load
in windows of --seconds until the backlog is gone from the database. Reported: throughput; the p99 of every
call with the jobs off and of every call during the churn (each pooled over its windows: what the
target is about), and the worst single window's p99 beside it (one window of ~30, the noisiest
number); errors; the drain time, whose growth with the backlog shows whether draining is linear.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
from pathlib import Path

import loadgen
import seed

from server.infra import config, storage

OVERDUE, DELETED = 0.3, 0.2
TICK_SECONDS = 5
OFF_WINDOWS = 3


@dataclasses.dataclass
class ChurnRow:
    target: str
    backlog: int
    off: loadgen.Result  # its p99_ms: every call of the OFF_WINDOWS windows
    on_rps: float
    on_p99_ms: float  # every call during the churn
    worst_window_p99_ms: float
    on_errors: int
    drain_seconds: float


def make_backlog(settings: config.Settings, rows: int, email: str) -> None:
    """Seed `rows` payments, then make OVERDUE of them pending past expires_at and DELETED of them
    failed and deleted 60 days ago (past the 30-day retention)."""
    seed.seed(settings, rows, email, share=0.1)
    seed.seed_callers(settings)
    database = storage.open_database(settings)
    long_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=60)
    with database.connection_context():
        ids = [r for (r,) in database.execute_sql("SELECT id FROM payments ORDER BY id").fetchall()]
        overdue, deleted = ids[:int(rows * OVERDUE)], ids[int(rows * OVERDUE):int(rows * (OVERDUE + DELETED))]
        with database.atomic():
            for start in range(0, len(overdue), 10_000):
                storage.Payment.update(status="pending", failure_reason=None, expires_at=long_ago).where(
                    storage.Payment.id.in_(overdue[start:start + 10_000])).execute()
            for start in range(0, len(deleted), 10_000):
                storage.Payment.update(status="failed", failure_reason="cancelled", deleted_at=long_ago).where(
                    storage.Payment.id.in_(deleted[start:start + 10_000])).execute()
        if storage.is_postgres(database):
            database.execute_sql("ANALYZE payments")
    database.close()


def backlog_left(settings: config.Settings) -> int:
    """Rows the jobs still have to take: pending past their expiry, or deleted past retention
    (make_backlog's are 60 days old; the server's retention here is 30)."""
    database = storage.open_database(settings)
    now = dt.datetime.now(dt.timezone.utc)
    with database.bind_ctx(storage.MODELS), database.connection_context():
        p = storage.Payment
        return p.select().where(((p.status == "pending") & (p.expires_at < now))
                                | (p.deleted_at < now - dt.timedelta(days=30))).count()


def drained(log: Path, settings: config.Settings) -> float | None:
    """Seconds from the start of the first job run that took rows to the end of the last one, once
    the backlog is gone; None before. (A run that finds nothing logs at DEBUG, which the server
    here does not write: the database says when the backlog is gone.)"""
    if backlog_left(settings):
        return None
    first = last = None
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("message") != "job run" or not entry.get("rows"):
            continue
        end = dt.datetime.fromisoformat(entry["time"]).timestamp()
        start = end - entry.get("duration_ms", 0) / 1000
        first = start if first is None else min(first, start)
        last = end if last is None else max(last, end)
    return None if first is None else last - first


def run(bench, label: str, rows: int, database_url_for) -> ChurnRow:
    """One backlog size on one database (database_url_for(name) gives a fresh URL, or '' for SQLite)."""
    from devstack.stack import Server

    name = f"churn-{label}-{rows}"
    url = database_url_for(name)
    data_dir = bench.work / f"data-{name}"
    settings = dataclasses.replace(config.Settings(), database_url=url, data_dir=data_dir)
    print(f"{label}: churn backlog of {rows:,} payments ...", flush=True)
    make_backlog(settings, rows, seed.CALLERS[0][1])
    env = bench.env(PAYMENTS_DATA_DIR=str(data_dir), PAYMENTS_PAGE_TOKEN_SECRET="bench-page-token-secret",
                    **({"DATABASE_URL": url} if url else {}))
    create = {"payment": {"email": seed.CALLERS[0][1], "amount": "1250", "currency": "IDR", "request_id": "{{.UUID}}"}}
    c, seconds = bench.args.concurrency, bench.args.seconds

    server = Server.start(bench.work, {**env, "PAYMENTS_JOBS_ENABLED": "false"})
    try:
        addr = f"127.0.0.1:{server.port}"
        loadgen.ghz(addr, "CreatePayment", create, bench.token, seconds=1, concurrency=c)  # warm
        offs = [loadgen.ghz(addr, "CreatePayment", create, bench.token, seconds=seconds, concurrency=c, every_call=True)
                for _ in range(OFF_WINDOWS)]
    finally:
        server.stop()
    calls = [ms for w in offs for ms in w.latencies_ms]
    off = loadgen.Result(requests=sum(w.requests for w in offs), rps=sum(w.rps for w in offs) / len(offs),
                         p50_ms=sorted(calls)[len(calls) // 2], p99_ms=loadgen.p99(calls),
                         errors=sum(w.errors for w in offs))
    print(f"  {label:8} jobs off   {off.rps:8.0f} req/s  p99 {off.p99_ms:7.2f} ms  errors {off.errors}", flush=True)

    server = Server.start(bench.work, {**env, "PAYMENTS_JOBS_ENABLED": "true", "PAYMENTS_DELETE_RETENTION_SECONDS":
                                       str(30 * 86400), "PAYMENTS_EXPIRE_INTERVAL_SECONDS": str(TICK_SECONDS),
                                       "PAYMENTS_PURGE_INTERVAL_SECONDS": str(TICK_SECONDS)})
    windows: list[loadgen.Result] = []
    try:
        addr = f"127.0.0.1:{server.port}"
        deadline = time.monotonic() + 600
        while (took := drained(server.log, settings)) is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: the jobs did not drain {rows:,} rows in 10 minutes")
            windows.append(loadgen.ghz(addr, "CreatePayment", create, bench.token, seconds=seconds, concurrency=c,
                                       every_call=True))
            w = windows[-1]
            print(f"  {label:8} jobs on    {w.rps:8.0f} req/s  p99 {w.p99_ms:7.2f} ms  errors {w.errors}", flush=True)
    finally:
        server.stop()
    busy = windows or [off]
    return ChurnRow(label, rows, off, on_rps=sorted(w.rps for w in busy)[len(busy) // 2],
                    on_p99_ms=loadgen.p99([ms for w in windows for ms in w.latencies_ms]) if windows else off.p99_ms,
                    worst_window_p99_ms=max(w.p99_ms for w in busy), on_errors=sum(w.errors for w in busy),
                    drain_seconds=took)


def report(rows: list[ChurnRow]) -> str:
    lines = ["| database | backlog | jobs off req/s | jobs off p99 ms | churn req/s (median window) | churn p99 ms "
             "| errors | p99 vs off | worst window p99 ms (vs off) | req/s vs off | drain s | drain s per 100k rows |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.target} | {r.backlog:,} | {r.off.rps:.0f} | {r.off.p99_ms:.1f} | {r.on_rps:.0f} "
                     f"| {r.on_p99_ms:.1f} | {r.on_errors + r.off.errors} | {r.on_p99_ms / r.off.p99_ms:.2f}x "
                     f"| {r.worst_window_p99_ms:.1f} ({r.worst_window_p99_ms / r.off.p99_ms:.2f}x) "
                     f"| {r.on_rps / r.off.rps:.2f}x | {r.drain_seconds:.1f} "
                     f"| {r.drain_seconds / (r.backlog * (OVERDUE + DELETED)) * 100_000:.1f} |")
    return "\n".join(lines)
