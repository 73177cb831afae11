"""Scheduled jobs: expire overdue pending payments, purge what is no longer needed, deliver webhooks.

Every replica runs the scheduler (APScheduler, in-process); server.infra.job_claims makes each tick of a job
run in exactly one of them, except the webhook job's, which runs in every replica and claims its
work a batch of deliveries at a time (server/domain/webhook_delivery.py), so delivery grows with
the replicas. A run works in bounded batches - each a SELECT of at most
PAYMENTS_JOB_BATCH_SIZE ids and one UPDATE or DELETE of those rows by primary key, committed on
its own - and shares the database politely: a batch that takes over BATCH_BUDGET_SECONDS halves
the next one (a fast one doubles it back, up to the batch size); after each batch it pauses as
long as the batch took, twice as long on SQLite (whose writers poll for its one write lock, so they
need the wider gaps: a worst churn window 3.2x the jobs-off p99 before, 1.9x after); it stops when
its time budget is spent (RUN_BUDGET_FRACTION of its interval, at most RUN_BUDGET_SECONDS; the
rest waits for the next tick, and each batch resumes where the last one ended, so a backlog
drains in time linear in its size), and the two jobs never run write batches at the
same time (SQLite: one write lock, purge used to fail "database is locked" whenever its tick met
expire's; PostgreSQL: two jobs' batches at once took the CPU the API calls needed).
Each run logs one JSON line (job, tick, rows changed, batches, duration) and never raises into
the scheduler or the server: a failed run is logged and the next tick retries.

The purge job also removes sessions that ended (revoked or expired) more than a week ago, with
their refresh tokens, in the same bounded batches: a live session keeps its used refresh tokens
(they are what recognises a replayed one), so those tables hold what the logins and refreshes of
the last PAYMENTS_REFRESH_TTL_SECONDS plus a week made, no more.

Idempotency records need no job of their own: they are columns of the payment (request_id,
request_hash), so they live exactly as long as the payment, soft-deleted ones included, and are
purged with it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from typing import Callable

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from server.infra import job_claims, metrics, storage
from server.infra.config import Settings
from server.domain.payments import PaymentRules
from server.domain.sessions import ENDED_SESSION_RETENTION, Sessions
from server.domain.webhook_delivery import Dispatcher, Run

log = logging.getLogger(__name__)

EXPIRE, PURGE, WEBHOOKS = "expire", "purge", "webhooks"
SKIPPED = "skipped"
# How long job_runs rows are kept (they are only needed to claim ticks; the rest is history).
HISTORY_RETENTION = dt.timedelta(days=7)
# Fire times are multiples of the interval since this instant, so all replicas tick together.
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclasses.dataclass
class Progress:
    """What a run has done so far; kept up to date batch by batch, so a run that fails halfway
    still reports what it changed."""

    rows: int = 0
    batches: list[int] = dataclasses.field(default_factory=list)
    other_rows: dict[str, int] = dataclasses.field(default_factory=dict)
    interrupted: bool = False
    deadline: float | None = None  # time.monotonic() by which the run stops taking batches
    batch_budget: float | None = None  # seconds a batch may take before the next one is halved
    # The size the next batch starts at: the scheduler carries it from one run of a job to the next,
    # so that a run does not open with a full batch the last run had learnt was too slow (on SQLite
    # a 500-row batch held the write lock 150-300 ms at the start of every tick: the churn
    # benchmark's worst windows).
    batch_size: int | None = None
    deferred: bool = False  # stopped at the deadline with work left for the next tick


RUN_BUDGET_FRACTION = 0.5
RUN_BUDGET_SECONDS = 30.0
PAUSE_RATIO = 1.0  # pause after a batch for this many times its duration
# SQLite: API writers poll for the one write lock (sleeps of up to 100 ms), so they need wider gaps.
SQLITE_PAUSE_RATIO = 2.0
BATCH_BUDGET_SECONDS = 0.1  # a batch that takes longer halves the next one (down to MIN_BATCH)
MIN_BATCH = 50
MIN_PAUSE_SECONDS = 0.005
# The jobs take turns with their write batches (API calls interleave between batches). SQLite has
# one write lock, and purge failed "database is locked" whenever its tick met expire's; on
# PostgreSQL two jobs' batches at once took the CPU the API needed (the first churn window after
# start: p99 5.9x the jobs-off run, 1.4x with turns).
_JOB_WRITES = threading.Lock()


def drain(step: Callable[[int], int], limit: int, progress: Progress, stopping: threading.Event | None = None,
          *, count_as: str | None = None) -> None:
    """Call step(limit) - one bounded batch, returning the rows it changed - until a batch comes
    back short, the run's deadline passes, or the server is stopping; pausing after each batch.

    A short batch means nothing more was due when it ran. (An expiry batch can also come back
    short because a confirm or cancel won some of its rows; the rest then waits for the next tick.)
    """
    stopping = stopping or threading.Event()
    # This batch's size: halved after a slow batch, grown back after fast ones.
    size = min(limit, progress.batch_size or limit)
    while True:
        with _JOB_WRITES:
            started = time.monotonic()  # the batch's own time, not the wait for the other job's
            changed = step(size)
            took = time.monotonic() - started
        if count_as is None:
            progress.rows += changed
            progress.batches.append(changed)
        else:
            progress.other_rows[count_as] = progress.other_rows.get(count_as, 0) + changed
        if changed < size:
            return
        if progress.batch_budget is not None:
            if took > progress.batch_budget:
                size = max(MIN_BATCH, size // 2)
            elif took < progress.batch_budget / 4:
                size = min(limit, size * 2)
            progress.batch_size = size
        if stopping.is_set():
            progress.interrupted = True
            return
        if progress.deadline is not None and time.monotonic() >= progress.deadline:
            progress.deferred = True
            return
        pause = took * (PAUSE_RATIO if storage.is_postgres() else SQLITE_PAUSE_RATIO)
        if stopping.wait(max(pause, MIN_PAUSE_SECONDS)):
            progress.interrupted = True
            return


def expire(rules: PaymentRules, now: dt.datetime, *, batch_size: int, progress: Progress | None = None,
           stopping: threading.Event | None = None) -> Progress:
    """Fail every payment still pending at its expires_at (reason: expired), batch by batch.

    Each batch is PaymentRules.expire_due: one conditional UPDATE, so a payment confirmed or
    cancelled at the same moment keeps that status.
    """
    progress = progress or Progress()
    resume: dict = {}
    drain(lambda limit: rules.expire_due(now, limit=limit, resume=resume), batch_size, progress, stopping)
    return progress


def purge(rules: PaymentRules, now: dt.datetime, *, retention: dt.timedelta, batch_size: int,
          progress: Progress | None = None, stopping: threading.Event | None = None,
          sessions: Sessions | None = None) -> Progress:
    """Remove for good the payments soft-deleted more than `retention` ago (their idempotency
    records go with them), then job_runs history older than HISTORY_RETENTION, then (given
    `sessions`) the sessions that ended more than ENDED_SESSION_RETENTION ago, with their refresh
    tokens."""
    progress = progress or Progress()
    resume: dict = {}
    drain(lambda limit: rules.purge_deleted(now - retention, limit=limit, resume=resume), batch_size, progress,
          stopping)
    if not progress.interrupted and not progress.deferred:
        drain(lambda limit: job_claims.purge_history(now - HISTORY_RETENTION, limit=limit), batch_size, progress,
              stopping, count_as="history_rows")
    if sessions is not None and not progress.interrupted and not progress.deferred:
        ended: dict = {}
        drain(lambda limit: sessions.purge_ended(now - ENDED_SESSION_RETENTION, limit=limit, resume=ended),
              batch_size, progress, stopping, count_as="session_rows")
    if progress.rows or progress.other_rows.get("session_rows"):
        with _JOB_WRITES:
            progress.other_rows["pages_returned"] = storage.give_back_space(GIVE_BACK_PAGES)
    return progress


def deliver_webhooks(dispatcher: Dispatcher, *, batch_size: int, fan_out_rows: int = 500,
                     progress: Progress | None = None, stopping: threading.Event | None = None) -> Progress:
    """Fan new outbox events out into deliveries (write batches, taking turns with the other jobs),
    then send what is due, batch after batch until the run's deadline (server/domain/webhook_delivery.py).
    The sending holds no job turn: its writes are one small transaction a batch, and a slow
    endpoint must not keep expiry waiting."""
    progress = progress or Progress()
    stopping = stopping or threading.Event()
    # Fan-out in write batches of at most batch_size delivery rows (a change times the endpoints
    # that want it), for at most FAN_OUT_SHARE of the run's time: a burst of changes to many
    # endpoints never takes the whole run from sending, nor holds a write lock long.
    run_deadline, fanned = progress.deadline, dispatcher.fanned_out
    if run_deadline is not None:
        progress.deadline = time.monotonic() + max(run_deadline - time.monotonic(), 0) * FAN_OUT_SHARE
    try:
        drain(dispatcher.fan_out, fan_out_rows, progress, stopping, count_as="fan_out_rows")
    finally:
        progress.deadline = run_deadline
        progress.other_rows.pop("fan_out_rows", None)
        progress.other_rows["events"] = dispatcher.fanned_out - fanned
    run = Run()
    try:
        while not stopping.is_set():
            if not dispatcher.deliver(batch_size, run, deadline=progress.deadline, stopping=stopping):
                break
            if progress.deadline is not None and time.monotonic() >= progress.deadline:
                progress.deferred = True
                break
    finally:
        progress.rows += run.delivered
        progress.other_rows.update({"failed_attempts": run.failed, "gave_up": run.gave_up, "late_writes": run.late})
    progress.interrupted = progress.interrupted or stopping.is_set()
    return progress


GIVE_BACK_PAGES = 4096  # 16 MiB of 4 KiB pages per purge run, in one short statement


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    interval_seconds: int
    work: Callable[[dt.datetime, Progress, threading.Event], object]
    budget_fraction: float = RUN_BUDGET_FRACTION
    # Runs in every replica at every tick, neither locked nor claimed per tick (job_claims): the
    # webhook job, whose work is claimed in pieces instead (each batch's deliveries), so more
    # replicas deliver more. Such runs are logged and counted, not recorded in job_runs.
    every_replica: bool = False


# The webhook job sends for most of its interval: its POSTs take no job turn and write one small
# transaction a batch, so the database has nothing to win from the pause the other jobs leave
# (bench/webhooks.py: half the interval capped delivery at half the rate the POSTs alone reach).
WEBHOOK_BUDGET_FRACTION = 0.9
# The part of a webhook run that fan-out may take when there is a backlog of new events; the rest
# is for sending (docs/webhooks.md).
FAN_OUT_SHARE = 0.25


def run_budget(interval_seconds: int, fraction: float = RUN_BUDGET_FRACTION) -> float:
    """How long a run may go on taking batches: part of its interval, at most RUN_BUDGET_SECONDS."""
    return min(interval_seconds * fraction, RUN_BUDGET_SECONDS)


def payment_jobs(settings: Settings, rules: PaymentRules, dispatcher: Dispatcher | None = None) -> list[Job]:
    batch = settings.job_batch_size
    retention = dt.timedelta(seconds=settings.delete_retention_seconds)
    sessions = Sessions(settings.refresh_ttl_seconds, rules.clock, store=storage.SessionQueries())
    webhooks = [] if dispatcher is None else [
        Job(WEBHOOKS, settings.webhook_interval_seconds,
            lambda now, progress, stopping: deliver_webhooks(dispatcher, batch_size=settings.webhook_batch_size,
                                                            fan_out_rows=batch,
                                                            progress=progress, stopping=stopping),
            budget_fraction=WEBHOOK_BUDGET_FRACTION, every_replica=True)]
    return webhooks + [
        Job(EXPIRE, settings.expire_interval_seconds,
            lambda now, progress, stopping: expire(rules, now, batch_size=batch, progress=progress,
                                                  stopping=stopping)),
        Job(PURGE, settings.purge_interval_seconds,
            lambda now, progress, stopping: purge(rules, now, retention=retention, batch_size=batch,
                                                 progress=progress, stopping=stopping, sessions=sessions)),
    ]


class Runner:
    """Runs one tick of a job: lock, claim, work, record, log - and swallows every failure."""

    def __init__(self, clock: Callable[[], dt.datetime], *, replica: str | None = None,
                 stopping: threading.Event | None = None):
        self.clock = clock
        self.replica = replica or job_claims.replica_id()
        self.stopping = stopping or threading.Event()
        self._batch_sizes: dict[str, int] = {}  # job name -> the size its last run ended at

    def tick(self, job: Job) -> str:
        """ok, interrupted (the server is stopping), failed, or skipped (another replica has the
        lock or already ran this tick)."""
        started = time.perf_counter()
        now = self.clock()
        tick_at = job_claims.tick_slot(now, job.interval_seconds)
        fields = {"job": job.name, "tick_at": tick_at.isoformat(), "replica": self.replica}
        progress = Progress(deadline=time.monotonic() + run_budget(job.interval_seconds, job.budget_fraction),
                            batch_budget=BATCH_BUDGET_SECONDS, batch_size=self._batch_sizes.get(job.name))
        try:
            with job_claims.shared() if job.every_replica else job_claims.exclusive(job.name) as mine:
                if not mine:
                    log.debug("job skipped", extra={**fields, "reason": "locked"})
                    metrics.job_runs.labels(job.name, SKIPPED).inc()
                    return SKIPPED
                if not job.every_replica and not job_claims.claim(job.name, tick_at, self.replica, now):
                    log.debug("job skipped", extra={**fields, "reason": "tick already run"})
                    metrics.job_runs.labels(job.name, SKIPPED).inc()
                    return SKIPPED
                try:
                    job.work(now, progress, self.stopping)
                except Exception:
                    self._record_failure(job, tick_at, progress)
                    raise
                finally:
                    if progress.batch_size:
                        self._batch_sizes[job.name] = progress.batch_size
                outcome = job_claims.INTERRUPTED if progress.interrupted else job_claims.OK
                if not job.every_replica:
                    job_claims.finish(job.name, tick_at, outcome=outcome, rows=progress.rows, now=self.clock())
        except Exception:
            log.error("job failed", exc_info=True, extra={**fields, **self._summary(progress, started),
                                                          "outcome": job_claims.FAILED})
            self._count(job, job_claims.FAILED, progress, started)
            return job_claims.FAILED
        # A run that did nothing logs at DEBUG: an idle stack's webhook job ticks every 5 s.
        busy = outcome != job_claims.OK or progress.rows or progress.deferred or any(progress.other_rows.values())
        log.log(logging.INFO if busy else logging.DEBUG, "job run",
                extra={**fields, **self._summary(progress, started), "outcome": outcome})
        self._count(job, outcome, progress, started)
        return outcome

    @staticmethod
    def _count(job: Job, outcome: str, progress: Progress, started: float) -> None:
        metrics.job_runs.labels(job.name, outcome).inc()
        metrics.job_seconds.labels(job.name).observe(time.perf_counter() - started)
        if progress.rows:
            metrics.job_rows.labels(job.name).inc(progress.rows)

    def _record_failure(self, job: Job, tick_at: dt.datetime, progress: Progress) -> None:
        if job.every_replica:
            return
        try:
            job_claims.finish(job.name, tick_at, outcome=job_claims.FAILED, rows=progress.rows, now=self.clock())
        except Exception:  # the database may be the reason the run failed; the log line says it
            log.debug("cannot record the failed run", exc_info=True)

    @staticmethod
    def _summary(progress: Progress, started: float) -> dict:
        return {"rows": progress.rows, "batches": len(progress.batches), "deferred": progress.deferred,
                **progress.other_rows,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2)}


class Scheduler:
    """The jobs on an APScheduler BackgroundScheduler, and a shutdown that lets a running job end
    after its current batch instead of killing it mid-way or waiting for a whole backlog."""

    def __init__(self, jobs: list[Job], runner: Runner):
        self.jobs = jobs
        self.runner = runner
        self._idle = threading.Condition()
        self._running = 0
        self._scheduler = BackgroundScheduler(
            timezone=dt.UTC,
            executors={"default": ThreadPoolExecutor(max_workers=max(1, len(jobs)))},
        )
        for job in jobs:
            self._scheduler.add_job(
                self._tick, IntervalTrigger(seconds=job.interval_seconds, start_date=_EPOCH, timezone=dt.UTC),
                args=(job,), id=job.name, name=job.name,
                coalesce=True,  # ticks missed while the process was busy or paused run once, not many times
                max_instances=1,  # a run that outlasts its interval is not overlapped by the next tick
                misfire_grace_time=job.interval_seconds,  # later than one interval: skip, the next tick comes
            )

    def start(self) -> "Scheduler":
        self._scheduler.start()
        log.info("jobs scheduled", extra={"replica": self.runner.replica,
                                          "jobs": {j.name: j.interval_seconds for j in self.jobs}})
        return self

    def _tick(self, job: Job) -> None:
        with self._idle:
            if self.runner.stopping.is_set():
                return
            self._running += 1
        try:
            self.runner.tick(job)
        finally:
            with self._idle:
                self._running -= 1
                self._idle.notify_all()

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Stop scheduling; running jobs stop after their current batch. With wait, block until
        they have (at most `timeout` seconds). Returns whether no job is still running."""
        self.runner.stopping.set()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        with self._idle:
            if wait:
                self._idle.wait_for(lambda: self._running == 0, timeout)
            return self._running == 0


def start(settings: Settings, rules: PaymentRules, dispatcher: Dispatcher | None = None) -> Scheduler:
    return Scheduler(payment_jobs(settings, rules, dispatcher), Runner(rules.clock)).start()
