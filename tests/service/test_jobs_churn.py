"""The jobs drain a backlog while API writes keep succeeding promptly, on both databases.

A bounded version of the churn the benchmarks measure: thousands of overdue pending payments
and expired soft-deletes, both jobs draining them at once, and creates from several threads all
the while. Every create must succeed, and none may wait as long as SQLite's busy_timeout (a
create that did would fail with DATABASE_BUSY: that is what "timing out" means here).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import threading
import time

from server.infra import jobs, storage
from server.domain.payments import FAILED, PENDING, PaymentDraft, new_payment_id
from server.infra.storage import Payment
from tests.conftest import ALICE

OVERDUE, DELETED = 6000, 3000
CREATE_DEADLINE = 5.0  # storage's SQLite busy_timeout (5000 ms); the worst seen on 2 cores: 2.3 s
WRITERS = 6


def backlog(rules) -> dt.datetime:
    """Overdue pending payments and long-deleted ones, inserted in bulk; returns 'now' for the jobs."""
    past = rules.clock() - dt.timedelta(days=60)
    rows = [{"id": new_payment_id(), "email": ALICE.email, "owner_id": ALICE.subject, "amount": 100, "currency": "IDR",
             "description": "", "status": PENDING if i < OVERDUE else FAILED,
             "failure_reason": None if i < OVERDUE else "cancelled", "created_by": ALICE.subject, "created_at": past,
             "updated_at": past, "expires_at": past + dt.timedelta(hours=1),
             "deleted_at": past if i >= OVERDUE else None} for i in range(OVERDUE + DELETED)]
    with storage.db.atomic():
        for start in range(0, len(rows), 500):
            Payment.insert_many(rows[start:start + 500]).execute()
    return rules.clock()


def test_jobs_drain_a_backlog_while_creates_keep_succeeding(rules, database):
    now = backlog(rules)
    stop = threading.Event()
    slowest, failures, created = [0.0], [], [0]

    def write(n: int) -> None:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            try:
                rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=1 + i, request_id=f"churn-{n}-{i}"))
                created[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                failures.append(repr(e))
            slowest[0] = max(slowest[0], time.monotonic() - started)
            i += 1
        storage.end_call()

    def drain(job) -> jobs.Progress:
        progress = jobs.Progress()
        try:
            return job(progress)
        finally:
            storage.end_call()

    retention = dt.timedelta(days=30)
    with concurrent.futures.ThreadPoolExecutor(WRITERS + 2) as pool:
        writers = [pool.submit(write, n) for n in range(WRITERS)]
        started = time.monotonic()
        expired = pool.submit(drain, lambda p: jobs.expire(rules, now, batch_size=500, progress=p))
        purged = pool.submit(drain, lambda p: jobs.purge(rules, now, retention=retention, batch_size=500, progress=p))
        expire_progress, purge_progress = expired.result(timeout=300), purged.result(timeout=300)
        drained_in = time.monotonic() - started
        stop.set()
        for w in writers:
            w.result(timeout=30)
    assert failures == [], failures[:5]
    assert slowest[0] < CREATE_DEADLINE, f"a create took {slowest[0]:.2f} s while the jobs ran"
    assert created[0] > 0
    assert expire_progress.rows == OVERDUE, expire_progress
    assert purge_progress.rows == DELETED, purge_progress
    assert Payment.select().where(Payment.deleted_at.is_null(False)).count() == 0
    print(f"drained {OVERDUE} + {DELETED} rows in {drained_in:.1f} s; {created[0]} creates meanwhile, "
          f"slowest {slowest[0] * 1000:.0f} ms")
