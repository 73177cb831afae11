"""Webhooks, the rules: which changes are events, what an event says, the signature, and what
admins may do with endpoints and events. No gRPC and no network here: the delivery job is
server/domain/webhook_delivery.py, the HTTP client server/infra/webhook_sender.py.

The outbox is the payment history itself: every change writes its history row in the change's own
transaction (server/domain/payments.py), marked not yet dispatched, so an event commits with its
change or not at all, and the delivery job only ever reads committed rows. The event is that row:
its id, its time, its type from the action, and the payment as the change left it, which follows
from the payment and the row (`payment_after`): a change's status, failure reason and time are the
row's, and nothing else of a payment ever changes. So announcing costs a change no second insert
and no copy of the payment, and every retry renders the same bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import re
import secrets
from typing import Callable, NamedTuple, Sequence

from server.domain.caller import Caller
from server.domain.permissions import WEBHOOKS_MANAGE
from server.domain.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from server.domain.ids import opaque_id
from server.domain.paging import DEFAULT_PAGE_SIZE, PageTokens, invalid_page_size
from server.domain.validation import PAYMENT_ID
from server.domain.webhook_urls import url_problem

CREATED, SUCCEEDED, FAILED = "payment.created", "payment.succeeded", "payment.failed"
DELETED, RESTORED, REFUNDED = "payment.deleted", "payment.restored", "payment.refunded"
EVENT_TYPES = (CREATED, SUCCEEDED, FAILED, DELETED, RESTORED, REFUNDED)
ALL = "*"
# The payment history's actions, as event types.
TYPE_OF_ACTION = {"created": CREATED, "confirmed": SUCCEEDED, "cancelled": FAILED, "expired": FAILED,
                  "deleted": DELETED, "undeleted": RESTORED, "refunded": REFUNDED}

SIGNATURE_HEADER = "Payments-Signature"
# Standard Webhooks (github.com/standard-webhooks/standard-webhooks, spec v1.0.0), sent beside it.
STANDARD_ID, STANDARD_TIMESTAMP, STANDARD_SIGNATURE = "webhook-id", "webhook-timestamp", "webhook-signature"
SECRET_PREFIX = "whsec_"
# The key bytes: at least the spec's 24, 264 bits; a multiple of three, so their base64 has no "="
# padding and every base64 decoder agrees on it, the strict ones (Go's, .NET's) and the lenient ones.
SECRET_BYTES = 33
DEFAULT_PREVIOUS_SECRET_TTL = 24 * 3600
MAX_PREVIOUS_SECRET_TTL = 7 * 24 * 3600
MAX_DESCRIPTION = 500
ENDPOINT_ID = re.compile(r"whe_[a-z2-7]{26}", re.ASCII)
EVENT_ID = re.compile(r"evt_[a-z2-7]{26}", re.ASCII)

PENDING, DELIVERED, GAVE_UP = "pending", "succeeded", "failed"  # a delivery's status


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 of "<timestamp>.<body>" keyed with the secret string itself (its UTF-8 bytes,
    prefix and all), in hex: Stripe's v1 scheme, which Stripe's libraries verify."""
    return hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secrets_: Sequence[str], timestamp: int, body: bytes) -> str:
    """t=<unix seconds>,v1=<hex>[,v1=<hex>]: one v1 per valid secret (two during a rotation)."""
    return ",".join([f"t={timestamp}"] + [f"v1={signature(s, timestamp, body)}" for s in secrets_])


_URL_SAFE = str.maketrans("-_", "+/")


