"""The tables, as peewee models: payments, their history and refunds, accounts, sessions, job
claims, webhooks and service clients.

Columns are only ever added (see database.migrate_schema), so an older replica keeps working
against a newer schema during a rolling update. The models are bound to `db`, a proxy that
database.open_database points at SQLite or PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from typing import Sequence

import peewee

db = peewee.DatabaseProxy()


class UTCDateTimeField(peewee.DateTimeField):
    """A timestamp stored as naive UTC with fixed microsecond precision.

    The fixed text form matters on SQLite, where timestamps are strings: Python drops ".000000"
    when microseconds are zero, and mixed forms would break ordering and keyset paging.
    Values come back timezone-aware (UTC).
    """

    def db_value(self, value):
        if value is None:
            return None
        if isinstance(value, dt.datetime):
            if value.tzinfo is not None:
                value = value.astimezone(dt.UTC).replace(tzinfo=None)
            return value.strftime("%Y-%m-%d %H:%M:%S.%f")
        return super().db_value(value)

    def python_value(self, value):
        if value is None:
            return None
        if isinstance(value, str) and len(value) == 26:  # our own fixed form (SQLite)
            try:  # ten times faster than peewee's strptime formats
                return dt.datetime.fromisoformat(value + "+00:00")
            except ValueError:
                pass
        elif isinstance(value, dt.datetime):  # PostgreSQL: naive UTC
            return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)
        value = super().python_value(value)
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value


class BaseModel(peewee.Model):
    class Meta:
        database = db
        legacy_table_names = False


class Payment(BaseModel):
    """The earlier REST service's payments collection (id, email, amount, status, created_at)
    plus what a payment lifecycle needs. `amount` is an integer of minor units; `status` keeps the
    earlier lowercase words (pending/success/failed)."""

    id = peewee.CharField(primary_key=True, max_length=40)
    email = peewee.CharField(max_length=254)
    # The customer account the payment belongs to: what grants a customer access, never the email.
    # NULL only for rows from before accounts owned payments whose email had no account then.
    owner_id = peewee.CharField(max_length=40, null=True)
    amount = peewee.BigIntegerField()
    currency = peewee.CharField(max_length=3, default="IDR")
    description = peewee.CharField(max_length=500, default="")
    status = peewee.CharField(max_length=16, default="pending")
    failure_reason = peewee.CharField(max_length=16, null=True)
    # Idempotency: unique per creator (the token's subject), so two callers never collide.
    created_by = peewee.CharField(max_length=64, default="")
    request_id = peewee.CharField(max_length=64, null=True)
    request_hash = peewee.CharField(max_length=64, null=True)
    created_at = UTCDateTimeField()
    updated_at = UTCDateTimeField()
    expires_at = UTCDateTimeField()
    deleted_at = UTCDateTimeField(null=True)  # indexed only where set: see below the class
    # The sum of the payment's refunds, changed only by the refund's conditional UPDATE (never more
    # than amount). NULL-able with a default in the table itself, so adding it fills the rows there
    # are and an older replica's inserts, which do not name it, still get 0.
    refunded_amount = peewee.BigIntegerField(null=True, default=0, constraints=[peewee.SQL("DEFAULT 0")])

    class Meta:
        table_name = "payments"
        indexes = (
            (("created_at", "id"), False),  # keyset paging over everything (admins)
            (("email", "created_at", "id"), False),  # keyset paging by payer email (admins' filter)
            (("owner_id", "created_at", "id"), False),  # keyset paging of one customer's own
            (("status", "expires_at", "id"), False),  # the expiry job's scan, batch after batch
            (("status", "created_at", "id"), False),  # status filter
            (("created_by", "request_id"), True),  # idempotency; NULL request_ids never clash
        )


# Only soft-deleted rows are indexed by deleted_at (the retention job's scan). An index over every
# row, nearly all NULL, lured planners into answering "deleted_at IS NULL" from it and sorting
# every live row: on SQLite without statistics, each admin page of a million rows took 0.6 s.
Payment.add_index(Payment.index(Payment.deleted_at, Payment.id, name="payments_deleted_set")
                  .where(Payment.deleted_at.is_null(False)))
# Indexes a newer one replaced: dropped by migrate_schema.
OBSOLETE_INDEXES = ("payments_status_expires_at", "payments_deleted_at_set")
# And only unowned rows by id (the start-up backfill's scan; see backfill_owners).
Payment.add_index(Payment.index(Payment.id, name="payments_unowned").where(Payment.owner_id.is_null()))


class PaymentEvent(BaseModel):
    """The append-only history of a payment: one row per change (created, confirmed, cancelled,
    expired, deleted, undeleted), written in the transaction that makes the change, so there is
    exactly one per change and none for a change that rolled back. Kept as long as the payment.

    Each row is also the change's webhook event (the outbox): its id is the event's, and the
    payment as the change left it follows from the payment and the row (server/domain/webhooks.py),
    so announcing a change costs its transaction nothing but `dispatched`."""

    number = peewee.BigAutoField()  # the order of events (per payment and overall)
    id = peewee.CharField(max_length=40, unique=True)  # opaque, for the API
    payment_id = peewee.CharField(max_length=40)
    at = UTCDateTimeField()
    action = peewee.CharField(max_length=16)
    from_status = peewee.CharField(max_length=16, null=True)
    to_status = peewee.CharField(max_length=16)
    failure_reason = peewee.CharField(max_length=16, null=True)
    actor_id = peewee.CharField(max_length=40, default="")  # empty: the service itself (expiry)
    actor_role = peewee.CharField(max_length=16)  # customer, admin or system
    # The webhook outbox: false until the delivery job has made the event's deliveries. Null for
    # history from before webhooks (and from an older replica during the rolling update): never sent.
    dispatched = peewee.BooleanField(null=True)
    # A refund's row names it, and the payment's refunded_amount after it (what the event's payment
    # shows); null on every other row, whose payment's refunded_amount is 0 (only a settled payment
    # is refunded, and nothing but refunds happens to it after that).
    refund_id = peewee.CharField(max_length=40, null=True)
    refunded_amount = peewee.BigIntegerField(null=True)

    class Meta:
        table_name = "payment_events"
        indexes = ((("payment_id", "number"), False),)


# Only the events still to fan out are indexed by that (the delivery job's scan, which must say it
# in the same words: a literal, since SQLite allows no parameter in an index's WHERE).
UNDISPATCHED = peewee.SQL('NOT "dispatched"')
PaymentEvent.add_index(PaymentEvent.index(PaymentEvent.number, name="payment_events_undispatched")
                       .where(UNDISPATCHED))


class Refund(BaseModel):
    """Money given back for a settled payment (server/domain/refunds.py): written once, with the
    payment's conditional UPDATE and its history row in one transaction, never changed or deleted.
    `refunded_amount_after` (the payment's total just after it) orders a payment's refunds: the
    UPDATE makes them one at a time, each total is larger than the one before, and the unique
    index holds two refunds of one payment from ever claiming the same total."""

    id = peewee.CharField(primary_key=True, max_length=40)  # opaque, for the API
    payment_id = peewee.CharField(max_length=40)
    amount = peewee.BigIntegerField()
    currency = peewee.CharField(max_length=3)
    reason = peewee.CharField(max_length=32)
    note = peewee.CharField(max_length=500, default="")
    created_by = peewee.CharField(max_length=64)
    request_id = peewee.CharField(max_length=64, null=True)
    request_hash = peewee.CharField(max_length=64, null=True)
    created_at = UTCDateTimeField()
    refunded_amount_after = peewee.BigIntegerField()

    class Meta:
        table_name = "refunds"
        indexes = (
            (("payment_id", "refunded_amount_after"), True),  # a payment's refunds in order, paged
            (("created_by", "request_id"), True),  # idempotency; NULL request_ids never clash
        )


class User(BaseModel):
    """Callers of the API. The earlier brief's unique index on email belongs here."""

    id = peewee.CharField(primary_key=True, max_length=40)
    email = peewee.CharField(max_length=254, unique=True)
    password_hash = peewee.CharField(max_length=255)
    role = peewee.CharField(max_length=16, default="customer")
    created_at = UTCDateTimeField()
    disabled_at = UTCDateTimeField(null=True)  # set: no login, no refresh, every session ends

    class Meta:
        table_name = "users"


class Session(BaseModel):
    """One login: what its access tokens (claim `sid`) and refresh tokens belong to. Revoking it
    (logout, reuse of a refresh token, a role change, a password reset, disabling, an operator)
    ends them all (server/domain/sessions.py). Ended sessions are purged with their refresh
    tokens by the purge job."""

    id = peewee.CharField(primary_key=True, max_length=48)
    user_id = peewee.CharField(max_length=40, index=True)
    # The account's role at the login: no token of the session ever carries another one, and an
    # account whose role is no longer this one has lost the session. NULL: a session started by
    # an older version, which counts as a customer's.
    role = peewee.CharField(max_length=16, null=True)
    created_at = UTCDateTimeField()
    expires_at = UTCDateTimeField()  # the refresh tokens' absolute end: log in again after it
    revoked_at = UTCDateTimeField(null=True)  # indexed only where set: see below the class
    revoke_reason = peewee.CharField(max_length=64, null=True)

    class Meta:
        table_name = "sessions"
        indexes = ((("expires_at", "id"), False),)  # the purge job's scan of expired sessions


# The purge job's scan of revoked sessions: only revoked rows are in it.
Session.add_index(Session.index(Session.revoked_at, Session.id, name="sessions_revoked_set")
                  .where(Session.revoked_at.is_null(False)))


class RefreshToken(BaseModel):
    """A refresh token, by its SHA-256 (the token itself is never stored). Used once; a used one
    is kept as long as its session, so presenting it again is recognised as a reuse."""

    hash = peewee.CharField(primary_key=True, max_length=64)
    session_id = peewee.CharField(max_length=48, index=True)
    issued_at = UTCDateTimeField()
    used_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "refresh_tokens"


class JobRun(BaseModel):
    """One tick of a scheduled job, claimed by the replica that runs it.

    The primary key (job, tick_at) is what makes a tick run once across replicas: the first
    replica to insert the row owns the tick, every other one gets an IntegrityError and skips.
    `tick_at` is the start of the tick's time slot (a multiple of the job's interval since the
    epoch), so replicas whose schedulers are not aligned still agree on it.
    """

    job = peewee.CharField(max_length=32)
    tick_at = UTCDateTimeField()
    replica = peewee.CharField(max_length=128)  # host:pid of the claiming process
    started_at = UTCDateTimeField(index=True)
    finished_at = UTCDateTimeField(null=True)
    outcome = peewee.CharField(max_length=16, default="running")  # running, ok, failed, interrupted
    rows = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "job_runs"
        primary_key = peewee.CompositeKey("job", "tick_at")


class WebhookEndpoint(BaseModel):
    """A URL an admin registered to hear of payment changes (server/domain/webhooks.py).

    The signing secret is stored as it is, because every delivery signs with it (HMAC needs the
    key itself, unlike a password); the API shows it only when it is made."""

    id = peewee.CharField(primary_key=True, max_length=40)
    url = peewee.CharField(max_length=2048)
    event_types = peewee.CharField(max_length=255)  # space-separated, or "*"
    enabled = peewee.BooleanField(default=False)
    description = peewee.CharField(max_length=500, default="")
    disabled_reason = peewee.CharField(max_length=500, null=True)  # set when the service disabled it
    secret = peewee.CharField(max_length=64)
    previous_secret = peewee.CharField(max_length=64, null=True)
    previous_secret_expires_at = UTCDateTimeField(null=True)
    created_at = UTCDateTimeField()
    updated_at = UTCDateTimeField()
    # No attempt before this time: the receiver's Retry-After on a 429 or 503 (a wait for the
    # endpoint, not one delivery: every replica's job reads it here).
    not_before = UTCDateTimeField(null=True)

    class Meta:
        table_name = "webhook_endpoints"
        indexes = ((("created_at", "id"), False),)


class WebhookDelivery(BaseModel):
    """One event's (a payment_events row's) sending to one endpoint: pending until a 2xx (succeeded) or until its retries
    ran out (failed). `lease_until` is the claim of the run that is sending it, so two replicas
    never send the same attempt, and a run that died is taken over once its lease has passed."""

    number = peewee.BigAutoField()
    event_number = peewee.BigIntegerField()
    event_id = peewee.CharField(max_length=40)
    endpoint_id = peewee.CharField(max_length=40)
    payment_id = peewee.CharField(max_length=40)  # with event_number: the payment's order
    status = peewee.CharField(max_length=16, default="pending")
    attempts = peewee.IntegerField(default=0)
    first_attempt_at = UTCDateTimeField(null=True)  # the retry window counts from here
    next_attempt_at = UTCDateTimeField()
    lease_until = UTCDateTimeField(null=True)
    created_at = UTCDateTimeField()
    # Which lease `lease_until` is: every write that follows an attempt names it, so a run whose
    # lease ran out (or was taken back by an admin's redelivery, an enable, a delete) changes nothing.
    lease_token = peewee.CharField(max_length=32, null=True)

    class Meta:
        table_name = "webhook_deliveries"
        indexes = (
            (("event_id", "endpoint_id"), True),  # one per event and endpoint, whoever fans out
            # The job's scan of what is due, one endpoint at a time: a dead endpoint's backlog is
            # never stepped over to reach the others'.
            (("endpoint_id", "status", "next_attempt_at", "number"), False),
            (("endpoint_id", "payment_id", "event_number"), False),  # the payment's order per endpoint
            (("payment_id",), False),  # purged with the payment
        )


class WebhookAttempt(BaseModel):
    """One POST of a delivery, for admins to see what happened."""

    number = peewee.BigAutoField()
    delivery_number = peewee.BigIntegerField(index=True)
    at = UTCDateTimeField()
    http_status = peewee.IntegerField(default=0)  # 0: no answer
    error = peewee.CharField(max_length=500, default="")
    duration_ms = peewee.IntegerField(default=0)

    class Meta:
        table_name = "webhook_attempts"


class ServiceClient(BaseModel):
    """A program that calls the API with credentials of its own (server/domain/clients.py). Its
    secret is stored only as a keyed hash; after a rotation the previous one's hash is kept until
    previous_secret_expires_at."""

    id = peewee.CharField(primary_key=True, max_length=40)
    name = peewee.CharField(max_length=100)
    permissions = peewee.CharField(max_length=255)  # space-separated, sorted
    secret_hash = peewee.CharField(max_length=64)
    secret_prefix = peewee.CharField(max_length=16)
    previous_secret_hash = peewee.CharField(max_length=64, null=True)
    previous_secret_expires_at = UTCDateTimeField(null=True)
    created_by = peewee.CharField(max_length=40, default="")
    created_at = UTCDateTimeField()
    last_used_at = UTCDateTimeField(null=True)
    expires_at = UTCDateTimeField(null=True)
    revoked_at = UTCDateTimeField(null=True)
    tokens_valid_after = UTCDateTimeField(null=True)  # tokens with an earlier iat are refused

    class Meta:
        table_name = "service_clients"
        indexes = ((("created_at", "id"), False),)  # listing, newest first


MODELS: Sequence[type[BaseModel]] = (Payment, PaymentEvent, Refund, User, Session, RefreshToken, JobRun,
                                     WebhookEndpoint, WebhookDelivery, WebhookAttempt, ServiceClient)
