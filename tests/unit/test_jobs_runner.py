"""One tick of a job (server.infra.jobs.Runner) and the scheduler around it: a tick slot runs once, the
PostgreSQL advisory lock makes other replicas skip and is always released - also when the job
fails or its pooled connection dies - every run logs one JSON line, and shutdown stops a
running job after its current batch."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading

import peewee
from playhouse.db_url import parse as parse_db_url
import pytest

from server.infra import job_claims, jobs, logs, storage
from server.infra.storage import JobRun

UTC = dt.timezone.utc
pg_only = pytest.mark.parametrize("backend", ["postgres"])


class Counting:
    """A job body that records its calls and changes `rows` rows in one batch."""

    def __init__(self, rows: int = 3, fail: Exception | None = None):
        self.calls = []
        self.rows = rows
        self.fail = fail

    def __call__(self, now, progress, stopping):
        self.calls.append(now)
        progress.rows += self.rows
        progress.batches.append(self.rows)
        if self.fail is not None:
            raise self.fail


def job_records(caplog):
    return [r for r in caplog.records if r.name == "server.infra.jobs" and r.levelno >= logging.INFO]


def other_connection(settings) -> peewee.PostgresqlDatabase:
    """A plain connection of its own: another replica's session."""
    params = parse_db_url(settings.database_url)
    return peewee.PostgresqlDatabase(params.pop("database"), **params)


def advisory_locks(conn) -> int:
    return conn.execute_sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
                            "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()[0]


@pytest.fixture
def caplog_jobs(caplog):
    caplog.set_level(logging.INFO, logger="server.infra.jobs")
    return caplog


def test_tick_slots_are_aligned_to_the_interval():
    at = dt.datetime(2026, 1, 1, 12, 0, 59, 999999, tzinfo=UTC)
    assert job_claims.tick_slot(at, 60) == dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert job_claims.tick_slot(at + dt.timedelta(microseconds=1), 60) == dt.datetime(2026, 1, 1, 12, 1, tzinfo=UTC)
    assert job_claims.tick_slot(at, 3600) == dt.datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def test_lock_keys_are_fixed_per_job():
    assert job_claims.lock_key("expire") == job_claims.lock_key("expire") != job_claims.lock_key("purge")
    assert -(2**63) <= job_claims.lock_key("purge") < 2**63


def test_a_tick_slot_runs_once_even_when_replicas_tick_at_different_moments(database, clock):
    work = Counting()
    job = jobs.Job("expire", 60, work)
    a, b = jobs.Runner(clock, replica="a:1"), jobs.Runner(clock, replica="b:1")

    assert a.tick(job) == "ok"  # 12:00:00.12
    clock.advance(seconds=30)
    assert b.tick(job) == jobs.SKIPPED  # 12:00:30.12, same slot: already run by a
    assert a.tick(job) == jobs.SKIPPED
    clock.advance(seconds=30)
    assert b.tick(job) == "ok"  # 12:01:00.12, the next slot

    assert len(work.calls) == 2
    runs = [(r.tick_at.strftime("%H:%M:%S"), r.replica, r.outcome, r.rows) for r in JobRun.select().order_by(JobRun.tick_at)]
    assert runs == [("12:00:00", "a:1", "ok", 3), ("12:01:00", "b:1", "ok", 3)]


def test_a_clock_stepped_back_runs_no_tick_twice(database, clock):
    """The tick a run claims is named by its slot on the one clock: stepped back (a step of the
    clock the assembly hands the jobs) into a slot that ran, every replica skips it; time moving
    on from there runs the slots that have not run, each once."""
    work = Counting()
    job = jobs.Job("expire", 60, work)
    a, b = jobs.Runner(clock, replica="a:1"), jobs.Runner(clock, replica="b:1")
    assert a.tick(job) == "ok"  # 12:00
    clock.advance(minutes=2)
    assert b.tick(job) == "ok"  # 12:02
    clock.advance(minutes=-2, seconds=10)
    assert a.tick(job) == b.tick(job) == jobs.SKIPPED  # back in 12:00, which ran
    clock.advance(minutes=1)
    assert b.tick(job) == "ok" and a.tick(job) == jobs.SKIPPED  # 12:01 had not run: once
    clock.advance(minutes=1)
    assert a.tick(job) == jobs.SKIPPED  # 12:02 again
    assert [r.tick_at.strftime("%H:%M") for r in JobRun.select().order_by(JobRun.tick_at)] == ["12:00", "12:01", "12:02"]
    assert len(work.calls) == 3


