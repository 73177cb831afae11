"""Payments belong to accounts, settled money is never deleted, deletes can be undone, and a
replayed create gets the first answer. On both databases."""

from __future__ import annotations

import concurrent.futures
import datetime as dt

import pytest

from server.domain.caller import Caller

from server.infra import storage
from server.domain.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from server.domain.payments import FAILED, PENDING, SUCCESS, PaymentDraft
from server.domain.caller import CUSTOMER, Caller
from server.edge.servicers import payment_fields
from server.infra.storage import Payment, PaymentEvent, User
from tests.conftest import ADMIN_CALLER, ALICE, BOB


def draft(**kw) -> PaymentDraft:
    return PaymentDraft(**{"email": ALICE.email, "amount": 15000, **kw})


def account(user_id: str, email: str, created_at: dt.datetime) -> Caller:
    User.create(id=user_id, email=email, password_hash="!", role=CUSTOMER, created_at=created_at)
    return Caller(subject=user_id, email=email, role=CUSTOMER)


# --- ownership -------------------------------------------------------------------------------

def test_an_admins_payment_for_an_email_without_an_account_is_refused(rules):
    with pytest.raises(FailedPrecondition) as e:
        rules.create(ADMIN_CALLER, draft(email="nobody-yet@example.com"))
    assert e.value.reason == "NO_ACCOUNT"
    assert Payment.select().count() == 0


def test_a_payment_belongs_to_the_account_not_the_email(rules, clock):
    carol = account("usr_carol", "carol@example.com", clock())
    paid = rules.create(ADMIN_CALLER, draft(email=carol.email))
    assert paid.owner_id == carol.subject
    assert rules.get(carol, paid.id).id == paid.id
    # The account goes away and someone registers the same email again: a new account, no access.
    User.delete().where(User.id == carol.subject).execute()
    again = account("usr_carol_again", "carol@example.com", clock.advance(seconds=5))
    with pytest.raises(NotFound):
        rules.get(again, paid.id)
    assert rules.list(again).payments == []
    with pytest.raises(NotFound):
        rules.cancel(again, paid.id)
    # A token with the same email but another subject (a forged or stale claim) sees nothing either.
    with pytest.raises(NotFound):
        rules.get(Caller(subject="usr_other", email=carol.email, role=CUSTOMER), paid.id)


def test_payments_from_before_owners_go_to_accounts_that_existed_then(rules, clock, database):
    early = account("usr_early", "early@example.com", clock() - dt.timedelta(days=1))
    rows = {}
    for email in ("early@example.com", "late@example.com", "nobody@example.com"):
        made = rules.create(ALICE, draft(email=ALICE.email))
        Payment.update(email=email, owner_id=None).where(Payment.id == made.id).execute()
        rows[email] = made.id
    late = account("usr_late", "late@example.com", clock() + dt.timedelta(days=1))  # registered afterwards
    assert storage.backfill_owners() == 1
    owners = {p.email: p.owner_id for p in Payment.select()}
    assert owners == {"early@example.com": early.subject, "late@example.com": None, "nobody@example.com": None}
    assert rules.get(early, rows["early@example.com"]).id == rows["early@example.com"]
    with pytest.raises(NotFound):
        rules.get(late, rows["late@example.com"])
    assert rules.get(ADMIN_CALLER, rows["nobody@example.com"]).owner_id is None  # admins still see it
    assert storage.backfill_owners() == 0  # idempotent


# --- deletes that keep money ------------------------------------------------------------------

def test_a_payment_that_moved_money_is_never_deleted_nor_purged(rules, clock):
    paid = rules.create(ALICE, draft())
    rules.confirm(ADMIN_CALLER, paid.id)
    for who in (ALICE, ADMIN_CALLER):
        with pytest.raises(FailedPrecondition) as e:
            rules.delete(who, paid.id)
        assert e.value.reason == "PAYMENT_SETTLED"
    assert rules.get(ALICE, paid.id).status == SUCCESS
    # One deleted by the earlier bug stays too: the purge never takes a settled payment.
    Payment.update(deleted_at=clock() - dt.timedelta(days=90)).where(Payment.id == paid.id).execute()
    assert rules.purge_deleted(clock(), limit=100) == 0
    assert rules.undelete(ADMIN_CALLER, paid.id).status == SUCCESS


