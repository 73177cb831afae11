"""The payment rules on both databases: validation, ownership, lifecycle, idempotency, paging."""

import datetime as dt

import pytest

from server.domain.caller import Caller

from server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from server.domain.payments import MAX_AMOUNT, PaymentDraft, new_payment_id
from server.infra.storage import Payment
from tests.conftest import ADMIN_CALLER, ALICE, BOB


def draft(**kw):
    base = dict(email="alice@example.com", amount=15000)
    base.update(kw)
    return PaymentDraft(**base)


# --- validation (no database) ------------------------------------------------------------

def test_validated_normalizes_email_and_defaults_currency():
    d = draft(email="  Alice@Example.COM ").validated()
    assert d.email == "alice@example.com" and d.currency == "IDR"


@pytest.mark.parametrize("kw, field, words", [
    (dict(email=""), "payment.email", "required"),
    (dict(email="not-an-email"), "payment.email", "not a valid email"),
    (dict(email="a@" + "b" * 250 + ".com"), "payment.email", "at most 254"),
    (dict(amount=0), "payment.amount", "greater than 0"),
    (dict(amount=-5), "payment.amount", "greater than 0"),
    (dict(amount=MAX_AMOUNT + 1), "payment.amount", "at most"),
    (dict(currency="XXX"), "payment.currency", "ISO 4217"),
    (dict(currency="idr"), "payment.currency", "upper case"),
    (dict(description="x" * 501), "payment.description", "at most 500"),
    (dict(request_id="has space"), "payment.request_id", "1-64"),
    (dict(request_id="r" * 65), "payment.request_id", "1-64"),
])
def test_each_bad_field_is_named_with_a_reason(kw, field, words):
    with pytest.raises(InvalidArgument) as e:
        draft(**kw).validated()
    assert e.value.reason == "INVALID_PAYMENT"
    assert [(f, d) for f, d in e.value.violations if f == field and words in d], e.value.violations


def test_all_bad_fields_are_reported_at_once():
    with pytest.raises(InvalidArgument) as e:
        draft(email="x", amount=0, currency="ZZZ").validated()
    assert {f for f, _ in e.value.violations} == {"payment.email", "payment.amount", "payment.currency"}


def test_boundaries_are_accepted():
    assert draft(amount=1).validated().amount == 1
    assert draft(amount=MAX_AMOUNT, description="x" * 500, request_id="a" * 64, currency="USD").validated()


def test_ids_are_opaque_random_and_unique():
    ids = {new_payment_id() for _ in range(2000)}
    assert len(ids) == 2000
    assert all(i.startswith("pay_") and len(i) == 30 for i in ids)


def test_fingerprint_depends_on_the_body_only():
    assert draft(request_id="a").validated().fingerprint() == draft(request_id="b").validated().fingerprint()
    assert draft().validated().fingerprint() != draft(amount=15001).validated().fingerprint()


# --- create and read ---------------------------------------------------------------------

def test_create_makes_a_pending_payment_with_expiry(rules, clock):
    p = rules.create(ALICE, draft(description="Order 1"))
    assert (p.status, p.currency, p.email, p.description) == ("pending", "IDR", "alice@example.com", "Order 1")
    assert p.created_at == p.updated_at == clock.now
    assert p.expires_at == clock.now + dt.timedelta(hours=1)
    stored = rules.get(ALICE, p.id)
    assert stored.created_at == clock.now and stored.amount == 15000


def test_customer_creates_only_for_own_email(rules):
    with pytest.raises(PermissionDenied):
        rules.create(ALICE, draft(email="bob@example.com"))
    assert rules.create(ADMIN_CALLER, draft(email="bob@example.com")).email == "bob@example.com"


def test_other_customers_payment_is_not_found_like_a_missing_one(rules):
    p = rules.create(ALICE, draft())
    with pytest.raises(NotFound) as theirs:
        rules.get(BOB, p.id)
    with pytest.raises(NotFound) as missing:
        rules.get(BOB, new_payment_id())
    assert theirs.value.reason == missing.value.reason == "PAYMENT_NOT_FOUND"
    assert rules.get(ADMIN_CALLER, p.id).id == p.id