def test_each_run_logs_one_json_line(database, clock, caplog_jobs):
    runner = jobs.Runner(clock, replica="a:1")
    assert runner.tick(jobs.Job("expire", 60, Counting(rows=7))) == "ok"
    assert runner.tick(jobs.Job("expire", 60, Counting())) == jobs.SKIPPED  # skips log at DEBUG only

    [record] = job_records(caplog_jobs)
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "job run" and entry["severity"] == "INFO"
    assert (entry["job"], entry["rows"], entry["batches"], entry["outcome"], entry["replica"]) == ("expire", 7, 1, "ok", "a:1")
    assert entry["tick_at"] == "2026-01-01T12:00:00+00:00"
    # Milliseconds of this run: the job did nothing but count, so well under a second.
    assert isinstance(entry["duration_ms"], float) and 0 <= entry["duration_ms"] < 1000


def test_a_failed_run_is_logged_recorded_and_retried_next_tick(database, clock, caplog_jobs):
    runner = jobs.Runner(clock, replica="a:1")
    assert runner.tick(jobs.Job("purge", 60, Counting(rows=2, fail=RuntimeError("boom")))) == "failed"

    [record] = job_records(caplog_jobs)
    entry = json.loads(logs.JsonFormatter().format(record))
    assert (entry["severity"], entry["message"], entry["job"], entry["outcome"], entry["rows"]) == \
        ("ERROR", "job failed", "purge", "failed", 2)
    assert "RuntimeError: boom" in entry["exception"]
    assert [(r.outcome, r.rows) for r in JobRun.select()] == [("failed", 2)]

    clock.advance(seconds=60)
    work = Counting()
    assert runner.tick(jobs.Job("purge", 60, work)) == "ok" and len(work.calls) == 1


def test_a_database_outage_fails_the_run_without_raising(database, clock, caplog_jobs, monkeypatch):
    def unreachable(*a, **kw):
        raise peewee.OperationalError("could not connect to server")

    monkeypatch.setattr(job_claims, "claim", unreachable)
    assert jobs.Runner(clock).tick(jobs.Job("expire", 60, Counting())) == "failed"
    [record] = job_records(caplog_jobs)
    assert record.getMessage() == "job failed" and record.outcome == "failed"


