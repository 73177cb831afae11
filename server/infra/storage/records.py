"""The records reads come back as: frozen rows, so nothing above storage depends on peewee; and the
columns each is read from."""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from server.infra.storage.models import Payment, PaymentEvent


class PaymentRecord(NamedTuple):
    """A payment row (the columns of storage.models.Payment, in its order)."""

    id: str
    email: str
    owner_id: str | None
    amount: int
    currency: str
    description: str
    status: str
    failure_reason: str | None
    created_by: str
    request_id: str | None
    request_hash: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    expires_at: dt.datetime
    deleted_at: dt.datetime | None


class EventRecord(NamedTuple):
    """One change of a payment (storage.models.PaymentEvent)."""

    number: int
    id: str
    payment_id: str
    at: dt.datetime
    action: str
    from_status: str | None
    to_status: str
    failure_reason: str | None
    actor_id: str
    actor_role: str


# The columns a record is read from, in its order (every read of the history names them: the
# table also has the outbox's `dispatched`, which no record carries).
PAYMENT_COLUMNS = tuple(getattr(Payment, name) for name in PaymentRecord._fields)
EVENT_COLUMNS = tuple(getattr(PaymentEvent, name) for name in EventRecord._fields)
