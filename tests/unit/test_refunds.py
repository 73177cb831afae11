"""The refund rules on both databases: who may refund, what is refused and why, never more than the
amount, idempotent creates, the payment and its history after a refund, paging, and the purge."""

from __future__ import annotations

import datetime as dt

import pytest

from server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from server.domain.paging import PageTokens
from server.domain.payments import MAX_AMOUNT, PaymentDraft
from server.domain.records import DuplicateRequest
from server.domain.refunds import REASONS, RefundDraft, RefundRules
from server.domain.webhooks import payment_after
from server.infra import storage
from server.infra.storage.models import PaymentEvent, Refund
from tests.conftest import ADMIN_CALLER, ALICE, BOB

AMOUNT = 15000


@pytest.fixture
def refunds(rules):
    return RefundRules(page_tokens=PageTokens(b"test-page-token-secret"), queries=rules.queries, clock=rules.clock)


@pytest.fixture
def settled(rules):
    payment = rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=AMOUNT, currency="IDR"))
    rules.confirm(ADMIN_CALLER, payment.id)
    return payment.id


def refund(pid, amount=1000, **kw):
    return RefundDraft(payment_id=pid, amount=amount, reason=kw.pop("reason", "REQUESTED_BY_CUSTOMER"), **kw)


def failure(call, kind=FailedPrecondition):
    with pytest.raises(kind) as e:
        call()
    return e.value


# --- validation (no database) ------------------------------------------------------------

@pytest.mark.parametrize("kw, field, words", [
    (dict(amount=0), "refund.amount", "greater than 0"),
    (dict(amount=-5), "refund.amount", "greater than 0"),
    (dict(amount=MAX_AMOUNT + 1), "refund.amount", "at most"),
    (dict(reason=""), "refund.reason", "is required"),
    (dict(reason="7"), "refund.reason", "one of"),
    (dict(currency="idr"), "refund.currency", "upper case"),
    (dict(note="x" * 501), "refund.note", "at most 500"),
    (dict(request_id="has space"), "refund.request_id", "1-64"),
    (dict(expected_refunded_amount=-1), "expected_refunded_amount", "between 0"),
])
def test_each_bad_field_is_named_with_a_reason(kw, field, words):
    amount = kw.pop("amount", 1000)
    violations = refund("pay_x", amount, **kw).violations()
    assert [(f, d) for f, d in violations if f == field and words in d], violations


def test_the_boundaries_and_every_reason_are_accepted():
    for reason in REASONS:
        assert refund("pay_x", 1, reason=reason, note="x" * 500, request_id="r" * 64, currency="USD",
                      expected_refunded_amount=0).violations() == []
    assert refund("pay_x", MAX_AMOUNT).violations() == []


def test_the_fingerprint_covers_the_body_and_the_expectation():
    base = refund("pay_x", 10)
    others = [refund("pay_y", 10), refund("pay_x", 11), refund("pay_x", 10, reason="OTHER"),
              refund("pay_x", 10, note="n"), refund("pay_x", 10, currency="IDR"),
              refund("pay_x", 10, expected_refunded_amount=0)]
    assert len({base.fingerprint(), *(o.fingerprint() for o in others)}) == len(others) + 1
    assert refund("pay_x", 10, request_id="a").fingerprint() == refund("pay_x", 10, request_id="b").fingerprint()


# --- who may, and the refusals -----------------------------------------------------------

def test_only_an_admin_refunds(refunds, settled):
    assert failure(lambda: refunds.create(ALICE, refund(settled)), PermissionDenied).reason == "ADMIN_ONLY"
    assert refunds.create(ADMIN_CALLER, refund(settled)).amount == 1000


def test_bad_input_is_invalid_argument_and_refunds_nothing(refunds, rules, settled):
    e = failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, 0)), InvalidArgument)
    assert e.reason == "INVALID_REFUND" and e.violations[0][0] == "refund.amount"
    e = failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, 5, currency="USD")), InvalidArgument)
    assert e.reason == "CURRENCY_MISMATCH" and "IDR" in e.violations[0][1]
    assert rules.get(ADMIN_CALLER, settled).refunded_amount == 0


def test_a_payment_that_is_not_success_is_not_refunded(refunds, rules):
    pending = rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=AMOUNT)).id
    e = failure(lambda: refunds.create(ADMIN_CALLER, refund(pending)))
    assert e.reason == "PAYMENT_NOT_SETTLED" and e.metadata["status"] == "pending"
    rules.cancel(ALICE, pending)
    assert failure(lambda: refunds.create(ADMIN_CALLER, refund(pending))).reason == "PAYMENT_NOT_SETTLED"
    rules.delete(ALICE, pending)
    assert failure(lambda: refunds.create(ADMIN_CALLER, refund(pending)), NotFound).reason == "PAYMENT_NOT_FOUND"
    assert failure(lambda: refunds.create(ADMIN_CALLER, refund("pay_nope")), NotFound).reason == "PAYMENT_NOT_FOUND"
    assert not list(Refund.select())


