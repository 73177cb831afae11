"""The job logic with a hand-moved clock, on SQLite and PostgreSQL: expiry, its race with confirm,
purging after the retention window, and bounded batches on a large backlog.

Nothing here asserts on elapsed time: batches are checked by their count and sizes (how fast
the jobs are is a benchmark's question, not a test's)."""

from __future__ import annotations

import datetime as dt
import random
import threading

import peewee
import pytest

from server.infra import job_claims, jobs, storage
from server.domain.errors import FailedPrecondition
from server.domain.payments import CANCELLED, EXPIRED, FAILED, PENDING, SUCCESS, PaymentDraft, PaymentRules
from server.infra.storage import JobRun, Payment
from tests.conftest import ADMIN_CALLER, ALICE
from tests.support.jobs import insert_payments

HOUR = dt.timedelta(hours=1)
RETENTION = dt.timedelta(days=30)


def create(rules, caller=ALICE, request_id=""):
    return rules.create(caller, PaymentDraft(email=caller.email, amount=1000, request_id=request_id))


def reload(payment_id: str) -> Payment:
    return Payment.get_by_id(payment_id)


# --- expiry ----------------------------------------------------------------------------------


def test_expire_fails_only_overdue_pending_payments(rules, clock):
    overdue = create(rules)
    confirmed = create(rules)
    rules.confirm(ADMIN_CALLER, confirmed.id)
    cancelled = create(rules)
    rules.cancel(ALICE, cancelled.id)
    clock.advance(minutes=30)
    fresh = create(rules)  # expires 30 minutes after `overdue`

    now = clock.advance(minutes=31)
    progress = jobs.expire(rules, now, batch_size=10)

    assert progress.rows == 1 and progress.batches == [1]
    row = reload(overdue.id)
    assert (row.status, row.failure_reason, row.updated_at) == (FAILED, EXPIRED, now)
    assert reload(confirmed.id).status == SUCCESS
    assert (reload(cancelled.id).status, reload(cancelled.id).failure_reason) == (FAILED, CANCELLED)
    assert reload(fresh.id).status == PENDING


def test_expire_at_exactly_expires_at(rules, clock):
    p = create(rules)
    assert jobs.expire(rules, p.expires_at - dt.timedelta(microseconds=1), batch_size=10).rows == 0
    assert jobs.expire(rules, p.expires_at, batch_size=10).rows == 1
    assert jobs.expire(rules, p.expires_at + HOUR, batch_size=10).rows == 0  # nothing twice


def test_confirm_before_expiry_is_kept(rules, clock):
    p = create(rules)
    clock.advance(minutes=59)
    confirmed = rules.confirm(ADMIN_CALLER, p.id)
    progress = jobs.expire(rules, clock.advance(hours=2), batch_size=10)
    assert progress.rows == 0
    row = reload(p.id)
    assert (row.status, row.failure_reason, row.updated_at) == (SUCCESS, None, confirmed.updated_at)


def test_confirm_after_expiry_is_refused(rules, clock):
    p = create(rules)
    expired_at = clock.advance(hours=1, seconds=1)
    assert jobs.expire(rules, expired_at, batch_size=10).rows == 1
    clock.advance(seconds=1)
    with pytest.raises(FailedPrecondition) as e:
        rules.confirm(ADMIN_CALLER, p.id)
    assert e.value.reason == "PAYMENT_EXPIRED"
    row = reload(p.id)
    assert (row.status, row.failure_reason, row.updated_at) == (FAILED, EXPIRED, expired_at)


def test_expiry_batch_picked_before_a_confirm_does_not_overwrite_it(rules, clock):
    """The job read the payment as due, a confirm committed, then the job's UPDATE ran: the
    UPDATE re-checks the status, so the confirm stands (no read-then-write)."""
    p = create(rules)
    clock.advance(minutes=59, seconds=59)
    rules.confirm(ADMIN_CALLER, p.id)
    assert rules.expire_due(clock.advance(hours=1), ids=[p.id]) == 0
    assert reload(p.id).status == SUCCESS


