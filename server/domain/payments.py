"""The payment rules: validation, who may touch which payment, the status lifecycle and
idempotent creation. No gRPC here; failures are server.domain.errors exceptions.

Lifecycle: a payment is created pending and leaves pending exactly once, by one conditional
UPDATE ... WHERE status = 'pending', so a confirm, a cancel and the expiry job racing on the same
payment can never overwrite each other.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import re
import secrets
from typing import Callable, Iterable

import peewee

from server.infra import storage
from server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from server.domain.paging import PageTokens
from server.domain.caller import Caller
from server.infra.storage import Payment, PaymentEvent, User

UTC = dt.timezone.utc

PENDING, SUCCESS, FAILED = "pending", "success", "failed"
STATUSES = (PENDING, SUCCESS, FAILED)
CANCELLED, EXPIRED = "cancelled", "expired"

MAX_AMOUNT = 999_999_999_999_999  # below 2**53: exact in every JSON client
MAX_DESCRIPTION = 500
MAX_EMAIL = 254
DEFAULT_CURRENCY = "IDR"
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100

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

# Always fullmatch: `$` also matches before a trailing newline, which let "order-1\n" through.
_EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+", re.ASCII)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)
_PAYMENT_ID = re.compile(r"pay_[a-z2-7]{26}", re.ASCII)


def opaque_id(prefix: str) -> str:
    """128 random bits in lower-case base32: unguessable, unique, and leaking no order or count."""
    return prefix + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def new_payment_id() -> str:
    return opaque_id("pay_")


def email_problem(email: str) -> str | None:
    """Why an email address is unacceptable, or None."""
    if not email:
        return "is required"
    if len(email) > MAX_EMAIL:
        return f"must be at most {MAX_EMAIL} characters"
    if not _EMAIL.fullmatch(email):
        return "is not a valid email address"
    return None


def normalize_email(email: str) -> str:
    return email.strip().lower()


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
        if self.request_id and not _REQUEST_ID.fullmatch(self.request_id):
            violations.append(("request_id", "must be 1-64 characters of A-Z a-z 0-9 . _ : -"))
        if violations:
            raise InvalidArgument([(f"payment.{f}", d) for f, d in violations], reason="INVALID_PAYMENT")
        return dataclasses.replace(self, email=email, currency=currency)

    def fingerprint(self) -> str:
        """What makes two creates 'the same body' for idempotency."""
        body = json.dumps([self.email, self.amount, self.currency, self.description], separators=(",", ":"))
        return hashlib.sha256(body.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Page:
    payments: list[Payment]
    next_page_token: str


_BY_REQUEST_ID = storage.Prepared(lambda param: Payment.select().where(
    (Payment.created_by == param("subject")) & (Payment.request_id == param("request_id"))).limit(1))


_INSERT = storage.PreparedInsert(Payment)
_INSERT_EVENT = storage.PreparedInsert(PaymentEvent)
SYSTEM = "system"  # the actor_role of the service's own changes (expiry)
CREATED, CONFIRMED, DELETED, UNDELETED = "created", "confirmed", "deleted", "undeleted"


def _event(payment_id: str, action: str, from_status: str | None, to_status: str, at: dt.datetime,
           caller: Caller | None, failure_reason: str | None) -> dict:
    return {"id": opaque_id("evt_"), "payment_id": payment_id, "at": at, "action": action,
            "from_status": from_status, "to_status": to_status, "failure_reason": failure_reason,
            "actor_id": caller.subject if caller else "", "actor_role": caller.role if caller else SYSTEM}


def record(payment_id: str, action: str, from_status: str | None, to_status: str, at: dt.datetime,
           caller: Caller | None, failure_reason: str | None = None) -> None:
    """One history event; call it inside the transaction of the change it records."""
    _INSERT_EVENT(PaymentEvent(**_event(payment_id, action, from_status, to_status, at, caller, failure_reason)))


@dataclasses.dataclass(frozen=True)
class EventPage:
    events: list[PaymentEvent]
    next_page_token: str


def _after(query, key: peewee.Field, limit: int | None, resume: dict | None) -> list[str]:
    """The ids of the next batch, in (key, id) order, from after the batch before (kept in
    `resume`). On PostgreSQL the rows a batch changed stay in the index as dead entries until
    vacuum, and a batch that started from the beginning again stepped over all of them: a
    200,000-row backlog drained 2.9 times slower than one of 100,000."""
    if resume and "key" in resume:
        query = query.where(peewee.Tuple(key, Payment.id) > peewee.Tuple(key.db_value(resume["key"]), resume["id"]))
    query = query.order_by(key, Payment.id)
    rows = list((query.limit(limit) if limit else query).tuples())
    if rows and resume is not None:
        resume["id"], resume["key"] = rows[-1]
    return [pid for pid, _ in rows]


def not_found(payment_id: str) -> NotFound:
    return NotFound(f"payment {payment_id!r} not found", reason="PAYMENT_NOT_FOUND", metadata={"id": payment_id})


def settled(payment_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"payment {payment_id!r} moved money (success) and is never deleted",
                              reason="PAYMENT_SETTLED", metadata={"id": payment_id})


def as_created(row: Payment) -> Payment:
    """The payment as the create that made it answered (AIP-155, Stripe: a replay gets the first
    answer, not the payment as it is now). That answer is fixed by the row: a new payment is
    PENDING, unchanged since its creation, and not deleted."""
    data = dict(row.__data__, status=PENDING, failure_reason=None, updated_at=row.created_at, deleted_at=None)
    return Payment(**data)


class PaymentRules:
    """The payment operations, each checked against the caller.

    `clock` is injectable so expiry and retention are tested without sleeping.
    """

    def __init__(
        self,
        *,
        page_tokens: PageTokens,
        payment_ttl: dt.timedelta,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(UTC),
    ):
        self.page_tokens = page_tokens
        self.payment_ttl = payment_ttl
        self.clock = clock
        self._queries: dict[tuple, storage.Prepared] = {}  # hot queries, SQL built once (storage.Prepared)
        self._get_query = {is_admin: self._prepared(("get", is_admin), lambda param, a=is_admin: self._visible(a, param)
                                                    .where(Payment.id == param("id")).limit(1))
                           for is_admin in (False, True)}
        self._any_query = self._prepared(("any",), lambda param: Payment.select().where(Payment.id == param("id"))
                                         .limit(1))
        self._account_query = self._prepared(("account",), lambda param: User.select(User.id).where(
            User.email == param("email")).limit(1))

    # --- reads -----------------------------------------------------------------------------

    @staticmethod
    def _visible(is_admin: bool, param, show_deleted: bool = False):
        """Live payments (and deleted ones, for an admin who asks); a customer's only those of
        their own account (the caller's id is a query parameter), whatever their email says."""
        query = Payment.select()
        if not show_deleted:
            query = query.where(Payment.deleted_at.is_null())
        return query if is_admin else query.where(Payment.owner_id == param("caller_id"))

    def _prepared(self, key: tuple, build) -> storage.Prepared:
        """The query of one shape, its SQL built by `build` the first time (storage.Prepared)."""
        prepared = self._queries.get(key)
        if prepared is None:
            prepared = self._queries[key] = storage.Prepared(build)
        return prepared

    def _list_query(self, is_admin: bool, status: bool, email: bool, after: bool,
                    show_deleted: bool = False) -> storage.Prepared:
        """The page query of one shape (caller kind, which filters, first page or later)."""

        def build(param):
            query = self._visible(is_admin, param, show_deleted)
            if status:
                query = query.where(Payment.status == param("status"))
            if email:
                query = query.where(Payment.email == param("email"))
            if after:
                # A row-value comparison, not "a < x OR (a = x AND b < y)": SQLite and PostgreSQL
                # both make it one range scan of the (…, created_at, id) index, so page 1,000
                # costs what page 1 does (the OR form scanned every earlier row again).
                query = query.where(peewee.Tuple(Payment.created_at, Payment.id)
                                    < peewee.Tuple(param("after_at"), param("after_id")))
            return query.order_by(Payment.created_at.desc(), Payment.id.desc()).limit(param("limit"))

        return self._prepared(("list", is_admin, status, email, after, show_deleted), build)

    def get(self, caller: Caller, payment_id: str) -> Payment:
        # Someone else's payment is NOT_FOUND, exactly like a missing one: ids are not probeable.
        if not _PAYMENT_ID.fullmatch(payment_id or ""):
            raise not_found(payment_id)
        row = self._get_query[caller.is_admin].first(caller_id=caller.subject, id=payment_id)
        if row is None:
            raise not_found(payment_id)
        return row

    def list(self, caller: Caller, *, page_size: int = 0, page_token: str = "", status: str = "", email: str = "",
             show_deleted: bool = False) -> Page:
        violations = []
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            violations.append(("page_size", f"must be between 1 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})"))
        if status and status not in STATUSES:
            violations.append(("status", "must be PENDING, SUCCESS or FAILED"))
        email = normalize_email(email)
        if email and (why := email_problem(email)):
            violations.append(("email", why))
        if violations:
            raise InvalidArgument(violations, reason="INVALID_LIST_REQUEST")
        if email and not caller.is_admin and email != caller.email:
            raise PermissionDenied("only admins may list another payer's payments", reason="EMAIL_FILTER_FORBIDDEN")
        if show_deleted and not caller.is_admin:
            raise PermissionDenied("only admins may list deleted payments", reason="SHOW_DELETED_FORBIDDEN")
        size = page_size or DEFAULT_PAGE_SIZE
        now = self.clock()
        scope = self.page_tokens.scope(caller.subject, caller.role, caller.email, status, email,
                                       "deleted" if show_deleted else "")

        values = {"caller_id": caller.subject, "status": status, "email": email, "limit": size + 1}
        if page_token:
            after_at, values["after_id"] = self.page_tokens.decode(page_token, scope, now)
            values["after_at"] = Payment.created_at.db_value(after_at)
        query = self._list_query(caller.is_admin, bool(status), bool(email), bool(page_token), show_deleted)
        rows = query(**values)
        next_token = ""
        if len(rows) > size:
            rows = rows[:size]
            last = rows[-1]
            next_token = self.page_tokens.encode(last.created_at, last.id, scope, now)
        return Page(rows, next_token)

    # --- writes ----------------------------------------------------------------------------

    def create(self, caller: Caller, draft: PaymentDraft) -> Payment:
        draft = draft.validated()
        if not caller.is_admin and draft.email != caller.email:
            raise PermissionDenied(
                "customers may create payments only for their own email", reason="EMAIL_NOT_CALLERS"
            )
        fingerprint = draft.fingerprint()
        if draft.request_id:
            earlier = self._by_request_id(caller, draft.request_id)
            if earlier is not None:
                return self._replay(earlier, fingerprint, draft.request_id)
        owner_id = caller.subject if not caller.is_admin else self._account_of(draft.email)
        now = self.clock()
        row = Payment(
            id=new_payment_id(),
            email=draft.email,
            owner_id=owner_id,
            amount=draft.amount,
            currency=draft.currency,
            description=draft.description,
            status=PENDING,
            created_by=caller.subject,
            request_id=draft.request_id or None,
            request_hash=fingerprint if draft.request_id else None,
            created_at=now,
            updated_at=now,
            expires_at=now + self.payment_ttl,
        )
        try:
            with storage.db.atomic():
                _INSERT(row)
                record(row.id, CREATED, None, PENDING, now, caller)
        except peewee.IntegrityError:
            # A concurrent retry with the same request_id won the insert: answer as a replay.
            earlier = self._by_request_id(caller, draft.request_id) if draft.request_id else None
            if earlier is None:
                raise
            return self._replay(earlier, fingerprint, draft.request_id)
        return row

    def _account_of(self, email: str) -> str:
        """The account that holds `email` now: an admin's payment for an email belongs to it."""
        account = self._account_query.first(email=email)
        if account is None:
            raise FailedPrecondition(f"no account holds {email!r}: the payer registers first",
                                     reason="NO_ACCOUNT", metadata={"email": email})
        return account.id

    def _by_request_id(self, caller: Caller, request_id: str) -> Payment | None:
        return _BY_REQUEST_ID.first(subject=caller.subject, request_id=request_id)

    @staticmethod
    def _replay(earlier: Payment, fingerprint: str, request_id: str) -> Payment:
        if earlier.request_hash != fingerprint:
            raise AlreadyExists(
                f"request_id {request_id!r} was already used for a payment with a different body",
                reason="REQUEST_ID_CONFLICT",
                metadata={"request_id": request_id},
            )
        if earlier.deleted_at is not None:
            raise FailedPrecondition(
                f"request_id {request_id!r} belongs to a payment that has been deleted",
                reason="PAYMENT_DELETED",
                metadata={"request_id": request_id},
            )
        return as_created(earlier)

    def delete(self, caller: Caller, payment_id: str) -> None:
        """Soft delete: hidden at once, purged by the retention job later. Never a payment that
        moved money: one conditional UPDATE, so a confirm racing it either wins (and the payment
        stays) or finds it deleted (and cannot confirm it)."""
        row = self.get(caller, payment_id)
        if row.status == SUCCESS:
            raise settled(payment_id)
        now = self.clock()
        with storage.db.atomic():
            changed = (
                Payment.update(deleted_at=now, updated_at=now)
                .where((Payment.id == row.id) & Payment.deleted_at.is_null() & (Payment.status != SUCCESS))
                .execute()
            )
            if changed:
                record(row.id, DELETED, row.status, row.status, now, caller, row.failure_reason)
        if not changed:  # confirmed or deleted concurrently
            current = self._any_query.first(id=row.id)
            if current is not None and current.status == SUCCESS and current.deleted_at is None:
                raise settled(payment_id)
            raise not_found(payment_id)

    def undelete(self, caller: Caller, payment_id: str) -> Payment:
        """Bring back a deleted payment the purge has not reached (admins; AIP-164)."""
        if not caller.is_admin:
            raise PermissionDenied("only admins may undelete payments", reason="ADMIN_ONLY")
        if not _PAYMENT_ID.fullmatch(payment_id or ""):
            raise not_found(payment_id)
        now = self.clock()
        with storage.db.atomic():
            changed = (
                Payment.update(deleted_at=None, updated_at=now)
                .where((Payment.id == payment_id) & Payment.deleted_at.is_null(False))
                .returning(Payment.status, Payment.failure_reason)
                .execute()
            )
            restored = list(changed)
            for r in restored:
                record(payment_id, UNDELETED, r.status, r.status, now, caller, r.failure_reason)
        if not restored:
            if self._any_query.first(id=payment_id) is None:
                raise not_found(payment_id)
            raise FailedPrecondition(f"payment {payment_id!r} is not deleted", reason="PAYMENT_NOT_DELETED",
                                     metadata={"id": payment_id})
        return self.get(caller, payment_id)

    def confirm(self, caller: Caller, payment_id: str) -> Payment:
        if not caller.is_admin:
            raise PermissionDenied("only admins may confirm payments", reason="ADMIN_ONLY")
        return self._leave_pending(caller, payment_id, SUCCESS, None)

    def cancel(self, caller: Caller, payment_id: str) -> Payment:
        return self._leave_pending(caller, payment_id, FAILED, CANCELLED)

    def _leave_pending(self, caller: Caller, payment_id: str, status: str, reason: str | None) -> Payment:
        row = self.get(caller, payment_id)
        now = self.clock()
        with storage.db.atomic():
            changed = (
                Payment.update(status=status, failure_reason=reason, updated_at=now)
                .where(
                    (Payment.id == row.id)
                    & (Payment.status == PENDING)
                    & (Payment.expires_at > now)
                    & Payment.deleted_at.is_null()
                )
                .execute()
            )
            if changed:
                record(row.id, CONFIRMED if status == SUCCESS else CANCELLED, PENDING, status, now, caller, reason)
        if changed:
            return self.get(caller, payment_id)
        # Lost a race, or the payment is not pending (any more), or it is overdue.
        if row.status == PENDING:
            self.expire_due(now, ids=[row.id])
        current = self.get(caller, payment_id)
        detail = f" ({current.failure_reason})" if current.failure_reason else ""
        raise FailedPrecondition(
            f"payment {payment_id!r} is {current.status}{detail}, not pending",
            reason="PAYMENT_EXPIRED" if current.failure_reason == EXPIRED else "PAYMENT_NOT_PENDING",
            metadata={"id": payment_id, "status": current.status},
        )

    def expire_due(self, now: dt.datetime, *, ids: Iterable[str] | None = None, limit: int | None = None,
                   resume: dict | None = None) -> int:
        """Fail pending payments whose expires_at has passed; returns how many changed.

        One conditional UPDATE: a payment confirmed or cancelled at the same moment keeps that
        status. `limit` bounds one batch (the expiry job loops over batches); `resume`, a dict
        the job keeps for its run, makes each batch start after the last one (see _after).
        """
        due = (Payment.status == PENDING) & (Payment.expires_at <= now)
        if ids is not None:
            targets = list(ids)
        else:
            targets = _after(Payment.select(Payment.id, Payment.expires_at).where(due), Payment.expires_at,
                             limit, resume)
        if not targets:
            return 0
        # The UPDATE finds its rows by id and checks the condition on each (row_check): SQLite,
        # without statistics, otherwise scanned the whole overdue range of the status/expiry index
        # per batch, holding the write lock (138 ms a batch at the start of a 300,000-row backlog).
        still_due = (storage.row_check(Payment.status) == PENDING) & (storage.row_check(Payment.expires_at) <= now)
        with storage.db.atomic():
            expired = [pid for (pid,) in (
                Payment.update(status=FAILED, failure_reason=EXPIRED, updated_at=now)
                .where(storage.among(Payment.id, targets) & still_due)
                .returning(Payment.id)
                .tuples()
                .execute()
            )]
            if expired:  # one INSERT for the batch's events, not one per row
                _INSERT_EVENT.many([_event(pid, EXPIRED, PENDING, FAILED, now, None, EXPIRED) for pid in expired])
        return len(expired)

    def purge_deleted(self, before: dt.datetime, *, limit: int, resume: dict | None = None) -> int:
        """Remove for good up to `limit` payments soft-deleted before `before`; returns how many.

        The request_id of a purged payment is forgotten with it (idempotency records are columns
        of the payment), so a retry after the retention window creates a new payment.
        """
        # Never a payment that moved money (one deleted before that was refused stays, undeletable).
        old = Payment.deleted_at.is_null(False) & (Payment.deleted_at < before) & (Payment.status != SUCCESS)
        targets = _after(Payment.select(Payment.id, Payment.deleted_at).where(old), Payment.deleted_at, limit, resume)
        if not targets:
            return 0
        still_old = (storage.row_check(Payment.deleted_at).is_null(False) & (storage.row_check(Payment.deleted_at) < before)
                     & (storage.row_check(Payment.status) != SUCCESS))
        with storage.db.atomic():  # the history goes with the payment, never before it
            purged = [pid for (pid,) in Payment.delete().where(storage.among(Payment.id, targets) & still_old)
                      .returning(Payment.id).tuples().execute()]
            if purged:
                PaymentEvent.delete().where(storage.among(PaymentEvent.payment_id, purged)).execute()
        return len(purged)

    def events(self, caller: Caller, payment_id: str, *, page_size: int = 0, page_token: str = "") -> EventPage:
        """A payment's history, oldest first, paged like list(); the payment's own access rules
        (an admin also reads the history of a deleted payment)."""
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument([("page_size", f"must be between 1 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})")],
                                  reason="INVALID_LIST_REQUEST")
        if caller.is_admin:
            if not _PAYMENT_ID.fullmatch(payment_id or "") or self._any_query.first(id=payment_id) is None:
                raise not_found(payment_id)
        else:
            self.get(caller, payment_id)
        size, now = page_size or DEFAULT_PAGE_SIZE, self.clock()
        scope = self.page_tokens.scope(caller.subject, caller.role, "events", payment_id)
        query = PaymentEvent.select().where(PaymentEvent.payment_id == payment_id)
        if page_token:
            _, after = self.page_tokens.decode(page_token, scope, now)
            if not after.isdigit():
                raise InvalidArgument([("page_token", "is not a page token of this listing")], reason="INVALID_PAGE_TOKEN")
            query = query.where(PaymentEvent.number > int(after))
        rows = list(query.order_by(PaymentEvent.number).limit(size + 1))
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = self.page_tokens.encode(rows[-1].at, str(rows[-1].number), scope, now)
        return EventPage(rows, token)
