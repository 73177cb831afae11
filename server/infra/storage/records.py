"""The columns each of the domain's records (server/domain/records.py) is read from: reads come
back as those frozen rows, so nothing above storage depends on peewee."""

from __future__ import annotations

from server.domain.records import EventRecord, PaymentRecord, RefundRecord
from server.infra.storage.models import Payment, PaymentEvent, Refund

__all__ = ["EVENT_COLUMNS", "EventRecord", "PAYMENT_COLUMNS", "PaymentRecord", "REFUND_COLUMNS", "RefundRecord"]


# The columns a record is read from, in its order (every read of the history names them: the
# table also has the outbox's `dispatched`, which no record carries).
PAYMENT_COLUMNS = tuple(getattr(Payment, name) for name in PaymentRecord._fields)
EVENT_COLUMNS = tuple(getattr(PaymentEvent, name) for name in EventRecord._fields)
REFUND_COLUMNS = tuple(getattr(Refund, name) for name in RefundRecord._fields)