def test_concurrent_confirms_and_expiry_never_overwrite_each_other(rules, clock, database):
    """Confirms (their clock just before expires_at) race the expiry job (its clock just after),
    in threads. Every payment ends with exactly one winner, and what each caller was told is
    what is stored."""
    ids = [create(rules).id for _ in range(120)]
    expires_at = reload(ids[0]).expires_at
    confirm_now = expires_at - dt.timedelta(milliseconds=1)
    expire_now = expires_at + dt.timedelta(milliseconds=1)
    confirmer = PaymentRules(page_tokens=rules.page_tokens, payment_ttl=rules.payment_ttl, queries=rules.queries,
                             clock=lambda: confirm_now)
    random.Random(5).shuffle(ids)
    told: dict[str, str] = {}
    expired = []
    start = threading.Barrier(4)
    errors = []

    def confirm_all(part):
        try:
            start.wait()
            for pid in part:
                try:
                    confirmer.confirm(ADMIN_CALLER, pid)
                    told[pid] = SUCCESS
                except FailedPrecondition as e:
                    assert e.reason == "PAYMENT_EXPIRED"
                    told[pid] = EXPIRED
        except BaseException as e:  # surfaced below; a thread's exception would be lost
            errors.append(e)
        finally:
            storage.db.close()

    def expire_all():
        try:
            start.wait()
            expired.append(jobs.expire(rules, expire_now, batch_size=7).rows)
        except BaseException as e:
            errors.append(e)
        finally:
            storage.db.close()

    threads = [threading.Thread(target=confirm_all, args=(ids[i::3],)) for i in range(3)]
    threads.append(threading.Thread(target=expire_all))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(told) == len(ids)

    rows = {r.id: r for r in Payment.select().where(Payment.id.in_(ids))}
    for pid in ids:
        row = rows[pid]
        if told[pid] == SUCCESS:
            assert (row.status, row.failure_reason, row.updated_at) == (SUCCESS, None, confirm_now), pid
        else:
            assert (row.status, row.failure_reason, row.updated_at) == (FAILED, EXPIRED, expire_now), pid
    assert expired[0] == sum(1 for v in told.values() if v == EXPIRED)


def test_expire_backlog_runs_in_bounded_batches(rules, clock):
    start = clock.now
    due = insert_payments(5000, created_at=start - 2 * HOUR, ttl=HOUR)
    not_due = insert_payments(30, created_at=start - dt.timedelta(minutes=10), ttl=HOUR)
    done = insert_payments(20, created_at=start - 2 * HOUR, ttl=HOUR, status=SUCCESS)

    progress = jobs.expire(rules, start, batch_size=500)

    assert progress.batches == [500] * 10 + [0]  # bounded, and the backlog is drained in one run
    assert progress.rows == 5000 and not progress.interrupted
    counts = dict(Payment.select(Payment.status, peewee.fn.COUNT(Payment.id))
                  .group_by(Payment.status).tuples())
    assert counts == {FAILED: 5000, PENDING: 30, SUCCESS: 20}
    assert Payment.select().where(Payment.id.in_(due) & (Payment.failure_reason == EXPIRED)).count() == 5000
    assert Payment.select().where(Payment.id.in_(not_due + done) & (Payment.updated_at == start)).count() == 0


def test_a_short_batch_ends_the_run(rules, clock):
    insert_payments(1234, created_at=clock.now - 2 * HOUR, ttl=HOUR)
    assert jobs.expire(rules, clock.now, batch_size=500).batches == [500, 500, 234]


def test_stopping_ends_the_run_after_the_current_batch(rules, clock):
    insert_payments(1500, created_at=clock.now - 2 * HOUR, ttl=HOUR)
    stopping = threading.Event()
    stopping.set()
    progress = jobs.expire(rules, clock.now, batch_size=500, stopping=stopping)
    assert progress.batches == [500] and progress.interrupted
    assert Payment.select().where(Payment.status == PENDING).count() == 1000
    assert jobs.expire(rules, clock.now, batch_size=500).rows == 1000  # the next tick goes on


# --- purge -----------------------------------------------------------------------------------