def test_never_more_than_the_amount_and_the_reason_says_what_is_left(refunds, rules, settled):
    refunds.create(ADMIN_CALLER, refund(settled, 10000))
    e = failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, 5001)))
    assert e.reason == "REFUND_EXCEEDS_REMAINING" and e.metadata["remaining"] == "5000" and "only 5000 is left" in e.message
    last = refunds.create(ADMIN_CALLER, refund(settled, 5000))
    assert last.refunded_amount_after == AMOUNT
    e = failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, 1)))
    assert e.reason == "REFUND_EXCEEDS_REMAINING" and "nothing is left" in e.message
    payment = rules.get(ALICE, settled)
    assert (payment.status, payment.refunded_amount) == ("success", AMOUNT)


def test_the_expected_refunded_amount_is_checked_by_the_database(refunds, rules, settled):
    refunds.create(ADMIN_CALLER, refund(settled, 1000, expected_refunded_amount=0))
    e = failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, 1000, expected_refunded_amount=0)))
    assert e.reason == "REFUNDED_AMOUNT_CHANGED"
    assert (e.metadata["refunded_amount"], e.metadata["expected_refunded_amount"]) == ("1000", "0")
    assert refunds.create(ADMIN_CALLER, refund(settled, 1000, expected_refunded_amount=1000)).refunded_amount_after == 2000


def test_the_conditional_update_itself_refuses_an_overshoot(rules, settled):
    """The guard is the UPDATE's own condition, not a read before it: asked directly, it refuses."""
    now = rules.clock()
    with storage.db.atomic():
        assert rules.queries.add_refunded(settled, AMOUNT + 1, "IDR", None, now) is None
        assert rules.queries.add_refunded(settled, AMOUNT, "IDR", 1, now) is None
        assert rules.queries.add_refunded(settled, 1, "USD", None, now) is None
        assert rules.queries.add_refunded(settled, AMOUNT, "IDR", 0, now).refunded_amount == AMOUNT
        assert rules.queries.add_refunded(settled, 1, "IDR", None, now) is None


# --- what a refund leaves ------------------------------------------------------------------

def test_a_refund_is_recorded_with_who_when_and_the_payment_shows_it(refunds, rules, settled, clock):
    clock.advance(minutes=5)
    made = refunds.create(ADMIN_CALLER, refund(settled, 4000, note="one item back", reason="OTHER"))
    assert (made.payment_id, made.amount, made.currency, made.reason, made.note, made.created_by) == \
           (settled, 4000, "IDR", "OTHER", "one item back", ADMIN_CALLER.subject)
    assert made.created_at == clock.now and made.refunded_amount_after == 4000
    payment = rules.get(ALICE, settled)
    assert (payment.status, payment.refunded_amount, payment.updated_at) == ("success", 4000, clock.now)
    assert refunds.get(ALICE, settled, made.id) == made  # the owner reads it too


def test_each_refund_is_one_history_row_whose_payment_is_the_payment_after_it(refunds, rules, settled):
    first = refunds.create(ADMIN_CALLER, refund(settled, 4000))
    second = refunds.create(ADMIN_CALLER, refund(settled, 6000))
    events = rules.events(ALICE, settled).events
    assert [e.action for e in events] == ["created", "confirmed", "refunded", "refunded"]
    assert [(e.refund_id, e.refunded_amount) for e in events[2:]] == [(first.id, 4000), (second.id, 10000)]
    assert [(e.from_status, e.to_status, e.actor_id) for e in events[2:]] == [("success", "success", ADMIN_CALLER.subject)] * 2
    payment = rules.get(ALICE, settled)
    assert payment_after(payment, events[2]).refunded_amount == 4000
    assert payment_after(payment, events[3]) == payment
    assert payment_after(payment, events[1]).refunded_amount == 0
    assert [e.dispatched for e in PaymentEvent.select().where(PaymentEvent.payment_id == settled)] == [False] * 4


def test_a_refused_refund_writes_nothing(refunds, rules, settled):
    before = list(PaymentEvent.select().where(PaymentEvent.payment_id == settled))
    failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, AMOUNT + 1)))
    assert list(PaymentEvent.select().where(PaymentEvent.payment_id == settled)) == before
    assert not list(Refund.select())