def test_pending_and_failed_payments_can_be_deleted_listed_and_undeleted(rules):
    pending = rules.create(ALICE, draft(amount=1))
    failed = rules.create(ALICE, draft(amount=2))
    rules.cancel(ALICE, failed.id)
    rules.delete(ALICE, pending.id)
    rules.delete(ADMIN_CALLER, failed.id)
    assert rules.list(ALICE).payments == []
    with pytest.raises(PermissionDenied) as e:
        rules.list(ALICE, show_deleted=True)
    assert e.value.reason == "SHOW_DELETED_FORBIDDEN"
    shown = rules.list(ADMIN_CALLER, show_deleted=True).payments
    assert {p.id for p in shown} == {pending.id, failed.id} and all(p.deleted_at for p in shown)
    with pytest.raises(PermissionDenied):
        rules.undelete(ALICE, pending.id)
    back = rules.undelete(ADMIN_CALLER, pending.id)
    assert back.deleted_at is None and back.status == PENDING
    assert rules.get(ALICE, pending.id).id == pending.id
    assert rules.undelete(ADMIN_CALLER, pending.id) == back  # a retry by the same admin: its first answer
    other_admin = Caller(subject="usr_other_admin", email="other-admin@example.com", role=ADMIN_CALLER.role)
    with pytest.raises(FailedPrecondition) as e:
        rules.undelete(other_admin, pending.id)
    assert e.value.reason == "PAYMENT_NOT_DELETED"
    with pytest.raises(NotFound):
        rules.undelete(ADMIN_CALLER, "pay_" + "a" * 26)
    # A page token of a show_deleted listing is not one of a plain listing.
    token = rules.list(ADMIN_CALLER, page_size=1, show_deleted=True).next_page_token
    assert token
    with pytest.raises(InvalidArgument) as e:
        rules.list(ADMIN_CALLER, page_size=1, page_token=token)
    assert e.value.reason == "INVALID_PAGE_TOKEN"


def attempt(rules, kind: str, pid: str, expire_at: dt.datetime | None = None) -> str:
    """One racing change: 'ok' if it happened, 'lost' if the payment had moved on."""
    try:
        if kind == "confirm":
            rules.confirm(ADMIN_CALLER, pid)
        elif kind == "cancel":
            rules.cancel(ALICE, pid)
        elif kind == "delete":
            rules.delete(ALICE, pid)
        else:
            return "ok" if rules.expire_due(expire_at, ids=[pid]) else "lost"
        return "ok"
    except (FailedPrecondition, NotFound):
        return "lost"


def test_a_confirm_racing_a_delete_has_one_outcome(rules):
    ids = [rules.create(ALICE, draft(amount=100 + i)).id for i in range(30)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda job: attempt(rules, *job), [(k, pid) for pid in ids for k in ("confirm", "delete")]))
    for pid, (confirmed, deleted) in zip(ids, zip(outcomes[::2], outcomes[1::2])):
        row = Payment.get_by_id(pid)
        assert (confirmed, deleted) in {("ok", "lost"), ("lost", "ok")}, (pid, confirmed, deleted)
        if confirmed == "ok":
            assert row.status == SUCCESS and row.deleted_at is None
        else:
            assert row.status == PENDING and row.deleted_at is not None
    storage.end_call()


# --- replays get the first answer -------------------------------------------------------------

def test_a_replay_after_a_confirm_returns_the_first_answer(rules, clock):
    first = rules.create(ALICE, draft(request_id="order-77"))
    clock.advance(seconds=30)
    rules.confirm(ADMIN_CALLER, first.id)
    again = rules.create(ALICE, draft(request_id="order-77"))
    assert payment_fields(again) == payment_fields(first)  # the answer a client gets, field for field
    assert again.status == PENDING and again.updated_at == again.created_at
    assert rules.get(ALICE, first.id).status == SUCCESS  # the payment itself moved on
    cancelled = rules.create(BOB, draft(email=BOB.email, request_id="order-78"))
    rules.cancel(BOB, cancelled.id)
    assert rules.create(BOB, draft(email=BOB.email, request_id="order-78")).status == PENDING
    assert rules.get(BOB, cancelled.id).status == FAILED