def test_purge_removes_deleted_payments_after_the_retention_window(rules, clock):
    kept = create(rules)
    old = create(rules, request_id="order-1")
    rules.delete(ALICE, old.id)
    clock.advance(days=29)
    recent = create(rules)
    rules.delete(ALICE, recent.id)

    assert jobs.purge(rules, clock.advance(days=1), retention=RETENTION, batch_size=10).rows == 0  # exactly 30 days
    # Within the window the deleted payment still holds its request_id.
    with pytest.raises(FailedPrecondition) as e:
        create(rules, request_id="order-1")
    assert e.value.reason == "PAYMENT_DELETED"

    progress = jobs.purge(rules, clock.advance(seconds=1), retention=RETENTION, batch_size=10)
    assert progress.rows == 1 and progress.batches == [1]
    assert Payment.get_or_none(Payment.id == old.id) is None
    assert Payment.get_by_id(recent.id).deleted_at is not None
    assert Payment.get_by_id(kept.id).deleted_at is None
    # Purged with the payment, the idempotency record is gone: the same request_id makes a new payment.
    again = create(rules, request_id="order-1")
    assert again.id != old.id and again.status == PENDING


def test_purge_backlog_runs_in_bounded_batches(rules, clock):
    now = clock.now
    insert_payments(1200, created_at=now - 40 * 24 * HOUR, ttl=HOUR, deleted_at=now - 31 * 24 * HOUR)
    young = insert_payments(50, created_at=now - 40 * 24 * HOUR, ttl=HOUR, deleted_at=now - 29 * 24 * HOUR)
    alive = insert_payments(10, created_at=now - 40 * 24 * HOUR, ttl=HOUR)

    progress = jobs.purge(rules, now, retention=RETENTION, batch_size=500)

    assert progress.batches == [500, 500, 200] and progress.rows == 1200
    assert sorted(p.id for p in Payment.select(Payment.id)) == sorted(young + alive)


def test_purge_removes_old_job_history(rules, clock):
    now = clock.now
    for days in (1, 6, 8, 30):
        at = now - dt.timedelta(days=days)
        assert job_claims.claim("expire", at, "host:1", at)
    progress = jobs.purge(rules, now, retention=RETENTION, batch_size=1)
    assert progress.other_rows == {"history_rows": 2}
    assert sorted((now - r.started_at).days for r in JobRun.select()) == [1, 6]


def test_purge_removes_sessions_that_ended_a_week_ago_with_their_refresh_tokens(rules, clock):
    """Sessions and refresh tokens do not only grow: an ended session (revoked, or expired) goes
    with its tokens a week later, in bounded batches; live sessions keep every token."""
    from server.domain.sessions import ENDED_SESSION_RETENTION, Sessions
    from server.infra.storage import RefreshToken, Session, User

    sessions = Sessions(3600, clock)
    user = User.get(User.id == ALICE.subject)
    for n in range(30):
        grant = sessions.start(user)
        token = grant.refresh_token
        for _ in range(n % 4):
            token = sessions.refresh(token).refresh_token
        if n % 3 == 0:
            sessions.revoke(grant.session_id, "logout")
    clock.advance(seconds=3600)  # all 30 have expired or were revoked
    live = sessions.start(user)
    sessions.refresh(live.refresh_token)
    quiet = jobs.purge(rules, clock.now, retention=RETENTION, batch_size=7, sessions=sessions)
    assert quiet.other_rows.get("session_rows", 0) == 0  # ended, but not a week ago yet
    later = clock.advance(seconds=ENDED_SESSION_RETENTION.total_seconds() + 1)
    progress = jobs.purge(rules, later, retention=RETENTION, batch_size=7, sessions=sessions)
    tokens = sum(1 + n % 4 for n in range(30))
    assert progress.other_rows["session_rows"] == 30 + tokens
    mine = Session.select().where((Session.user_id == ALICE.subject) & ~Session.id.startswith("ses_test_"))
    assert [s.id for s in mine] == [live.session_id]
    assert RefreshToken.select().where(RefreshToken.session_id == live.session_id).count() == 2