@pytest.mark.parametrize("bad_id", ["", "nope", "pay_", "'; DROP TABLE payments; --", "pay_" + "A" * 26])
def test_malformed_ids_are_not_found(rules, bad_id):
    with pytest.raises(NotFound):
        rules.get(ADMIN_CALLER, bad_id)


# --- idempotency -------------------------------------------------------------------------

def test_same_request_id_same_body_returns_the_first_payment(rules):
    first = rules.create(ALICE, draft(request_id="order-1"))
    again = rules.create(ALICE, draft(request_id="order-1", email="ALICE@example.com"))
    assert again.id == first.id
    assert Payment.select().count() == 1


def test_same_request_id_other_body_is_a_conflict(rules):
    rules.create(ALICE, draft(request_id="order-1"))
    with pytest.raises(AlreadyExists) as e:
        rules.create(ALICE, draft(request_id="order-1", amount=99))
    assert e.value.reason == "REQUEST_ID_CONFLICT" and "different body" in e.value.message
    assert Payment.select().count() == 1


def test_request_ids_are_scoped_to_the_caller(rules):
    a = rules.create(ADMIN_CALLER, draft(request_id="same"))
    b = rules.create(ALICE, draft(request_id="same"))
    assert a.id != b.id


def test_without_request_id_every_create_is_new(rules):
    assert rules.create(ALICE, draft()).id != rules.create(ALICE, draft()).id


def test_a_first_create_reads_nothing_before_it_writes(rules, monkeypatch):
    from server.infra.storage import fastpath

    sent = []
    execute = fastpath._run
    monkeypatch.setattr(fastpath, "_run", lambda sql, *rest: sent.append(sql.lstrip().split()[0].upper())
                        or execute(sql, *rest))
    first = rules.create(ALICE, draft(request_id="order-1"))
    assert "SELECT" not in sent and sent.count("INSERT") >= 1
    sent.clear()
    assert rules.create(ALICE, draft(request_id="order-1")).id == first.id  # the retry: refused, then read
    assert "SELECT" in sent


def test_bursts_of_concurrent_retries_each_make_one_payment_and_no_error(rules):
    import concurrent.futures

    from server.infra import storage

    def create(request_id):
        try:
            return rules.create(ALICE, draft(request_id=request_id)).id
        finally:
            storage.end_call()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for n in range(10):  # the write-lock wait this guards against showed within 10 rounds
            ids = set(pool.map(create, [f"burst-{n}"] * 48))
            assert len(ids) == 1
    assert Payment.select().count() == 10


def test_an_admins_retry_is_answered_after_the_email_left_its_account(rules):
    from server.infra.storage import User

    first = rules.create(ADMIN_CALLER, draft(request_id="order-1"))
    User.update(email="alice-elsewhere@example.com").where(User.email == "alice@example.com").execute()
    assert rules.create(ADMIN_CALLER, draft(request_id="order-1")) == first
    with pytest.raises(FailedPrecondition) as e:
        rules.create(ADMIN_CALLER, draft(request_id="order-2"))
    assert e.value.reason == "NO_ACCOUNT"


def test_replay_of_a_deleted_payment_says_so(rules):
    p = rules.create(ALICE, draft(request_id="order-1"))
    rules.delete(ALICE, p.id)
    with pytest.raises(FailedPrecondition) as e:
        rules.create(ALICE, draft(request_id="order-1"))
    assert e.value.reason == "PAYMENT_DELETED"


# --- lifecycle ---------------------------------------------------------------------------

def test_confirm_moves_pending_to_success(rules, clock):
    p = rules.create(ALICE, draft())
    clock.advance(minutes=5)
    done = rules.confirm(ADMIN_CALLER, p.id)
    assert (done.status, done.failure_reason, done.updated_at) == ("success", None, clock.now)


def test_a_change_is_never_stamped_before_the_payments_previous_one(rules, clock):
    """Two replicas' clocks can differ by milliseconds: a change decided under the lock by the one
    whose clock is behind takes the previous change's time, so the history stays in time order."""
    p = rules.create(ALICE, draft())
    clock.advance(seconds=10)
    rules.delete(ADMIN_CALLER, p.id)
    deleted_at = clock.now
    clock.advance(seconds=-3)  # the next call lands on a replica whose clock is behind
    back = rules.undelete(ADMIN_CALLER, p.id)
    assert back.updated_at == deleted_at
    clock.advance(seconds=-1)
    done = rules.cancel(ALICE, p.id)
    assert done.updated_at == deleted_at
    clock.advance(seconds=60)  # a clock past the previous change is taken as it is
    rules.delete(ADMIN_CALLER, p.id)
    assert rules.undelete(ADMIN_CALLER, p.id).updated_at == clock.now