def standard_key(secret: str) -> bytes:
    """The key bytes a secret encodes: the base64 after `whsec_`, as Standard Webhooks reads it.

    Secrets made before Standard Webhooks were `whsec_` + secrets.token_urlsafe(32): URL-safe base64
    (RFC 4648 section 5) without padding. Read in that alphabet they are the same 32 random bytes, so
    an endpoint keeps its secret and its standard signature is keyed with those bytes; its receiver
    gives a Standard Webhooks library the same secret in the standard alphabet (docs/webhooks.md).
    New secrets use the standard alphabet, which this reads unchanged."""
    text = secret.removeprefix(SECRET_PREFIX).translate(_URL_SAFE)
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def standard_signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">: Standard Webhooks' symmetric signature."""
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secrets_: Sequence[str], event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Both signatures of one attempt, each with one signature per valid secret (two during a
    rotation): Payments-Signature (Stripe's scheme) and the Standard Webhooks headers, whose id is
    the event's, the same at every retry, and whose signatures are space-separated."""
    return {SIGNATURE_HEADER: signature_header(secrets_, timestamp, body),
            STANDARD_ID: event_id, STANDARD_TIMESTAMP: str(timestamp),
            STANDARD_SIGNATURE: " ".join(standard_signature(standard_key(s), event_id, timestamp, body)
                                         for s in secrets_)}


def new_secret() -> str:
    """`whsec_` + the standard base64 of SECRET_BYTES random bytes. One string serves both
    signatures: as it is, the key of Payments-Signature (Stripe's libraries take it so); decoded,
    the key of webhook-signature (Standard Webhooks' libraries take it so)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


class EndpointRecord(NamedTuple):
    """A webhook endpoint (storage.models.WebhookEndpoint, in its order)."""

    id: str
    url: str
    event_types: str  # space-separated, or "*"
    enabled: bool
    description: str
    disabled_reason: str | None
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    # No attempt before this time: the receiver's Retry-After on a 429 or 503 (None: no wait asked).
    not_before: dt.datetime | None = None

    def wants(self, event_type: str) -> bool:
        return self.event_types == ALL or event_type in self.event_types.split()

    def signing_secrets(self, now: dt.datetime) -> list[str]:
        previous = self.previous_secret_expires_at
        if self.previous_secret and previous is not None and previous > now:
            return [self.secret, self.previous_secret]
        return [self.secret]


class DeliveryRecord(NamedTuple):
    """storage.models.WebhookDelivery."""

    number: int
    event_number: int
    event_id: str
    endpoint_id: str
    payment_id: str
    status: str
    attempts: int
    first_attempt_at: dt.datetime | None
    next_attempt_at: dt.datetime
    lease_until: dt.datetime | None
    created_at: dt.datetime
    lease_token: str | None = None  # the lease lease_until belongs to (webhook_delivery.py)


class AttemptRecord(NamedTuple):
    """storage.models.WebhookAttempt."""

    number: int
    delivery_number: int
    at: dt.datetime
    http_status: int
    error: str
    duration_ms: int


@dataclasses.dataclass(frozen=True)
class EventView:
    """An event (a history row), the payment as that change left it, and where it went: its
    deliveries, each with its attempts."""

    event: object  # records.EventRecord
    payment: object  # records.PaymentRecord, after the change
    deliveries: list[tuple[DeliveryRecord, list[AttemptRecord]]]
    refund: object = None  # records.RefundRecord, for payment.refunded

    @property
    def type(self) -> str:
        return TYPE_OF_ACTION[self.event.action]

    @property
    def reason(self) -> str | None:
        return reason_of(self.event)


def reason_of(event) -> str | None:
    """A payment.failed event's reason (cancelled, expired); None for the other types."""
    return event.failure_reason if TYPE_OF_ACTION[event.action] == FAILED else None


def payment_after(payment, event):
    """The payment just after the change `event` records: the status, failure reason and time are
    the event's, deleted_at is set only by the delete itself (no other change happens to a deleted
    payment), refunded_amount is a refund's row's own (0 before any refund: only a settled payment,
    which is never deleted, is refunded, and after that only refunds happen to it); every other
    field is fixed at creation."""
    return payment._replace(status=event.to_status, failure_reason=event.failure_reason, updated_at=event.at,
                            deleted_at=event.at if event.action == "deleted" else None,
                            refunded_amount=event.refunded_amount or 0)


@dataclasses.dataclass(frozen=True)
class EndpointChange:
    """What an admin asks to change; None (or an empty list) leaves a field as it is."""

    url: str | None = None
    event_types: Sequence[str] = ()
    enabled: bool | None = None
    description: str | None = None


def _admin(caller: Caller) -> None:
    """Admins, and service clients holding webhooks.manage."""
    if not caller.may(WEBHOOKS_MANAGE):
        raise PermissionDenied("only admins manage webhooks", reason="ADMIN_ONLY")


def endpoint_not_found(endpoint_id: str) -> NotFound:
    return NotFound(f"webhook endpoint {endpoint_id!r} not found", reason="WEBHOOK_ENDPOINT_NOT_FOUND",
                    metadata={"id": endpoint_id})


def event_not_found(event_id: str) -> NotFound:
    return NotFound(f"webhook event {event_id!r} not found", reason="WEBHOOK_EVENT_NOT_FOUND",
                    metadata={"id": event_id})


def _event_types_problem(types: Sequence[str]) -> str | None:
    if not types:
        return "is required: one or more of " + ", ".join(EVENT_TYPES) + ", or \"*\" for all"
    unknown = [t for t in types if t not in EVENT_TYPES and t != ALL]
    if unknown:
        return f"unknown event type {unknown[0][:40]!r}: use " + ", ".join(EVENT_TYPES) + ", or \"*\""
    if ALL in types and len(set(types)) > 1:
        return "\"*\" already means every type: give it alone"
    return None


def _event_types_text(types: Sequence[str]) -> str:
    return ALL if ALL in types else " ".join(t for t in EVENT_TYPES if t in types)


def _page_size(page_size: int) -> int:
    if (violation := invalid_page_size(page_size)) is not None:
        raise InvalidArgument([violation], reason="INVALID_LIST_REQUEST")
    return page_size or DEFAULT_PAGE_SIZE


class WebhookRules:
    """What admins do with endpoints and events. `queries` is storage's WebhookQueries."""

    def __init__(self, *, queries, page_tokens: PageTokens, allow_loopback: bool = False,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC), max_endpoints: int | None = None):
        self.queries = queries
        self.max_endpoints = max_endpoints  # per deployment (PAYMENTS_WEBHOOK_MAX_ENDPOINTS)
        self.page_tokens = page_tokens
        self.allow_loopback = allow_loopback
        self.clock = clock

    def _violations(self, url: str | None, types: Sequence[str] | None, description: str | None) -> list:
        violations = []
        if url is not None and (why := url_problem(url, allow_loopback=self.allow_loopback)):
            violations.append(("endpoint.url", why))
        if types is not None and (why := _event_types_problem(types)):
            violations.append(("endpoint.event_types", why))
        if description is not None and len(description) > MAX_DESCRIPTION:
            violations.append(("endpoint.description", f"must be at most {MAX_DESCRIPTION} characters"))
        return violations

    # --- endpoints ---------------------------------------------------------------------------

    def create(self, caller: Caller, *, url: str, event_types: Sequence[str], enabled: bool,
               description: str) -> tuple[EndpointRecord, str]:
        """The new endpoint and its secret (the only time the secret is shown)."""
        _admin(caller)
        url = url.strip()
        if violations := self._violations(url, list(event_types), description):
            raise InvalidArgument(violations, reason="INVALID_WEBHOOK_ENDPOINT")
        now = self.clock()
        secret = new_secret()
        row = EndpointRecord(id=opaque_id("whe_"), url=url, event_types=_event_types_text(event_types),
                             enabled=enabled, description=description, disabled_reason=None, secret=secret,
                             previous_secret=None, previous_secret_expires_at=None, created_at=now, updated_at=now)
        if not self.queries.insert_endpoint(row, self.max_endpoints):
            raise FailedPrecondition(
                f"at most {self.max_endpoints} webhook endpoints may exist (PAYMENTS_WEBHOOK_MAX_ENDPOINTS): "
                "delete one first", reason="WEBHOOK_ENDPOINT_LIMIT", metadata={"limit": str(self.max_endpoints)})
        return row, secret

    def get(self, caller: Caller, endpoint_id: str) -> EndpointRecord:
        _admin(caller)
        row = self.queries.endpoint(endpoint_id) if ENDPOINT_ID.fullmatch(endpoint_id or "") else None
        if row is None:
            raise endpoint_not_found(endpoint_id)
        return row

    def list(self, caller: Caller, *, page_size: int = 0, page_token: str = "") -> tuple[list[EndpointRecord], str]:
        _admin(caller)
        size, now = _page_size(page_size), self.clock()
        scope = self.page_tokens.scope(caller.subject, "webhook-endpoints")
        after = self.page_tokens.decode(page_token, scope, now) if page_token else None
        rows = self.queries.endpoints_page(after=after, limit=size + 1)
        return self.page_tokens.cut(rows, size, lambda last: (last.created_at, last.id), scope, now)

    def update(self, caller: Caller, endpoint_id: str, change: EndpointChange) -> EndpointRecord:
        """The fields given change. Enabling a disabled endpoint is one conditional UPDATE (only if
        it is disabled when it runs), and only the call that did it resumes the deliveries: a fresh
        schedule for each (no attempts counted, due now, a new window), the reason and any
        Retry-After wait cleared."""
        self.get(caller, endpoint_id)
        url = change.url.strip() if change.url is not None else None
        types = list(change.event_types) or None
        if violations := self._violations(url, types, change.description):
            raise InvalidArgument(violations, reason="INVALID_WEBHOOK_ENDPOINT")
        now = self.clock()
        fields: dict = {"updated_at": now}
        if url is not None:
            fields["url"] = url
        if types is not None:
            fields["event_types"] = _event_types_text(types)
        if change.description is not None:
            fields["description"] = change.description
        if change.enabled is not None:
            fields["enabled"] = change.enabled
            if change.enabled:
                fields["disabled_reason"] = None
        with self.queries.transaction():
            if change.enabled and self.queries.enable_endpoint(endpoint_id, now):
                self.queries.resume_deliveries(endpoint_id, now)  # what waited is sent at the next tick
            if not self.queries.update_endpoint(endpoint_id, fields):
                raise endpoint_not_found(endpoint_id)
        return self.get(caller, endpoint_id)

    def delete(self, caller: Caller, endpoint_id: str) -> None:
        """The endpoint, its deliveries and their attempts, under the endpoint's row lock: an
        attempt in flight then finds no delivery to write to (its late write is counted)."""
        _admin(caller)
        with self.queries.locked_endpoint(endpoint_id) as current:
            if current is None or not self.queries.delete_endpoint(endpoint_id):
                raise endpoint_not_found(endpoint_id)

    def rotate(self, caller: Caller, endpoint_id: str, previous_ttl_seconds: int = 0) -> tuple[EndpointRecord, str]:
        """A new secret; the one it replaces keeps signing for `previous_ttl_seconds` (the one before
        that, if it was still valid, ends now: at most two are ever valid). One statement: the
        secret it replaces is the one stored when it runs, so two rotations at once chain."""
        _admin(caller)  # before the input: a caller without the right learns nothing from a validation error
        if previous_ttl_seconds < 0 or previous_ttl_seconds > MAX_PREVIOUS_SECRET_TTL:
            raise InvalidArgument([("previous_secret_ttl_seconds",
                                    f"must be between 0 and {MAX_PREVIOUS_SECRET_TTL} (0 means {DEFAULT_PREVIOUS_SECRET_TTL})")],
                                  reason="INVALID_ROTATION")
        self.get(caller, endpoint_id)
        now = self.clock()
        secret = new_secret()
        ttl = dt.timedelta(seconds=previous_ttl_seconds or DEFAULT_PREVIOUS_SECRET_TTL)
        if not self.queries.rotate_secret(endpoint_id, secret, now + ttl, now):
            raise endpoint_not_found(endpoint_id)
        return self.get(caller, endpoint_id), secret

    # --- events ------------------------------------------------------------------------------

    def events(self, caller: Caller, *, page_size: int = 0, page_token: str = "", payment_id: str = "",
               event_type: str = "") -> tuple[list[EventView], str]:
        _admin(caller)
        violations = []
        if payment_id and not PAYMENT_ID.fullmatch(payment_id):
            violations.append(("payment_id", "is not a payment id"))
        if event_type and event_type not in EVENT_TYPES:
            violations.append(("type", "must be one of " + ", ".join(EVENT_TYPES)))
        if violations:
            raise InvalidArgument(violations, reason="INVALID_LIST_REQUEST")
        size, now = _page_size(page_size), self.clock()
        scope = self.page_tokens.scope(caller.subject, "webhook-events", payment_id, event_type)
        before = self.page_tokens.decode_number(page_token, scope, now) if page_token else None
        actions = [a for a, t in TYPE_OF_ACTION.items() if t == event_type] if event_type else []
        rows = self.queries.events_page(before_number=before, payment_id=payment_id, actions=actions, limit=size + 1)
        rows, token = self.page_tokens.cut(rows, size, lambda last: (last[0].at, str(last[0].number)), scope, now)
        return self._views(rows), token

    def event(self, caller: Caller, event_id: str) -> EventView:
        _admin(caller)
        row = self.queries.event(event_id) if EVENT_ID.fullmatch(event_id or "") else None
        if row is None:
            raise event_not_found(event_id)
        return self._views([row])[0]

    def _views(self, rows: list[tuple]) -> list[EventView]:
        """(history event, payment, refund or None) rows, as events with their deliveries."""
        deliveries = self.queries.deliveries_of([row[0].id for row in rows])
        attempts = self.queries.attempts_of([d.number for d in deliveries])
        by_event: dict[int, list] = {}
        for d in deliveries:
            by_event.setdefault(d.event_number, []).append((d, attempts.get(d.number, [])))
        return [EventView(e, payment_after(p, e), by_event.get(e.number, []), r) for e, p, r in rows]

    def redeliver(self, caller: Caller, event_id: str, endpoint_id: str) -> tuple[DeliveryRecord, list[AttemptRecord]]:
        """Pending again, due now, with a fresh schedule: no attempts counted (the next retry waits
        the first delay, not the last), a new window, and any lease taken back (an attempt in flight
        writes nothing when it ends). The attempts so far stay listed. Under the endpoint's row
        lock, so it is enabled and exists when the delivery is written."""
        view = self.event(caller, event_id)
        if not endpoint_id:
            raise InvalidArgument([("endpoint_id", "is required")], reason="INVALID_REDELIVERY")
        self.get(caller, endpoint_id)
        with self.queries.locked_endpoint(endpoint_id) as endpoint:
            if endpoint is None:
                raise endpoint_not_found(endpoint_id)
            if not endpoint.enabled:
                raise FailedPrecondition(f"webhook endpoint {endpoint_id!r} is disabled: enable it first",
                                         reason="WEBHOOK_ENDPOINT_DISABLED", metadata={"id": endpoint_id})
            delivery = self.queries.redeliver(view.event, endpoint_id, self.clock())
        return delivery, self.queries.attempts_of([delivery.number]).get(delivery.number, [])