def test_a_failed_insert_rolls_back_the_payments_update(refunds, rules, settled, monkeypatch):
    def clash(row):
        raise DuplicateRequest()

    monkeypatch.setattr(rules.queries, "insert_refund", clash)
    with pytest.raises(DuplicateRequest):
        refunds.create(ADMIN_CALLER, refund(settled, 1000))
    assert rules.get(ALICE, settled).refunded_amount == 0


# --- idempotency ---------------------------------------------------------------------------

def test_a_replay_answers_the_first_refund_and_refunds_nothing_more(refunds, rules, settled):
    first = refunds.create(ADMIN_CALLER, refund(settled, 1000, request_id="ret-1", expected_refunded_amount=0))
    again = refunds.create(ADMIN_CALLER, refund(settled, 1000, request_id="ret-1", expected_refunded_amount=0))
    assert again == first
    assert rules.get(ALICE, settled).refunded_amount == 1000
    e = failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, 2000, request_id="ret-1")), AlreadyExists)
    assert e.reason == "REQUEST_ID_CONFLICT"


def test_request_ids_belong_to_their_caller(refunds, rules, settled):
    other = ADMIN_CALLER.__class__(subject="usr_admin_2", email="a2@example.com", role=ADMIN_CALLER.role)
    refunds.create(ADMIN_CALLER, refund(settled, 1000, request_id="ret-1"))
    assert refunds.create(other, refund(settled, 1000, request_id="ret-1")).created_by == "usr_admin_2"
    assert rules.get(ALICE, settled).refunded_amount == 2000


def test_a_concurrent_retry_that_loses_the_insert_answers_as_a_replay(refunds, rules, settled, monkeypatch):
    """The two arrived together: both missed the earlier refund, the unique index let one in."""
    first = refunds.create(ADMIN_CALLER, refund(settled, 1000, request_id="ret-1"))
    answers = iter([None, first])  # the first look found nothing, the second the winner
    monkeypatch.setattr(rules.queries, "refund_by_request_id", lambda created_by, request_id: next(answers))
    assert refunds.create(ADMIN_CALLER, refund(settled, 1000, request_id="ret-1")) == first
    assert rules.get(ALICE, settled).refunded_amount == 1000


def test_a_retry_that_overlapped_the_first_call_answers_it_not_the_refusal_it_caused(refunds, rules, settled,
                                                                                    monkeypatch):
    """The first call committed after the retry's first look and before its conditional UPDATE: the
    UPDATE is refused (the expectation, or nothing left) by the first refund itself, so the retry
    must find that refund under the lock and answer it."""
    for n, (amount, expected) in enumerate([(1000, 0), (AMOUNT - 1000, None)]):
        request_id = f"overlap-{n}"
        first = refunds.create(ADMIN_CALLER, refund(settled, amount, request_id=request_id,
                                                    expected_refunded_amount=expected))
        real, looks = rules.queries.refund_by_request_id, []

        def look(created_by, rid, real=real, looks=looks):
            looks.append(rid)
            return None if len(looks) == 1 else real(created_by, rid)  # the first look came too early

        monkeypatch.setattr(rules.queries, "refund_by_request_id", look)
        again = refunds.create(ADMIN_CALLER, refund(settled, amount, request_id=request_id,
                                                    expected_refunded_amount=expected))
        monkeypatch.undo()
        assert again == first
    assert rules.get(ALICE, settled).refunded_amount == AMOUNT
    assert len(refunds.list(ADMIN_CALLER, settled).refunds) == 2


def test_an_expectation_no_reread_can_meet_is_invalid_argument(refunds, rules, settled):
    e = failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, 1, expected_refunded_amount=AMOUNT + 1)),
                InvalidArgument)
    assert e.reason == "INVALID_REFUND" and e.violations[0][0] == "expected_refunded_amount"
    assert rules.get(ALICE, settled).refunded_amount == 0
    refunds.create(ADMIN_CALLER, refund(settled, 1000))
    e = failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, 1, expected_refunded_amount=AMOUNT)),
                FailedPrecondition)  # within the amount: it may come true, so "read it again"
    assert e.reason == "REFUNDED_AMOUNT_CHANGED"


def test_a_refunds_time_is_never_before_the_payments_last_change(refunds, rules, settled, clock):
    """A replica whose clock is a little behind the one that confirmed: the refund's time, the
    history's and the payment's updated_at still only move forward."""
    confirmed = rules.get(ALICE, settled).updated_at
    clock.now = confirmed - dt.timedelta(milliseconds=5)
    made = refunds.create(ADMIN_CALLER, refund(settled))
    after = rules.get(ALICE, settled)
    assert made.created_at >= confirmed and after.updated_at >= confirmed
    times = [e.at for e in rules.events(ADMIN_CALLER, settled).events]
    assert times == sorted(times), times


# --- reads ---------------------------------------------------------------------------------