def test_only_admins_confirm(rules):
    p = rules.create(ALICE, draft())
    with pytest.raises(PermissionDenied):
        rules.confirm(ALICE, p.id)
    assert rules.get(ALICE, p.id).status == "pending"


def test_cancel_moves_pending_to_failed_cancelled(rules):
    p = rules.create(ALICE, draft())
    done = rules.cancel(ALICE, p.id)
    assert (done.status, done.failure_reason) == ("failed", "cancelled")


OTHER_ADMIN = Caller(subject="usr_other_admin", email="other-admin@example.com", role=ADMIN_CALLER.role)


@pytest.mark.parametrize("first, second", [("confirm", "cancel"), ("cancel", "confirm")])
def test_leaving_pending_happens_once_and_names_the_current_status(rules, first, second):
    p = rules.create(ALICE, draft())
    getattr(rules, first)(ADMIN_CALLER, p.id)
    with pytest.raises(FailedPrecondition) as e:
        getattr(rules, second)(ADMIN_CALLER, p.id)
    status = "success" if first == "confirm" else "failed"
    assert e.value.reason == "PAYMENT_NOT_PENDING"
    assert f"is {status}" in e.value.message and e.value.metadata["status"] == status


@pytest.mark.parametrize("op", ["confirm", "cancel"])
def test_a_retry_by_the_caller_who_made_the_change_gets_its_outcome_and_another_caller_the_error(rules, clock, op):
    p = rules.create(ALICE, draft())
    first = getattr(rules, op)(ADMIN_CALLER, p.id)
    clock.advance(seconds=5)
    again = getattr(rules, op)(ADMIN_CALLER, p.id)  # the answer was lost; the client retries
    assert again == first  # the payment as the first call left it, nothing changed twice
    assert [e.action for e in rules.events(ADMIN_CALLER, p.id).events] == ["created", "confirmed" if op == "confirm" else "cancelled"]
    with pytest.raises(FailedPrecondition) as e:
        getattr(rules, op)(OTHER_ADMIN, p.id)
    assert e.value.reason == "PAYMENT_NOT_PENDING"


def test_an_overdue_payment_cannot_be_confirmed_and_is_expired(rules, clock):
    p = rules.create(ALICE, draft())
    clock.advance(hours=1)
    with pytest.raises(FailedPrecondition) as e:
        rules.confirm(ADMIN_CALLER, p.id)
    assert e.value.reason == "PAYMENT_EXPIRED"
    now = rules.get(ALICE, p.id)
    assert (now.status, now.failure_reason, now.updated_at) == ("failed", "expired", clock.now)


def test_expire_due_touches_only_overdue_pending(rules, clock):
    overdue = rules.create(ALICE, draft())
    confirmed = rules.create(ALICE, draft())
    rules.confirm(ADMIN_CALLER, confirmed.id)
    clock.advance(minutes=30)
    fresh = rules.create(ALICE, draft())
    clock.advance(minutes=31)
    assert rules.expire_due(clock.now) == 1
    assert rules.get(ALICE, overdue.id).failure_reason == "expired"
    assert rules.get(ALICE, confirmed.id).status == "success"
    assert rules.get(ALICE, fresh.id).status == "pending"
    assert rules.expire_due(clock.now) == 0


def test_expire_due_respects_the_batch_limit(rules, clock):
    for _ in range(5):
        rules.create(ALICE, draft())
    clock.advance(hours=2)
    assert rules.expire_due(clock.now, limit=2) == 2
    assert rules.expire_due(clock.now, limit=2) == 2
    assert rules.expire_due(clock.now, limit=2) == 1


# --- delete ------------------------------------------------------------------------------

