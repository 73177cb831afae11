"""The ports the payment rules need, which the assembly (server/edge/app.py) fills with adapters:
the store (server/infra/storage/repository.py's PaymentQueries, or a test's fake) and the clock
(server/infra/clock.py: the database's time where replicas share a database)."""

from __future__ import annotations

import datetime as dt
from typing import Callable, ContextManager, Protocol, Sequence

from server.domain.records import EventRecord, PaymentRecord, RefundRecord

Clock = Callable[[], dt.datetime]


class PaymentStore(Protocol):
    """Every question and change the payment rules put to storage, by name."""

    def transaction(self) -> ContextManager: ...

    def locked(self, payment_id: str) -> ContextManager[PaymentRecord | None]:
        """A transaction in which no other change of this payment can come between its read and its commit."""

    def live(self, payment_id: str, owner_id: str | None = None) -> PaymentRecord | None: ...

    def any(self, payment_id: str) -> PaymentRecord | None: ...

    def by_request_id(self, created_by: str, request_id: str) -> PaymentRecord | None: ...

    def account_id(self, email: str) -> str | None: ...

    def page(self, *, owner_id: str | None, status: str, email: str, after: tuple[dt.datetime, str] | None,
             show_deleted: bool, limit: int) -> list[PaymentRecord]: ...

    def events(self, payment_id: str, *, after_number: int | None, limit: int) -> list[EventRecord]: ...

    def last_event(self, payment_id: str, action: str) -> EventRecord | None: ...

    def due_for_expiry(self, now: dt.datetime, limit: int | None, resume: dict | None = None) -> list[str]: ...

    def due_for_purge(self, before: dt.datetime, limit: int, resume: dict | None = None) -> list[str]: ...

    def insert(self, payment: PaymentRecord) -> None:
        """Raises records.DuplicateRequest if its (created_by, request_id) pair is taken."""

    def insert_events(self, events: Sequence[dict]) -> None: ...

    def leave_pending(self, payment_id: str, status: str, reason: str | None, now: dt.datetime) -> bool: ...

    def soft_delete(self, payment_id: str, now: dt.datetime) -> tuple[str, str | None] | None: ...

    def undelete(self, payment_id: str, now: dt.datetime) -> tuple[str, str | None] | None: ...

    def expire(self, ids: Sequence[str], now: dt.datetime) -> list[str]: ...

    def purge(self, ids: Sequence[str], before: dt.datetime) -> list[str]: ...

    # --- refunds (server/domain/refunds.py) ---

    def refund_by_request_id(self, created_by: str, request_id: str) -> RefundRecord | None: ...

    def refund(self, payment_id: str, refund_id: str) -> RefundRecord | None: ...

    def refunds(self, payment_id: str, *, after_total: int | None, limit: int) -> list[RefundRecord]: ...

    def add_refunded(self, payment_id: str, amount: int, currency: str, expected: int | None,
                     now: dt.datetime) -> PaymentRecord | None:
        """One conditional UPDATE: the payment after it, or None if it is not a live success payment
        in `currency` with room for `amount` (and refunded `expected`, if given)."""

    def insert_refund(self, refund: RefundRecord) -> None:
        """Raises records.DuplicateRequest if its (created_by, request_id) pair is taken."""
