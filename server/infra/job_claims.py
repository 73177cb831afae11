"""Once per tick across replicas: the advisory lock and the tick claim a scheduled job runs under.

Every replica schedules every job; when a tick fires, a replica runs the job only if it

1. gets the job's PostgreSQL advisory lock without waiting (`pg_try_advisory_lock`), so no two
   replicas work at the same time - a run that outlasts its interval is not joined by a second
   one competing for the same rows; and
2. inserts the (job, tick slot) row into job_runs first, so each slot runs once even when the
   replicas' ticks are not aligned (a lock alone would let replica A run at 12:00:01 and replica
   B at 12:00:31 within the same 60-second slot, once each).

A replica that loses either step skips the tick. (The webhook job takes neither step: it runs in
every replica, `shared`, and claims its deliveries a batch at a time, server/domain/webhook_delivery.py.)
On SQLite the server is one process, so there is
no lock; the claim still records the run.

The lock is session-level, not transaction-level, because each batch of a run commits on its own:
one transaction around the whole run would hold row locks for its whole length. A session lock
lives on the connection, and connections here come from a pool, so it must never go back to the
pool still locked (the next borrower would hold it forever): it is unlocked in a `finally`, and if
unlocking fails the connection is closed instead of returned, which ends the session and with it
the lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import socket
from typing import Iterator

import peewee

from server.infra import storage
from server.infra.storage import JobRun

log = logging.getLogger(__name__)

RUNNING, OK, FAILED, INTERRUPTED = "running", "ok", "failed", "interrupted"


def replica_id() -> str:
    """Which process claimed a tick: the pod name (hostname) and the pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def lock_key(job: str) -> int:
    """The job's fixed advisory-lock key: a signed 64-bit number derived from its name, the same
    in every replica and release."""
    digest = hashlib.sha256(f"payments.jobs.{job}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def tick_slot(now: dt.datetime, interval_seconds: int) -> dt.datetime:
    """The start of the slot `now` falls in: a multiple of the interval since the epoch."""
    epoch = int(now.timestamp())
    return dt.datetime.fromtimestamp(epoch - epoch % interval_seconds, dt.UTC)


@contextlib.contextmanager
def exclusive(job: str) -> Iterator[bool]:
    """Try the job's advisory lock on this thread's connection; yields whether this replica has it.

    Never waits. On SQLite it always yields True. On leaving, the lock is released and the
    connection handed back (or dropped, if the release failed).
    """
    database = storage.db.obj
    if not storage.is_postgres(database):
        try:
            yield True
        finally:
            _hand_back(database)
        return
    key = lock_key(job)
    try:
        got = bool(database.execute_sql("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])
    except Exception:
        storage.release_connection()
        raise
    try:
        yield got
    finally:
        if got:
            _unlock(database, job, key)
        else:
            _hand_back(database)


@contextlib.contextmanager
def shared() -> Iterator[bool]:
    """For a job that runs in every replica (jobs.Job.every_replica): no lock, always yields
    True; on leaving, this thread's connection is handed back as `exclusive` does."""
    try:
        yield True
    finally:
        _hand_back(storage.db.obj)


def _unlock(database: peewee.Database, job: str, key: int) -> None:
    try:
        released = database.execute_sql("SELECT pg_advisory_unlock(%s)", (key,)).fetchone()[0]
    except Exception:
        log.warning("cannot release the job lock; dropping the connection instead", extra={"job": job},
                    exc_info=True)
        storage.release_connection()
        return
    if not released:  # cannot happen unless the session was replaced under us; never pool it then
        log.warning("job lock was not held at release; dropping the connection", extra={"job": job})
        storage.release_connection()
        return
    _hand_back(database)


def _hand_back(database: peewee.Database) -> None:
    """Return this thread's connection (to the pool on PostgreSQL), so idle job threads hold none."""
    try:
        if not database.is_closed():
            database.close()
    except Exception:
        storage.release_connection()


def claim(job: str, tick_at: dt.datetime, replica: str, now: dt.datetime) -> bool:
    """Record that this replica runs `job` for the slot starting at `tick_at`; False if another
    replica (or an earlier run of this one) already has it."""
    try:
        with storage.db.atomic():
            JobRun.insert(job=job, tick_at=tick_at, replica=replica, started_at=now, outcome=RUNNING).execute()
    except peewee.IntegrityError:
        return False
    return True


def finish(job: str, tick_at: dt.datetime, *, outcome: str, rows: int, now: dt.datetime) -> None:
    JobRun.update(outcome=outcome, rows=rows, finished_at=now).where(
        (JobRun.job == job) & (JobRun.tick_at == tick_at)
    ).execute()


def purge_history(before: dt.datetime, *, limit: int) -> int:
    """Remove up to `limit` job_runs rows started before `before`; returns how many."""
    old = JobRun.started_at < before
    targets = list(JobRun.select(JobRun.job, JobRun.tick_at).where(old).order_by(JobRun.started_at).limit(limit))
    if not targets:
        return 0
    removed = 0
    for job in {t.job for t in targets}:
        ticks = [t.tick_at for t in targets if t.job == job]
        removed += JobRun.delete().where(old & (JobRun.job == job) & JobRun.tick_at.in_(ticks)).execute()
    return removed
