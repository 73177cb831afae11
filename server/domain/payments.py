"""The payment rules: validation, who may touch which payment, the status lifecycle and
idempotent creation. No gRPC here; failures are server.domain.errors exceptions.

Lifecycle: a payment is created pending and leaves pending exactly once. A confirm, cancel,
delete or undelete decides under the payment's lock (queries.locked: the row on PostgreSQL, the
write lock on SQLite), and the expiry job changes only what is still pending and due in one
conditional UPDATE, so racing changes never overwrite each other and each outcome is that of one
order of the calls. A deleted payment is not expired (it keeps the status it was deleted with),
and a delete records the status it found under the lock.

Retries: confirm, cancel, delete and undelete are idempotent for the caller who made the change.
A call that finds its change already made, still in force, and made by the same caller (the
history's latest event of that kind names it) is answered as the first call was: an answer lost
on the way and retried is never a PAYMENT_NOT_PENDING to the caller whose call succeeded. Another
caller still gets the precondition error.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Callable, Iterable

from server.domain.caller import Caller
from server.domain import idempotency
from server.domain.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from server.domain.permissions import PAYMENTS_CONFIRM
from server.domain.ids import new_payment_id, opaque_id
from server.domain.lifecycle import CANCELLED, EXPIRED, FAILED, PENDING, STATUSES, SUCCESS
from server.domain.paging import DEFAULT_PAGE_SIZE, PageTokens, invalid_page_size
from server.domain.validation import PAYMENT_ID, REQUEST_ID, email_problem, normalize_email
from server.domain.ports import Clock, PaymentStore
from server.domain.records import EventRecord, PaymentRecord

__all__ = ["CANCELLED", "EXPIRED", "FAILED", "PENDING", "STATUSES", "SUCCESS", "PaymentDraft", "PaymentRules",
           "new_payment_id"]

MAX_AMOUNT = 999_999_999_999_999  # below 2**53: exact in every JSON client
MAX_DESCRIPTION = 500
DEFAULT_CURRENCY = "IDR"

# ISO 4217 active currency codes.
CURRENCIES = frozenset(
    """AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP
    BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL
    GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW
    KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN
    NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK
    SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS
    VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG""".split()
)

@dataclasses.dataclass(frozen=True)
class PaymentDraft:
    """What a caller asks to create, before validation."""

    email: str
    amount: int
    currency: str = ""
    description: str = ""
    request_id: str = ""

    def validated(self) -> "PaymentDraft":
        """A normalized copy, or InvalidArgument naming every bad field at once."""
        email = normalize_email(self.email)
        currency = self.currency.strip() or DEFAULT_CURRENCY
        violations = []
        if (why := email_problem(email)) is not None:
            violations.append(("email", why))
        if self.amount <= 0:
            violations.append(("amount", "must be greater than 0 (an integer count of the currency's minor unit)"))
        elif self.amount > MAX_AMOUNT:
            violations.append(("amount", f"must be at most {MAX_AMOUNT}"))
        if currency not in CURRENCIES:
            violations.append(("currency", "must be an ISO 4217 currency code in upper case, such as IDR or USD"))
        if len(self.description) > MAX_DESCRIPTION:
            violations.append(("description", f"must be at most {MAX_DESCRIPTION} characters"))
        if self.request_id and not REQUEST_ID.fullmatch(self.request_id):
            violations.append(("request_id", "must be 1-64 characters of A-Z a-z 0-9 . _ : -"))
        if violations:
            raise InvalidArgument([(f"payment.{f}", d) for f, d in violations], reason="INVALID_PAYMENT")
        return dataclasses.replace(self, email=email, currency=currency)

    def fingerprint(self) -> str:
        """What makes two creates 'the same body' for idempotency."""
        return idempotency.fingerprint(self.email, self.amount, self.currency, self.description)


@dataclasses.dataclass(frozen=True)
class Page:
    payments: list[PaymentRecord]
    next_page_token: str


@dataclasses.dataclass(frozen=True)
class EventPage:
    events: list[EventRecord]
    next_page_token: str


SYSTEM = "system"  # the actor_role of the service's own changes (expiry)
CREATED, CONFIRMED, DELETED, UNDELETED = "created", "confirmed", "deleted", "undeleted"
# What observe() hears besides those: a payment that failed (reason cancelled or expired), one
# brought back (the history's "undeleted"), one removed for good.
RESTORED, PURGED = "restored", "purged"


def _event(payment_id: str, action: str, from_status: str | None, to_status: str, at: dt.datetime,
           caller: Caller | None, failure_reason: str | None) -> dict:
    # dispatched=False: the event is also the webhook outbox's (server/domain/webhook_delivery.py
    # fans it out), written by the change's own transaction.
    return {"id": opaque_id("evt_"), "payment_id": payment_id, "at": at, "action": action,
            "from_status": from_status, "to_status": to_status, "failure_reason": failure_reason,
            "actor_id": caller.subject if caller else "", "actor_role": caller.role if caller else SYSTEM,
            "dispatched": False}


def not_found(payment_id: str) -> NotFound:
    return NotFound(f"payment {payment_id!r} not found", reason="PAYMENT_NOT_FOUND", metadata={"id": payment_id})


def no_account(email: str) -> FailedPrecondition:
    """An admin's or a service client's payment for an email belongs to the account that holds the
    email now: none does."""
    return FailedPrecondition(f"no account holds {email!r}: the payer registers first",
                              reason="NO_ACCOUNT", metadata={"email": email})


def settled(payment_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"payment {payment_id!r} moved money (success) and is never deleted",
                              reason="PAYMENT_SETTLED", metadata={"id": payment_id})


def as_created(row: PaymentRecord) -> PaymentRecord:
    """The payment as the create that made it answered (AIP-155, Stripe: a replay gets the first
    answer, not the payment as it is now). That answer is fixed by the row: a new payment is
    PENDING, unchanged since its creation, not deleted and not refunded."""
    return row._replace(status=PENDING, failure_reason=None, updated_at=row.created_at, deleted_at=None,
                        refunded_amount=0)


class PaymentRules:
    """The payment operations, each checked against the caller.

    The assembly (server/edge/app.py) hands the rules their ports (server/domain/ports.py): the
    store (`queries`) and the clock, one for every replica (server/infra/clock.py), which tests
    move by hand; `observe` hears of every committed change (server/infra/metrics.py counts
    them), never of one that rolled back.
    """

    def __init__(
        self,
        *,
        page_tokens: PageTokens,
        payment_ttl: dt.timedelta,
        queries: PaymentStore,
        clock: Clock,
        observe: Callable[[str, str | None, int], None] = lambda event, reason, count: None,
    ):
        self.page_tokens = page_tokens
        self.observe = observe  # (event, reason, count) once a change committed: the metrics
        self.payment_ttl = payment_ttl
        self.clock = clock
        self.queries = queries

    def _record(self, payment_id: str, action: str, from_status: str | None, to_status: str, at: dt.datetime,
                caller: Caller | None, failure_reason: str | None = None) -> None:
        """One history event, which is also the change's webhook event; inside the transaction of the
        change it records, so there is exactly one per change and none for a change that rolled back."""
        self.queries.insert_events([_event(payment_id, action, from_status, to_status, at, caller, failure_reason)])

    # --- reads -----------------------------------------------------------------------------

    def get(self, caller: Caller, payment_id: str) -> PaymentRecord:
        # Someone else's payment is NOT_FOUND, exactly like a missing one: ids are not probeable.
        # A customer sees the payments of their own account, whatever their email says.
        if not PAYMENT_ID.fullmatch(payment_id or ""):
            raise not_found(payment_id)
        row = self.queries.live(payment_id, owner_id=None if caller.reaches_all else caller.subject)
        if row is None:
            raise not_found(payment_id)
        return row

    def list(self, caller: Caller, *, page_size: int = 0, page_token: str = "", status: str = "", email: str = "",
             show_deleted: bool = False) -> Page:
        violations = [v for v in (invalid_page_size(page_size),) if v]
        if status and status not in STATUSES:
            violations.append(("status", "must be PENDING, SUCCESS or FAILED"))
        email = normalize_email(email)
        if email and (why := email_problem(email)):
            violations.append(("email", why))
        if violations:
            raise InvalidArgument(violations, reason="INVALID_LIST_REQUEST")
        if email and not caller.reaches_all and email != caller.email:
            raise PermissionDenied("only admins may list another payer's payments", reason="EMAIL_FILTER_FORBIDDEN")
        if show_deleted and not caller.is_admin:
            raise PermissionDenied("only admins may list deleted payments", reason="SHOW_DELETED_FORBIDDEN")
        size = page_size or DEFAULT_PAGE_SIZE
        now = self.clock()
        scope = self.page_tokens.scope(caller.subject, caller.role, caller.email, status, email,
                                       "deleted" if show_deleted else "")
        after = self.page_tokens.decode(page_token, scope, now) if page_token else None
        rows = self.queries.page(owner_id=None if caller.reaches_all else caller.subject, status=status, email=email,
                                 after=after, show_deleted=show_deleted, limit=size + 1)
        return Page(*self.page_tokens.cut(rows, size, lambda last: (last.created_at, last.id), scope, now))

    def events(self, caller: Caller, payment_id: str, *, page_size: int = 0, page_token: str = "") -> EventPage:
        """A payment's history, oldest first, paged like list(); the payment's own access rules
        (an admin also reads the history of a deleted payment)."""
        if (violation := invalid_page_size(page_size)) is not None:
            raise InvalidArgument([violation], reason="INVALID_LIST_REQUEST")
        if caller.is_admin:
            if not PAYMENT_ID.fullmatch(payment_id or "") or self.queries.any(payment_id) is None:
                raise not_found(payment_id)
        else:
            self.get(caller, payment_id)
        size, now = page_size or DEFAULT_PAGE_SIZE, self.clock()
        scope = self.page_tokens.scope(caller.subject, caller.role, "events", payment_id)
        after = self.page_tokens.decode_number(page_token, scope, now) if page_token else None
        rows = self.queries.events(payment_id, after_number=after, limit=size + 1)
        return EventPage(*self.page_tokens.cut(rows, size, lambda last: (last.at, str(last.number)), scope, now))

    # --- writes ----------------------------------------------------------------------------

    def create(self, caller: Caller, draft: PaymentDraft) -> PaymentRecord:
        draft = draft.validated()
        if not caller.reaches_all and draft.email != caller.email:
            raise PermissionDenied(
                "customers may create payments only for their own email", reason="EMAIL_NOT_CALLERS"
            )
        fingerprint = draft.fingerprint()
        # No look-up of the request_id first: the insert itself finds a retry (the unique index
        # on created_by and request_id refuses it, and nothing is written), and a first create,
        # nearly every create, saves that query.
        # An admin's or a service client's payment for an email belongs to the account holding it now.
        owner_id = caller.subject if not caller.reaches_all else self.queries.account_id(draft.email)
        if owner_id is None:  # a retry is answered even if the email's account went since
            if draft.request_id and (earlier := self.queries.by_request_id(caller.subject, draft.request_id)):
                return self._replay(earlier, fingerprint, draft.request_id)
            raise no_account(draft.email)
        now = self.clock()
        row = PaymentRecord(
            id=new_payment_id(),
            email=draft.email,
            owner_id=owner_id,
            amount=draft.amount,
            currency=draft.currency,
            description=draft.description,
            status=PENDING,
            failure_reason=None,
            created_by=caller.subject,
            request_id=draft.request_id or None,
            request_hash=fingerprint if draft.request_id else None,
            created_at=now,
            updated_at=now,
            expires_at=now + self.payment_ttl,
            deleted_at=None,
        )
        # The payment and its history event (the webhook outbox's) in one transaction.
        if not self.queries.create(row, _event(row.id, CREATED, None, PENDING, now, caller, None)):
            # Its request_id is taken: a retry, or a concurrent one that won the insert; answer as a replay.
            earlier = idempotency.winner(lambda rid: self.queries.by_request_id(caller.subject, rid), draft.request_id)
            return self._replay(earlier, fingerprint, draft.request_id)
        self.observe(CREATED, None, 1)
        return row

    @staticmethod
    def _replay(earlier: PaymentRecord, fingerprint: str, request_id: str) -> PaymentRecord:
        idempotency.same_request(earlier.request_hash, fingerprint, request_id, "a payment")
        if earlier.deleted_at is not None:
            raise FailedPrecondition(
                f"request_id {request_id!r} belongs to a payment that has been deleted",
                reason="PAYMENT_DELETED",
                metadata={"request_id": request_id},
            )
        return as_created(earlier)

    def delete(self, caller: Caller, payment_id: str) -> None:
        """Soft delete: hidden at once, purged by the retention job later. Never a payment that
        moved money. Decided under the payment's lock (queries.locked), so a confirm racing it
        either wins (and the payment stays) or finds it deleted; the history records the status
        the payment had when it was deleted. A retry by the caller who deleted it succeeds again."""
        self._visible_id(payment_id)
        with self.queries.locked(payment_id) as current:
            now = self._stamp(current)
            if current is None or not self._owns(caller, current):
                raise not_found(payment_id)
            if current.deleted_at is not None:
                if self._made_by(caller, payment_id, DELETED):
                    return  # this caller's delete, retried
                raise not_found(payment_id)
            if current.status == SUCCESS:
                raise settled(payment_id)
            self.queries.soft_delete(payment_id, now)
            self._record(payment_id, DELETED, current.status, current.status, now, caller, current.failure_reason)
        self.observe(DELETED, None, 1)

    @staticmethod
    def _visible_id(payment_id: str) -> None:
        if not PAYMENT_ID.fullmatch(payment_id or ""):
            raise not_found(payment_id)

    def _stamp(self, current: PaymentRecord | None) -> dt.datetime:
        """The time of a change decided under the payment's lock: the clock's, but never before the
        payment's previous change (its updated_at). Replicas read the database's time each within
        its own read's round trip (server/infra/clock.py), so two processes' clocks can differ by
        a few milliseconds under load; taking the later keeps a payment's history in time order."""
        now = self.clock()
        return now if current is None or current.updated_at <= now else current.updated_at

    @staticmethod
    def _owns(caller: Caller, payment: PaymentRecord) -> bool:
        return caller.reaches_all or payment.owner_id == caller.subject

    def _made_by(self, caller: Caller, payment_id: str, action: str) -> bool:
        """Whether the payment's latest change of this kind was this caller's (read under the lock)."""
        last = self.queries.last_event(payment_id, action)
        return last is not None and last.actor_id == caller.subject

    def undelete(self, caller: Caller, payment_id: str) -> PaymentRecord:
        """Bring back a deleted payment the purge has not reached (admins; AIP-164). A retry by the
        admin who brought it back answers the payment again."""
        if not caller.is_admin:
            raise PermissionDenied("only admins may undelete payments", reason="ADMIN_ONLY")
        self._visible_id(payment_id)
        with self.queries.locked(payment_id) as current:
            now = self._stamp(current)
            if current is None:
                raise not_found(payment_id)
            if current.deleted_at is None:
                if self._made_by(caller, payment_id, UNDELETED):
                    return current  # this caller's undelete, retried
                raise FailedPrecondition(f"payment {payment_id!r} is not deleted", reason="PAYMENT_NOT_DELETED",
                                         metadata={"id": payment_id})
            self.queries.undelete(payment_id, now)
            self._record(payment_id, UNDELETED, current.status, current.status, now, caller, current.failure_reason)
        self.observe(RESTORED, None, 1)
        return current._replace(deleted_at=None, updated_at=now)

    def confirm(self, caller: Caller, payment_id: str) -> PaymentRecord:
        if not caller.may(PAYMENTS_CONFIRM):
            raise PermissionDenied("only admins may confirm payments", reason="ADMIN_ONLY")
        return self._leave_pending(caller, payment_id, SUCCESS, None)

    def cancel(self, caller: Caller, payment_id: str) -> PaymentRecord:
        return self._leave_pending(caller, payment_id, FAILED, CANCELLED)

    def _leave_pending(self, caller: Caller, payment_id: str, status: str, reason: str | None) -> PaymentRecord:
        """Pending -> `status`, decided under the payment's lock. An overdue payment is expired
        on the way (that is committed) and the call fails PAYMENT_EXPIRED; a payment that already
        left pending fails PAYMENT_NOT_PENDING, unless this caller made exactly this change: then
        the call is a retry and gets the payment as it is."""
        self._visible_id(payment_id)
        action = CONFIRMED if status == SUCCESS else CANCELLED
        with self.queries.locked(payment_id) as current:
            now = self._stamp(current)
            if current is None or current.deleted_at is not None or not self._owns(caller, current):
                raise not_found(payment_id)
            if current.status == PENDING and current.expires_at > now:
                self.queries.leave_pending(payment_id, status, reason, now)
                self._record(payment_id, action, PENDING, status, now, caller, reason)
                changed = current._replace(status=status, failure_reason=reason, updated_at=now)
            else:
                changed, expired_here = None, current.status == PENDING
                if expired_here:  # overdue: it expires now, whoever asked
                    self.queries.expire([payment_id], now)
                    self._record(payment_id, EXPIRED, PENDING, FAILED, now, None, EXPIRED)
                    current = current._replace(status=FAILED, failure_reason=EXPIRED, updated_at=now)
                elif (current.status, current.failure_reason) == (status, reason) \
                        and self._made_by(caller, payment_id, action):
                    return current  # this caller's change, retried
        if changed is not None:
            self.observe(CONFIRMED if status == SUCCESS else FAILED, reason, 1)
            return changed
        if expired_here:
            self.observe(FAILED, EXPIRED, 1)
        detail = f" ({current.failure_reason})" if current.failure_reason else ""
        raise FailedPrecondition(
            f"payment {payment_id!r} is {current.status}{detail}, not pending",
            reason="PAYMENT_EXPIRED" if current.failure_reason == EXPIRED else "PAYMENT_NOT_PENDING",
            metadata={"id": payment_id, "status": current.status},
        )

    # --- the jobs' batches -----------------------------------------------------------------

    def expire_due(self, now: dt.datetime, *, ids: Iterable[str] | None = None, limit: int | None = None,
                   resume: dict | None = None) -> int:
        """Fail pending payments whose expires_at has passed; returns how many changed.

        One conditional UPDATE: a payment confirmed or cancelled at the same moment keeps that
        status. `limit` bounds one batch (the expiry job loops over batches); `resume`, a dict
        the job keeps for its run, makes each batch start where the one before ended.
        """
        targets = list(ids) if ids is not None else self.queries.due_for_expiry(now, limit, resume)
        if not targets:
            return 0
        with self.queries.transaction():
            expired = self.queries.expire(targets, now)
            # one INSERT for the batch's events, not one per row
            self.queries.insert_events([_event(pid, EXPIRED, PENDING, FAILED, now, None, EXPIRED) for pid in expired])
        if expired:
            self.observe(FAILED, EXPIRED, len(expired))
        return len(expired)

    def purge_deleted(self, before: dt.datetime, *, limit: int, resume: dict | None = None) -> int:
        """Remove for good up to `limit` payments soft-deleted before `before` (never one that
        moved money), with their history; returns how many.

        The request_id of a purged payment is forgotten with it (idempotency records are columns
        of the payment), so a retry after the retention window creates a new payment.
        """
        targets = self.queries.due_for_purge(before, limit, resume)
        if not targets:
            return 0
        with self.queries.transaction():  # the history goes with the payment, never before it
            purged = len(self.queries.purge(targets, before))
        if purged:
            self.observe(PURGED, None, purged)
        return purged