# --- the history ------------------------------------------------------------------------------

def actions(rules, caller, pid) -> list[tuple[str, str, str]]:
    page = rules.events(caller, pid, page_size=100)
    return [(e.action, e.actor_role, e.to_status) for e in page.events]


def test_every_change_is_one_event_in_order_with_who_made_it(rules, clock):
    paid = rules.create(ALICE, draft(amount=1))
    clock.advance(seconds=1)
    rules.confirm(ADMIN_CALLER, paid.id)
    cancelled = rules.create(ALICE, draft(amount=2))
    rules.cancel(ALICE, cancelled.id)
    rules.delete(ALICE, cancelled.id)
    rules.undelete(ADMIN_CALLER, cancelled.id)
    overdue = rules.create(ALICE, draft(amount=3))
    assert rules.expire_due(clock() + rules.payment_ttl + dt.timedelta(seconds=1)) == 1
    assert actions(rules, ALICE, paid.id) == [("created", "customer", PENDING), ("confirmed", "admin", SUCCESS)]
    assert actions(rules, ALICE, cancelled.id) == [("created", "customer", PENDING), ("cancelled", "customer", FAILED),
                                                   ("deleted", "customer", FAILED), ("undeleted", "admin", FAILED)]
    assert actions(rules, ALICE, overdue.id) == [("created", "customer", PENDING), ("expired", "system", FAILED)]
    [created, confirmed] = rules.events(ALICE, paid.id).events
    assert confirmed.actor_id == ADMIN_CALLER.subject and confirmed.from_status == PENDING
    assert confirmed.at > created.at
    # Paged, and only the payment's own readers: someone else's payment's history is NOT_FOUND.
    first = rules.events(ALICE, cancelled.id, page_size=3)
    rest = rules.events(ALICE, cancelled.id, page_size=3, page_token=first.next_page_token)
    assert [e.action for e in first.events + rest.events] == ["created", "cancelled", "deleted", "undeleted"]
    assert rest.next_page_token == ""
    with pytest.raises(NotFound):
        rules.events(BOB, paid.id)
    with pytest.raises(InvalidArgument) as e:
        rules.events(ALICE, paid.id, page_token=first.next_page_token)  # another payment's token
    assert e.value.reason == "INVALID_PAGE_TOKEN"


def test_a_purged_payment_takes_its_history_and_a_rolled_back_change_leaves_none(rules, clock):
    gone = rules.create(ALICE, draft())
    rules.delete(ALICE, gone.id)
    assert rules.purge_deleted(clock() + dt.timedelta(seconds=1), limit=10) == 1
    assert PaymentEvent.select().where(PaymentEvent.payment_id == gone.id).count() == 0
    kept = rules.create(ALICE, draft(amount=7))
    with pytest.raises(RuntimeError):
        with storage.db.atomic():
            rules.cancel(ALICE, kept.id)
            raise RuntimeError("the caller's transaction fails after the change")
    assert actions(rules, ALICE, kept.id) == [("created", "customer", PENDING)]
    assert rules.get(ALICE, kept.id).status == PENDING


def test_racing_confirm_cancel_expiry_and_delete_leave_one_event_per_change(rules, clock):
    ids = [rules.create(ALICE, draft(amount=200 + i)).id for i in range(25)]
    later = clock() + rules.payment_ttl + dt.timedelta(seconds=1)

    jobs = [(kind, pid) for pid in ids for kind in ("confirm", "cancel", "delete", "expire")]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda job: attempt(rules, *job, expire_at=later), jobs))
    for pid in ids:
        row = Payment.get_by_id(pid)
        events = [e.action for e in PaymentEvent.select().where(PaymentEvent.payment_id == pid)
                  .order_by(PaymentEvent.number)]
        assert events[0] == "created" and events.count("created") == 1
        settles = [a for a in events if a in ("confirmed", "cancelled", "expired")]
        expected = {SUCCESS: ["confirmed"], PENDING: []}.get(row.status, [row.failure_reason])
        assert settles == expected, (pid, row.status, row.failure_reason, events)
        assert events.count("deleted") == (1 if row.deleted_at else 0), (pid, events)
        assert not (row.status == SUCCESS and row.deleted_at), pid
    storage.end_call()
