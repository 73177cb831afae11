"""The refund rules: money given back for a settled payment, never more than was paid.

A refund is a record of money that has gone back, made once the merchant has given it back, so
it has no states of its own (docs/api.md says why): it exists, complete, or it does not.

Never more than was paid, under any race: the payment's refunded_amount grows in one conditional
UPDATE (storage's add_refunded: only a live SUCCESS payment in the refund's currency whose total
stays at most its amount, and equals `expected_refunded_amount` when the caller gave one), in the
transaction that also writes the refund and its history row (which is the webhook event
payment.refunded). The database decides between concurrent refunds; a refused one changes
nothing, and is explained by reading the payment afterwards (its refunded total only ever grows,
and SUCCESS is final, so the explanation still holds when it is read).

Retries: a create with a `request_id` the same caller used before, with the same body, answers
the first refund and refunds nothing more (the same request_id with another body is
REQUEST_ID_CONFLICT), also when the two arrive at once: the retry looks for the first refund
again under the payment's lock, where the first one has committed or not begun (and the unique
index decides between the same request_id used at once on two payments).

Times: a refund's time is read under the payment's lock and is never before the payment's
updated_at, so a payment's history times, its refunds' order and its updated_at only move forward.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from server.domain.caller import Caller
from server.domain import idempotency
from server.domain.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from server.domain.ids import opaque_id
from server.domain.lifecycle import SUCCESS
from server.domain.paging import DEFAULT_PAGE_SIZE, PageTokens, invalid_page_size
from server.domain.permissions import PAYMENTS_REFUND
from server.domain.payments import MAX_AMOUNT, not_found
from server.domain.ports import Clock, PaymentStore
from server.domain.records import DuplicateRequest, PaymentRecord, RefundRecord
from server.domain.validation import PAYMENT_ID, REQUEST_ID

REFUNDED = "refunded"  # the history's action, and what observe() hears
# Why the money went back: the API's Refund.Reason names, stored as they are.
REASONS = ("REQUESTED_BY_CUSTOMER", "DUPLICATE", "FRAUDULENT", "OTHER")
MAX_NOTE = 500
REFUND_ID = re.compile(r"ref_[a-z2-7]{26}", re.ASCII)


@dataclasses.dataclass(frozen=True)
class RefundDraft:
    """What a caller asks to refund, before validation. `expected_refunded_amount` None: no check."""

    payment_id: str
    amount: int
    reason: str
    currency: str = ""
    note: str = ""
    request_id: str = ""
    expected_refunded_amount: int | None = None

    def violations(self) -> list[tuple[str, str]]:
        out = []
        if self.amount <= 0:
            out.append(("refund.amount", "must be greater than 0 (an integer count of the currency's minor unit)"))
        elif self.amount > MAX_AMOUNT:
            out.append(("refund.amount", f"must be at most {MAX_AMOUNT}"))
        if self.reason not in REASONS:
            out.append(("refund.reason", "is required: one of " + ", ".join(REASONS)))
        if self.currency and not (len(self.currency) == 3 and self.currency.isascii() and self.currency.isupper()):
            out.append(("refund.currency", "must be the payment's ISO 4217 currency code in upper case, or left out"))
        if len(self.note) > MAX_NOTE:
            out.append(("refund.note", f"must be at most {MAX_NOTE} characters"))
        if self.request_id and not REQUEST_ID.fullmatch(self.request_id):
            out.append(("refund.request_id", "must be 1-64 characters of A-Z a-z 0-9 . _ : -"))
        expected = self.expected_refunded_amount
        if expected is not None and not 0 <= expected <= MAX_AMOUNT:
            out.append(("expected_refunded_amount", f"must be between 0 and {MAX_AMOUNT}"))
        return out

    def fingerprint(self) -> str:
        """What makes two refunds 'the same body' for idempotency."""
        return idempotency.fingerprint(self.payment_id, self.amount, self.currency, self.reason, self.note,
                                       self.expected_refunded_amount)


@dataclasses.dataclass(frozen=True)
class RefundPage:
    refunds: list[RefundRecord]
    next_page_token: str


def refund_not_found(payment_id: str, refund_id: str) -> NotFound:
    return NotFound(f"refund {refund_id!r} of payment {payment_id!r} not found", reason="REFUND_NOT_FOUND",
                    metadata={"id": refund_id, "payment_id": payment_id})


def _refund_event(refund: RefundRecord, caller: Caller) -> dict:
    # dispatched=False: the history row is also the webhook outbox's event (payment.refunded).
    return {"id": opaque_id("evt_"), "payment_id": refund.payment_id, "at": refund.created_at, "action": REFUNDED,
            "from_status": SUCCESS, "to_status": SUCCESS, "failure_reason": None, "actor_id": caller.subject,
            "actor_role": caller.role, "dispatched": False, "refund_id": refund.id,
            "refunded_amount": refund.refunded_amount_after}


class RefundRules:
    """Create, list and read a payment's refunds, each checked against the caller. The assembly
    (server/edge/app.py) hands them the payments' store and clock (server/domain/ports.py)."""

    def __init__(self, *, page_tokens: PageTokens, queries: PaymentStore, clock: Clock,
                 observe: Callable[[str, str | None, int], None] = lambda event, reason, count: None):
        self.page_tokens = page_tokens
        self.queries = queries
        self.clock = clock
        self.observe = observe

    # --- reads -----------------------------------------------------------------------------

    def _payment(self, caller: Caller, payment_id: str) -> PaymentRecord:
        """The payment's own access rules (server/domain/payments.py get): its owner, admins and
        service clients (whose permission the interceptor checked)."""
        if not PAYMENT_ID.fullmatch(payment_id or ""):
            raise not_found(payment_id)
        row = self.queries.live(payment_id, owner_id=None if caller.reaches_all else caller.subject)
        if row is None:
            raise not_found(payment_id)
        return row

    def get(self, caller: Caller, payment_id: str, refund_id: str) -> RefundRecord:
        self._payment(caller, payment_id)
        refund = self.queries.refund(payment_id, refund_id) if REFUND_ID.fullmatch(refund_id or "") else None
        if refund is None:
            raise refund_not_found(payment_id, refund_id)
        return refund

    def list(self, caller: Caller, payment_id: str, *, page_size: int = 0, page_token: str = "") -> RefundPage:
        """Oldest first, paged like the payments."""
        if (violation := invalid_page_size(page_size)) is not None:
            raise InvalidArgument([violation], reason="INVALID_LIST_REQUEST")
        self._payment(caller, payment_id)
        size, now = page_size or DEFAULT_PAGE_SIZE, self.clock()
        scope = self.page_tokens.scope(caller.subject, caller.role, "refunds", payment_id)
        after = self.page_tokens.decode_number(page_token, scope, now) if page_token else None
        rows = self.queries.refunds(payment_id, after_total=after, limit=size + 1)
        return RefundPage(*self.page_tokens.cut(
            rows, size, lambda last: (last.created_at, str(last.refunded_amount_after)), scope, now))

    # --- the one write -----------------------------------------------------------------------

    def create(self, caller: Caller, draft: RefundDraft) -> RefundRecord:
        if not caller.may(PAYMENTS_REFUND):
            raise PermissionDenied("only admins and service clients with payments.refund may refund payments", reason="ADMIN_ONLY")
        if not PAYMENT_ID.fullmatch(draft.payment_id or ""):
            raise not_found(draft.payment_id)
        if violations := draft.violations():
            raise InvalidArgument(violations, reason="INVALID_REFUND")
        fingerprint = draft.fingerprint()
        if draft.request_id:
            earlier = self.queries.refund_by_request_id(caller.subject, draft.request_id)
            if earlier is not None:
                return self._replay(earlier, fingerprint, draft.request_id)
        # Read outside the transaction: a payment's currency and amount never change.
        payment = self.queries.live(draft.payment_id)
        if payment is None:
            raise not_found(draft.payment_id)
        expected = draft.expected_refunded_amount
        if expected is not None and expected > payment.amount:
            # No reread can meet it: a caller's mistake, not a change it missed.
            raise InvalidArgument([("expected_refunded_amount",
                                    f"must be at most the payment's amount, {payment.amount}")],
                                  reason="INVALID_REFUND")
        currency = draft.currency or payment.currency
        try:
            # Under the payment's lock (queries.locked; BEGIN IMMEDIATE on SQLite): a retry that
            # overlapped the first call finds its refund here, committed, and answers it rather
            # than a refusal the first refund caused; and the time is read in the order the lock
            # imposes, never before the payment's last change, so the history's times follow its order.
            with self.queries.locked(draft.payment_id) as current:
                if draft.request_id:
                    earlier = self.queries.refund_by_request_id(caller.subject, draft.request_id)
                    if earlier is not None:
                        return self._replay(earlier, fingerprint, draft.request_id)
                now = self.clock()
                if current is not None and current.updated_at > now:
                    now = current.updated_at  # another replica's clock a little ahead
                after = self._add_refunded(draft, currency, now)
                refund = RefundRecord(
                    id=opaque_id("ref_"), payment_id=draft.payment_id, amount=draft.amount, currency=currency,
                    reason=draft.reason, note=draft.note, created_by=caller.subject,
                    request_id=draft.request_id or None, request_hash=fingerprint if draft.request_id else None,
                    created_at=now, refunded_amount_after=after.refunded_amount)
                self.queries.insert_refund(refund)
                self.queries.insert_events([_refund_event(refund, caller)])
        except DuplicateRequest:
            # The same request_id used at once on another payment won the insert; this one rolled back whole.
            earlier = idempotency.winner(lambda rid: self.queries.refund_by_request_id(caller.subject, rid),
                                         draft.request_id)
            return self._replay(earlier, fingerprint, draft.request_id)
        self.observe(REFUNDED, None, 1)
        return refund

    @staticmethod
    def _replay(earlier: RefundRecord, fingerprint: str, request_id: str) -> RefundRecord:
        """A refund is never changed, so the first answer is the refund as it is."""
        idempotency.same_request(earlier.request_hash, fingerprint, request_id, "a refund")
        return earlier

    def _add_refunded(self, draft: RefundDraft, currency: str, now) -> PaymentRecord:
        """The conditional UPDATE, and the refusal that explains it when it changed nothing.

        The refusal is read after the UPDATE, and one change can make a refused refund possible
        in between: the confirm that settles the payment (PostgreSQL's UPDATE saw it pending, the
        read sees it SUCCESS). Then the UPDATE runs again, as if the refund had come after the
        confirm, which is one order of the two calls; nothing else undoes a reason to refuse (the
        refunded total only grows, SUCCESS is final and never deleted), so a second refusal is
        always explained."""
        for _ in range(2):
            after = self.queries.add_refunded(draft.payment_id, draft.amount, currency,
                                              draft.expected_refunded_amount, now)
            if after is not None:
                return after
            refusal = self._refusal(draft, currency)
            if refusal is not None:
                raise refusal
        raise FailedPrecondition(f"payment {draft.payment_id!r} changed while this refund was decided: retry it",
                                 reason="PAYMENT_CHANGED", metadata={"id": draft.payment_id})

    def _refusal(self, draft: RefundDraft, currency: str) -> Exception | None:
        """Why the conditional UPDATE changed nothing, from the payment as it is now; None if,
        as it is now, the refund fits (it settled since the UPDATE)."""
        pid = draft.payment_id
        payment = self.queries.live(pid)
        if payment is None:
            return not_found(pid)
        if payment.currency != currency:
            return InvalidArgument([("refund.currency", f"must be the payment's currency, {payment.currency}")],
                                   reason="CURRENCY_MISMATCH")
        if payment.status != SUCCESS:
            return FailedPrecondition(f"payment {pid!r} is {payment.status}: only a success payment is refunded",
                                      reason="PAYMENT_NOT_SETTLED", metadata={"id": pid, "status": payment.status})
        refunded = payment.refunded_amount or 0
        expected = draft.expected_refunded_amount
        if expected is not None and refunded != expected:
            return FailedPrecondition(
                f"payment {pid!r} has {refunded} refunded, not the expected {expected}: read it again and decide",
                reason="REFUNDED_AMOUNT_CHANGED",
                metadata={"id": pid, "refunded_amount": str(refunded), "expected_refunded_amount": str(expected)})
        left = payment.amount - refunded
        if draft.amount <= left:
            return None
        what = "nothing is left" if left == 0 else f"only {left} is left"
        return FailedPrecondition(
            f"a refund of {draft.amount} is more than payment {pid!r} has left: {what} "
            f"(amount {payment.amount}, refunded {refunded})",
            reason="REFUND_EXCEEDS_REMAINING",
            metadata={"id": pid, "amount": str(payment.amount), "refunded_amount": str(refunded),
                      "remaining": str(left)})