def test_delete_is_soft_and_hides_the_payment(rules, clock):
    p = rules.create(ALICE, draft())
    rules.delete(ALICE, p.id)
    rules.delete(ALICE, p.id)  # a retry by the caller who deleted it succeeds again, and records nothing
    assert [e.action for e in rules.events(ADMIN_CALLER, p.id).events] == ["created", "deleted"]
    for op in (rules.get, rules.cancel):
        with pytest.raises(NotFound):
            op(ALICE, p.id)
    with pytest.raises(NotFound):
        rules.delete(ADMIN_CALLER, p.id)  # anyone else: it is gone
    assert rules.list(ADMIN_CALLER).payments == []
    row = Payment.get_by_id(p.id)
    assert row.deleted_at == clock.now  # the row stays until the retention job purges it


def test_customer_cannot_delete_anothers_payment(rules):
    p = rules.create(ALICE, draft())
    with pytest.raises(NotFound):
        rules.delete(BOB, p.id)
    assert rules.get(ALICE, p.id)


# --- listing -----------------------------------------------------------------------------

def _seed(rules, clock, n, caller=ALICE, **kw):
    made = []
    for _ in range(n):
        made.append(rules.create(caller, draft(email=caller.email if caller is not ADMIN_CALLER else "alice@example.com", **kw)).id)
        clock.advance(seconds=1)
    return made


def test_list_is_newest_first_in_pages_that_cover_everything_once(rules, clock):
    ids = _seed(rules, clock, 7)
    seen, token, pages = [], "", 0
    while True:
        page = rules.list(ALICE, page_size=3, page_token=token)
        seen += [p.id for p in page.payments]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(ids)) and pages == 3


def test_rows_created_in_the_same_microsecond_are_neither_lost_nor_repeated(rules, clock):
    same = [rules.create(ALICE, draft()).id for _ in range(5)]  # clock does not move
    got, token = [], ""
    for _ in range(5):
        page = rules.list(ALICE, page_size=2, page_token=token)
        got += [p.id for p in page.payments]
        token = page.next_page_token
        if not token:
            break
    assert sorted(got) == sorted(same) and len(got) == 5


def test_exact_multiple_of_page_size_has_no_empty_last_page(rules, clock):
    _seed(rules, clock, 4)
    first = rules.list(ALICE, page_size=2)
    second = rules.list(ALICE, page_size=2, page_token=first.next_page_token)
    assert len(second.payments) == 2 and second.next_page_token == ""


def test_default_and_max_page_size(rules, clock):
    _seed(rules, clock, 25)
    assert len(rules.list(ALICE).payments) == 20
    assert len(rules.list(ALICE, page_size=100).payments) == 25


@pytest.mark.parametrize("kw, field", [(dict(page_size=101), "page_size"), (dict(page_size=-1), "page_size"),
                                      (dict(status="refunded"), "status"), (dict(email="nope"), "email")])
def test_bad_list_arguments(rules, kw, field):
    with pytest.raises(InvalidArgument) as e:
        rules.list(ADMIN_CALLER, **kw)
    assert e.value.violations[0][0] == field


def test_filters_and_visibility(rules, clock):
    _seed(rules, clock, 2, ALICE)
    bob_ids = _seed(rules, clock, 3, BOB)
    rules.cancel(BOB, bob_ids[0])
    assert {p.email for p in rules.list(BOB).payments} == {"bob@example.com"}
    assert len(rules.list(ADMIN_CALLER).payments) == 5
    assert len(rules.list(ADMIN_CALLER, email="BOB@example.com").payments) == 3
    assert [p.id for p in rules.list(BOB, status="failed").payments] == [bob_ids[0]]
    assert len(rules.list(ADMIN_CALLER, status="pending").payments) == 4
    assert len(rules.list(BOB, email="bob@example.com").payments) == 3
    with pytest.raises(PermissionDenied):
        rules.list(BOB, email="alice@example.com")


def test_a_token_cannot_be_reused_with_other_filters_or_by_another_caller(rules, clock):
    _seed(rules, clock, 3)
    token = rules.list(ADMIN_CALLER, page_size=1).next_page_token
    with pytest.raises(InvalidArgument):
        rules.list(ADMIN_CALLER, page_size=1, page_token=token, status="pending")
    with pytest.raises(InvalidArgument):
        rules.list(ALICE, page_size=1, page_token=token)
    assert rules.list(ADMIN_CALLER, page_size=1, page_token=token).payments