@pg_only
def test_a_replica_holding_the_lock_makes_the_others_skip(database, settings, clock):
    other = other_connection(settings)
    key = job_claims.lock_key("expire")
    assert other.execute_sql("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]
    work = Counting()
    runner = jobs.Runner(clock, replica="b:1")
    try:
        assert runner.tick(jobs.Job("expire", 60, work)) == jobs.SKIPPED
        assert runner.tick(jobs.Job("purge", 60, work)) == "ok"  # another job, another lock
        assert JobRun.select().where(JobRun.job == "expire").count() == 0  # a skipped tick claims nothing
    finally:
        other.execute_sql("SELECT pg_advisory_unlock(%s)", (key,))
    assert runner.tick(jobs.Job("expire", 60, work)) == "ok"
    assert len(work.calls) == 2
    other.close()


@pg_only
def test_the_lock_is_released_and_the_connection_pooled_after_a_failed_run(database, settings, clock):
    def run_in_thread(job):
        result = []
        t = threading.Thread(target=lambda: result.append(jobs.Runner(clock).tick(job)))
        t.start()
        t.join(30)
        return result[0]

    assert run_in_thread(jobs.Job("expire", 60, Counting(fail=RuntimeError("boom")))) == "failed"
    other = other_connection(settings)
    assert advisory_locks(other) == 0
    assert database._in_use == {}  # the job thread's connection went back to the pool, unlocked
    # Any later borrower of that pooled connection - here another thread - can take the lock.
    clock.advance(seconds=60)
    assert run_in_thread(jobs.Job("expire", 60, Counting())) == "ok"
    assert advisory_locks(other) == 0
    other.close()


@pg_only
def test_the_lock_ends_with_a_connection_that_dies_mid_run(database, settings, clock, caplog_jobs):
    def kill_own_session(now, progress, stopping):
        storage.db.execute_sql("SELECT pg_terminate_backend(pg_backend_pid())")

    runner = jobs.Runner(clock)
    assert runner.tick(jobs.Job("expire", 60, kill_own_session)) == "failed"
    other = other_connection(settings)
    assert advisory_locks(other) == 0
    clock.advance(seconds=60)
    assert runner.tick(jobs.Job("expire", 60, Counting())) == "ok"  # a fresh pooled connection
    assert [(r.getMessage(), r.outcome) for r in job_records(caplog_jobs)] == [("job failed", "failed"), ("job run", "ok")]
    other.close()


def test_scheduler_ticks_are_aligned_coalesced_and_never_overlap(database, clock):
    runner = jobs.Runner(clock)
    scheduler = jobs.Scheduler([jobs.Job("expire", 60, Counting()), jobs.Job("purge", 3600, Counting())], runner)
    scheduler._scheduler.start(paused=True)
    try:
        for name, interval in (("expire", 60), ("purge", 3600)):
            job = scheduler._scheduler.get_job(name)
            assert job.next_run_time.timestamp() % interval == 0  # every replica fires at the same moments
            assert (job.coalesce, job.max_instances, job.misfire_grace_time) == (True, 1, interval)
    finally:
        assert scheduler.shutdown(timeout=5)
    assert not scheduler._scheduler.running


def test_shutdown_stops_a_running_job_after_its_current_batch(database, clock, caplog_jobs):
    started = threading.Event()

    def one_long_batch(limit):
        started.set()
        runner.stopping.wait(10)  # the batch ends when shutdown is asked for (or after 10 s)
        return limit

    def backlog(now, progress, stopping):
        jobs.drain(one_long_batch, 500, progress, stopping)

    runner = jobs.Runner(clock, replica="a:1")
    job = jobs.Job("expire", 60, backlog)
    scheduler = jobs.Scheduler([job], runner)
    worker = threading.Thread(target=scheduler._tick, args=(job,))  # what the scheduler's executor calls
    worker.start()
    assert started.wait(10)

    assert scheduler.shutdown(timeout=10)  # returns once the run has ended
    worker.join(10)
    assert not worker.is_alive()
    assert [(r.outcome, r.rows) for r in JobRun.select()] == [("interrupted", 500)]
    [record] = job_records(caplog_jobs)
    assert (record.getMessage(), record.outcome, record.batches) == ("job run", "interrupted", 1)
    scheduler._tick(job)  # a tick after shutdown does nothing
    assert JobRun.select().count() == 1


def test_a_run_starts_at_the_batch_size_the_last_run_of_that_job_ended_at(database, clock, monkeypatch):
    """A batch over the budget halves the next; the job's next run starts at that size, not at the
    full batch again (on SQLite each tick's first full batch held the write lock 150-300 ms)."""
    monkeypatch.setattr(jobs, "MIN_PAUSE_SECONDS", 0.0)
    monkeypatch.setattr(jobs, "SQLITE_PAUSE_RATIO", 0.0)
    monkeypatch.setattr(jobs, "PAUSE_RATIO", 0.0)
    monkeypatch.setattr(jobs, "BATCH_BUDGET_SECONDS", 0.01)
    sizes: list[int] = []

    def slow_batch_then_nothing_due(limit: int) -> int:
        sizes.append(limit)
        if len(sizes) % 2 == 0:
            return 0  # the second batch of each run finds nothing due
        threading.Event().wait(0.03)  # over the budget
        return limit

    job = jobs.Job("expire", 60, lambda now, progress, stopping: jobs.drain(slow_batch_then_nothing_due, 400,
                                                                            progress, stopping))
    runner = jobs.Runner(clock, replica="a:1")
    assert runner.tick(job) == "ok"
    clock.advance(seconds=60)
    assert runner.tick(job) == "ok"
    # Run 1: 400 (slow) then 200; run 2 starts at 200 (slow) then 100.
    assert sizes == [400, 200, 200, 100]
    clock.advance(seconds=60)
    assert jobs.Runner(clock, replica="b:1").tick(job) == "ok"  # another process's runner starts full
    assert sizes[4] == 400


def test_a_run_that_did_nothing_logs_at_debug_and_one_that_did_something_at_info(database, clock, caplog_jobs):
    runner = jobs.Runner(clock, replica="a:1")
    caplog_jobs.set_level(logging.DEBUG, logger="server.infra.jobs")
    assert runner.tick(jobs.Job("webhooks", 5, Counting(rows=0))) == "ok"
    clock.advance(seconds=5)
    assert runner.tick(jobs.Job("webhooks", 5, Counting(rows=2))) == "ok"
    runs = [(r.levelname, r.rows) for r in caplog_jobs.records if r.name == "server.infra.jobs" and r.getMessage() == "job run"]
    assert runs == [("DEBUG", 0), ("INFO", 2)]