def test_reads_follow_the_payments_access_rules(refunds, settled):
    made = refunds.create(ADMIN_CALLER, refund(settled))
    assert failure(lambda: refunds.get(BOB, settled, made.id), NotFound).reason == "PAYMENT_NOT_FOUND"
    assert failure(lambda: refunds.list(BOB, settled), NotFound).reason == "PAYMENT_NOT_FOUND"
    assert failure(lambda: refunds.get(ALICE, settled, "ref_" + "a" * 26), NotFound).reason == "REFUND_NOT_FOUND"
    assert failure(lambda: refunds.get(ALICE, settled, "not-an-id"), NotFound).reason == "REFUND_NOT_FOUND"


def test_a_refund_of_another_payment_is_not_found_under_this_one(refunds, rules, settled):
    other = rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=AMOUNT)).id
    rules.confirm(ADMIN_CALLER, other)
    made = refunds.create(ADMIN_CALLER, refund(other))
    assert failure(lambda: refunds.get(ALICE, settled, made.id), NotFound).reason == "REFUND_NOT_FOUND"


def test_the_list_is_oldest_first_in_pages(refunds, settled):
    made = [refunds.create(ADMIN_CALLER, refund(settled, 100 + i)) for i in range(5)]
    seen, token = [], ""
    while True:
        page = refunds.list(ALICE, settled, page_size=2, page_token=token)
        seen += page.refunds
        token = page.next_page_token
        if not token:
            break
    assert seen == made
    e = failure(lambda: refunds.list(BOB, settled, page_token="x"), NotFound)  # access first
    assert e.reason == "PAYMENT_NOT_FOUND"
    e = failure(lambda: refunds.list(ADMIN_CALLER, settled, page_token=refunds.list(ALICE, settled, page_size=2)
                                     .next_page_token), InvalidArgument)
    assert e.reason == "INVALID_PAGE_TOKEN"  # another caller's token
    assert failure(lambda: refunds.list(ALICE, settled, page_size=101), InvalidArgument).reason == "INVALID_LIST_REQUEST"


# --- jobs ----------------------------------------------------------------------------------

def test_the_purge_never_removes_a_refunded_payment_or_its_refunds(refunds, rules, settled, clock):
    refunds.create(ADMIN_CALLER, refund(settled))
    assert failure(lambda: rules.delete(ADMIN_CALLER, settled)).reason == "PAYMENT_SETTLED"
    # Even a row forced into the purge's reach (deleted long ago) stays while it has refunds.
    storage.Payment.update(deleted_at=clock.now - dt.timedelta(days=90), status="failed").where(
        storage.Payment.id == settled).execute()
    assert rules.queries.purge([settled], clock.now) == []
    assert rules.queries.any(settled) is not None and len(list(Refund.select())) == 1


def test_the_metrics_hear_of_each_committed_refund_and_of_no_refused_one(rules, settled):
    heard = []
    refunds = RefundRules(page_tokens=PageTokens(b"test-page-token-secret"), queries=rules.queries,
                          clock=rules.clock, observe=lambda *args: heard.append(args))
    refunds.create(ADMIN_CALLER, refund(settled, 1000, request_id="ret-1"))
    refunds.create(ADMIN_CALLER, refund(settled, 1000, request_id="ret-1"))  # a replay: nothing new
    failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, AMOUNT)))
    assert heard == [("refunded", None, 1)]


def test_a_refund_refused_while_pending_but_settled_before_the_reason_is_read_is_made(refunds, rules, monkeypatch):
    """PostgreSQL: the UPDATE saw the payment pending, a confirm committed, the refusal's read sees it
    SUCCESS with room. Not a wrong reason ("exceeds what is left"): the refund comes after the confirm."""
    pid = rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=AMOUNT)).id
    real = rules.queries.add_refunded
    calls = []

    def confirmed_in_between(*args):
        calls.append(args)
        if len(calls) == 1:
            with storage.db.atomic():  # the confirm commits between the UPDATE and the read (a savepoint here)
                rules.confirm(ADMIN_CALLER, pid)
            return None
        return real(*args)

    monkeypatch.setattr(rules.queries, "add_refunded", confirmed_in_between)
    made = refunds.create(ADMIN_CALLER, refund(pid, 1000))
    assert made.refunded_amount_after == 1000 and len(calls) == 2
    assert rules.get(ALICE, pid).refunded_amount == 1000


def test_an_unexplained_second_refusal_asks_for_a_retry(refunds, rules, settled, monkeypatch):
    monkeypatch.setattr(rules.queries, "add_refunded", lambda *args: None)
    e = failure(lambda: refunds.create(ADMIN_CALLER, refund(settled, 1000)))
    assert e.reason == "PAYMENT_CHANGED"
