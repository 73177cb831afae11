"""The webhook queries, by name: what server/domain/webhooks.py and webhook_delivery.py ask of the
database. Reads come back as the domain's records; the writes the delivery job races on (lease,
record_attempt) are single conditional statements.
"""

from __future__ import annotations

import datetime as dt
from typing import Iterable, Sequence

import peewee

from server.domain.webhooks import (PENDING, AttemptRecord, DeliveryRecord, EndpointRecord, WebhookEventRecord)
from server.infra.storage.fastpath import PreparedInsert, among
from server.infra.storage.models import UNDISPATCHED, WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEvent, db


def _endpoints(query) -> list[EndpointRecord]:
    return [EndpointRecord(*row) for row in query.tuples()]


class WebhookQueries:
    transaction = staticmethod(db.atomic)

    def __init__(self):
        # The outbox insert runs inside every payment change: its SQL is built once.
        self._insert_events = PreparedInsert(WebhookEvent)

    # --- endpoints ---------------------------------------------------------------------------

    def insert_endpoint(self, row: EndpointRecord) -> None:
        WebhookEndpoint.insert(row._asdict()).execute()

    def endpoint(self, endpoint_id: str) -> EndpointRecord | None:
        rows = _endpoints(WebhookEndpoint.select().where(WebhookEndpoint.id == endpoint_id).limit(1))
        return rows[0] if rows else None

    def endpoints(self, ids: Iterable[str]) -> list[EndpointRecord]:
        ids = sorted(set(ids))
        return _endpoints(WebhookEndpoint.select().where(WebhookEndpoint.id.in_(ids))) if ids else []

    def enabled_endpoints(self) -> list[EndpointRecord]:
        return _endpoints(WebhookEndpoint.select().where(WebhookEndpoint.enabled == True))  # noqa: E712

    def endpoints_page(self, *, after: tuple[dt.datetime, str] | None, limit: int) -> list[EndpointRecord]:
        query = WebhookEndpoint.select()
        if after is not None:
            query = query.where(peewee.Tuple(WebhookEndpoint.created_at, WebhookEndpoint.id)
                                < peewee.Tuple(WebhookEndpoint.created_at.db_value(after[0]), after[1]))
        return _endpoints(query.order_by(WebhookEndpoint.created_at.desc(), WebhookEndpoint.id.desc()).limit(limit))

    def update_endpoint(self, endpoint_id: str, fields: dict) -> bool:
        return bool(WebhookEndpoint.update(**fields).where(WebhookEndpoint.id == endpoint_id).execute())

    def disable_endpoint(self, endpoint_id: str, reason: str, now: dt.datetime) -> None:
        WebhookEndpoint.update(enabled=False, disabled_reason=reason[:500], updated_at=now).where(
            WebhookEndpoint.id == endpoint_id).execute()

    def delete_endpoint(self, endpoint_id: str) -> bool:
        deliveries = WebhookDelivery.select(WebhookDelivery.number).where(WebhookDelivery.endpoint_id == endpoint_id)
        WebhookAttempt.delete().where(WebhookAttempt.delivery_number.in_(deliveries)).execute()
        WebhookDelivery.delete().where(WebhookDelivery.endpoint_id == endpoint_id).execute()
        return bool(WebhookEndpoint.delete().where(WebhookEndpoint.id == endpoint_id).execute())

    def resume_deliveries(self, endpoint_id: str, now: dt.datetime) -> None:
        """The endpoint's pending deliveries, due now (an admin enabled it again)."""
        WebhookDelivery.update(next_attempt_at=now, first_attempt_at=None).where(
            (WebhookDelivery.endpoint_id == endpoint_id) & (WebhookDelivery.status == PENDING)).execute()

    # --- events ------------------------------------------------------------------------------

    def insert_events(self, rows: Sequence[dict]) -> None:
        self._insert_events.many(rows)

    def event(self, event_id: str) -> WebhookEventRecord | None:
        rows = list(WebhookEvent.select().where(WebhookEvent.id == event_id).limit(1).tuples())
        return WebhookEventRecord(*rows[0]) if rows else None

    def events_page(self, *, before_number: int | None, payment_id: str, event_type: str,
                    limit: int) -> list[WebhookEventRecord]:
        query = WebhookEvent.select()
        if payment_id:
            query = query.where(WebhookEvent.payment_id == payment_id)
        if event_type:
            query = query.where(WebhookEvent.type == event_type)
        if before_number is not None:
            query = query.where(WebhookEvent.number < before_number)
        return [WebhookEventRecord(*r) for r in query.order_by(WebhookEvent.number.desc()).limit(limit).tuples()]

    def bodies(self, event_numbers: Iterable[int]) -> dict[int, str]:
        numbers = sorted(set(event_numbers))
        if not numbers:
            return {}
        return dict(WebhookEvent.select(WebhookEvent.number, WebhookEvent.body)
                    .where(WebhookEvent.number.in_(numbers)).tuples())

    def undispatched(self, limit: int) -> list[WebhookEventRecord]:
        query = WebhookEvent.select().where(UNDISPATCHED)
        return [WebhookEventRecord(*r) for r in query.order_by(WebhookEvent.number).limit(limit).tuples()]

    def mark_dispatched(self, numbers: Sequence[int]) -> None:
        WebhookEvent.update(dispatched=True).where(among(WebhookEvent.number, numbers)).execute()

    def purge_events(self, payment_ids: Sequence[str]) -> None:
        """The events of payments removed for good, with their deliveries and attempts."""
        if not payment_ids:
            return
        deliveries = WebhookDelivery.select(WebhookDelivery.number).where(among(WebhookDelivery.payment_id, payment_ids))
        WebhookAttempt.delete().where(WebhookAttempt.delivery_number.in_(deliveries)).execute()
        WebhookDelivery.delete().where(among(WebhookDelivery.payment_id, payment_ids)).execute()
        WebhookEvent.delete().where(among(WebhookEvent.payment_id, payment_ids)).execute()

    # --- deliveries --------------------------------------------------------------------------

    def add_deliveries(self, rows: Sequence[dict]) -> None:
        """Each (event, endpoint) once, whoever fans out first."""
        for start in range(0, len(rows), 200):
            WebhookDelivery.insert_many(rows[start:start + 200]).on_conflict_ignore().execute()

    def deliveries_of(self, event_ids: Sequence[str]) -> list[DeliveryRecord]:
        if not event_ids:
            return []
        query = WebhookDelivery.select().where(among(WebhookDelivery.event_id, list(event_ids)))
        return [DeliveryRecord(*r) for r in query.order_by(WebhookDelivery.number).tuples()]

    def attempts_of(self, delivery_numbers: Sequence[int]) -> dict[int, list[AttemptRecord]]:
        if not delivery_numbers:
            return {}
        out: dict[int, list[AttemptRecord]] = {}
        query = WebhookAttempt.select().where(among(WebhookAttempt.delivery_number, list(delivery_numbers)))
        for row in query.order_by(WebhookAttempt.number).tuples():
            record = AttemptRecord(*row)
            out.setdefault(record.delivery_number, []).append(record)
        return out

    def due(self, endpoint_id: str, now: dt.datetime, limit: int,
            after: tuple[dt.datetime, int] | None = None) -> list[DeliveryRecord]:
        """The endpoint's pending deliveries whose time has come, not leased by a live run, by next
        attempt; after `after` (next_attempt_at, number), where the run's last batch ended."""
        query = WebhookDelivery.select().where(
            (WebhookDelivery.endpoint_id == endpoint_id) & (WebhookDelivery.status == PENDING)
            & (WebhookDelivery.next_attempt_at <= now)
            & (WebhookDelivery.lease_until.is_null() | (WebhookDelivery.lease_until < now)))
        if after is not None:
            query = query.where(peewee.Tuple(WebhookDelivery.next_attempt_at, WebhookDelivery.number)
                                > peewee.Tuple(WebhookDelivery.next_attempt_at.db_value(after[0]), after[1]))
        query = query.order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.number).limit(limit)
        return [DeliveryRecord(*r) for r in query.tuples()]

    def pending_order(self, endpoint_id: str, payment_ids: Iterable[str]) -> dict[str, list[int]]:
        """For these payments, the endpoint's pending deliveries of each, in event order."""
        ids = sorted(set(payment_ids))
        out: dict[str, list[int]] = {}
        if not ids:
            return out
        query = (WebhookDelivery.select(WebhookDelivery.payment_id, WebhookDelivery.number)
                 .where((WebhookDelivery.endpoint_id == endpoint_id) & among(WebhookDelivery.payment_id, ids)
                        & (WebhookDelivery.status == PENDING))
                 .order_by(WebhookDelivery.payment_id, WebhookDelivery.event_number))
        for payment_id, number in query.tuples():
            out.setdefault(payment_id, []).append(number)
        return out

    def lease(self, numbers: Sequence[int], now: dt.datetime, until: dt.datetime) -> list[int]:
        """Those of `numbers` this run now holds: still pending, and no live lease on them."""
        if not numbers:
            return []
        free = WebhookDelivery.lease_until.is_null() | (WebhookDelivery.lease_until < now)
        with db.atomic():
            return [n for (n,) in WebhookDelivery.update(lease_until=until)
                    .where(among(WebhookDelivery.number, list(numbers)) & (WebhookDelivery.status == PENDING) & free)
                    .returning(WebhookDelivery.number).tuples().execute()]

    def release(self, numbers: Sequence[int]) -> None:
        if numbers:
            WebhookDelivery.update(lease_until=None).where(among(WebhookDelivery.number, list(numbers))).execute()

    def record_attempt(self, delivery_number: int, attempt: dict, *, status: str, first_attempt_at: dt.datetime,
                       next_attempt_at: dt.datetime) -> None:
        with db.atomic():
            WebhookAttempt.insert(attempt).execute()
            WebhookDelivery.update(status=status, attempts=WebhookDelivery.attempts + 1, first_attempt_at=first_attempt_at,
                                   next_attempt_at=next_attempt_at, lease_until=None).where(
                WebhookDelivery.number == delivery_number).execute()

    def redeliver(self, event: WebhookEventRecord, endpoint_id: str, now: dt.datetime) -> DeliveryRecord:
        with db.atomic():
            WebhookDelivery.insert({"event_number": event.number, "event_id": event.id, "endpoint_id": endpoint_id,
                                    "payment_id": event.payment_id, "status": PENDING, "attempts": 0,
                                    "first_attempt_at": None, "next_attempt_at": now, "lease_until": None,
                                    "created_at": now}).on_conflict_ignore().execute()
            WebhookDelivery.update(status=PENDING, first_attempt_at=None, next_attempt_at=now).where(
                (WebhookDelivery.event_id == event.id) & (WebhookDelivery.endpoint_id == endpoint_id)).execute()
        row = WebhookDelivery.select().where((WebhookDelivery.event_id == event.id)
                                             & (WebhookDelivery.endpoint_id == endpoint_id)).tuples().get()
        return DeliveryRecord(*row)
