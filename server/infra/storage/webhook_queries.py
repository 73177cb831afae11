"""The webhook queries, by name: what server/domain/webhooks.py and webhook_delivery.py ask of the
database. Reads come back as records (the domain's, and the repository's for payments and their
history, whose rows are the events); the writes the delivery job races on (lease, record_attempts,
release) are single conditional statements, and every write after an attempt names the lease it
ran under (lease_token), so a late writer changes nothing. What admins do to an endpoint that
reads before it writes runs under the endpoint's row lock (`locked_endpoint`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Collection, Iterable, Iterator, Sequence

import peewee

from server.domain.webhooks import PENDING, AttemptRecord, DeliveryRecord, EndpointRecord
from server.infra.storage.fastpath import among
from server.infra.storage.database import is_postgres
from server.infra.storage.models import (UNDISPATCHED, Payment, PaymentEvent, Refund, WebhookAttempt, WebhookDelivery,
                                         WebhookEndpoint, db)
from server.infra.storage.records import (EVENT_COLUMNS, PAYMENT_COLUMNS, REFUND_COLUMNS, EventRecord, PaymentRecord,
                                          RefundRecord)


def _with_payments(query) -> list[tuple[EventRecord, PaymentRecord, RefundRecord | None]]:
    """(event, payment, refund) of a query over history rows joined to their payments and, for a
    refund's row, its refund (None for the others)."""
    cut, more = len(EVENT_COLUMNS), len(EVENT_COLUMNS) + len(PAYMENT_COLUMNS)
    return [(EventRecord(*row[:cut]), PaymentRecord(*row[cut:more]),
             RefundRecord(*row[more:]) if row[more] is not None else None) for row in query.tuples()]


def _events():
    return (PaymentEvent.select(*EVENT_COLUMNS, *PAYMENT_COLUMNS, *REFUND_COLUMNS)
            .join(Payment, on=(PaymentEvent.payment_id == Payment.id))
            .join(Refund, peewee.JOIN.LEFT_OUTER, on=(PaymentEvent.refund_id == Refund.id)))


def _delete_deliveries(which) -> None:
    """The deliveries matching `which`, then their attempts (call it in a transaction). The
    deliveries go first: an attempt's outcome is written only to a delivery it still finds (the
    conditional UPDATE of record_attempts, which waits for a delete's row locks), so an attempt
    that committed first is seen and removed here, and one that comes later finds no delivery and
    adds nothing: no attempt outlives its delivery."""
    numbers = [n for (n,) in WebhookDelivery.delete().where(which).returning(WebhookDelivery.number).tuples().execute()]
    for start in range(0, len(numbers), 500):
        WebhookAttempt.delete().where(among(WebhookAttempt.delivery_number, numbers[start:start + 500])).execute()


def _due(query, endpoint_id: str, now: dt.datetime, limit: int, after: tuple[dt.datetime, int] | None):
    """An endpoint's pending deliveries whose time has come and that no live run holds, by next
    attempt (the index on endpoint, status, next attempt, number), after `after`."""
    query = query.where(
        (WebhookDelivery.endpoint_id == endpoint_id) & (WebhookDelivery.status == PENDING)
        & (WebhookDelivery.next_attempt_at <= now)
        & (WebhookDelivery.lease_until.is_null() | (WebhookDelivery.lease_until < now)))
    if after is not None:
        query = query.where(peewee.Tuple(WebhookDelivery.next_attempt_at, WebhookDelivery.number)
                            > peewee.Tuple(WebhookDelivery.next_attempt_at.db_value(after[0]), after[1]))
    return query.order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.number).limit(limit)


_ENDPOINTS_LOCK_KEY = 0x77686B5F6C696D  # "whk_lim": creating endpoints, one at a time, under the limit
_FAN_OUT_LOCK_KEY = 0x77686B5F666F75  # "whk_fou": one replica fans out at a time


def _endpoints(query) -> list[EndpointRecord]:
    return [EndpointRecord(*row) for row in query.tuples()]


class WebhookQueries:
    transaction = staticmethod(db.atomic)


    # --- endpoints ---------------------------------------------------------------------------

    def insert_endpoint(self, row: EndpointRecord, max_endpoints: int | None = None) -> bool:
        """The endpoint, unless `max_endpoints` exist already (counted and inserted under one lock:
        PostgreSQL's transaction-level advisory lock, SQLite's write lock); whether it was."""
        if max_endpoints is None:
            WebhookEndpoint.insert(row._asdict()).execute()
            return True
        with db.atomic() if is_postgres() else db.atomic("IMMEDIATE"):
            if is_postgres():
                db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_ENDPOINTS_LOCK_KEY,))
            if WebhookEndpoint.select().count() >= max_endpoints:
                return False
            WebhookEndpoint.insert(row._asdict()).execute()
            return True

    def endpoint(self, endpoint_id: str) -> EndpointRecord | None:
        rows = _endpoints(WebhookEndpoint.select().where(WebhookEndpoint.id == endpoint_id).limit(1))
        return rows[0] if rows else None

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

    @contextlib.contextmanager
    def locked_endpoint(self, endpoint_id: str) -> Iterator[EndpointRecord | None]:
        """A transaction holding the endpoint's row (SELECT ... FOR UPDATE; on SQLite the write
        lock, BEGIN IMMEDIATE) from its read to its commit: what an admin's change decides from
        the endpoint is still so when it writes."""
        if is_postgres():
            with db.atomic():
                rows = _endpoints(WebhookEndpoint.select().where(WebhookEndpoint.id == endpoint_id).for_update())
                yield rows[0] if rows else None
        else:
            with db.atomic("IMMEDIATE"):
                yield self.endpoint(endpoint_id)

    def disable_endpoint(self, endpoint_id: str, reason: str, now: dt.datetime) -> None:
        WebhookEndpoint.update(enabled=False, disabled_reason=reason[:500], updated_at=now).where(
            WebhookEndpoint.id == endpoint_id).execute()

    def enable_endpoint(self, endpoint_id: str, now: dt.datetime) -> bool:
        """Enabled if it was disabled (one conditional UPDATE): the reason and any Retry-After wait
        cleared; whether it was disabled (so this call resumes its deliveries)."""
        return bool(WebhookEndpoint.update(enabled=True, disabled_reason=None, not_before=None, updated_at=now)
                    .where((WebhookEndpoint.id == endpoint_id) & (WebhookEndpoint.enabled == False))  # noqa: E712
                    .execute())

    def rotate_secret(self, endpoint_id: str, secret: str, previous_expires_at: dt.datetime,
                      now: dt.datetime) -> bool:
        """One statement: the current secret becomes the previous one, whatever it is by then, so
        two rotations at once chain (the first's secret is the second's previous one) and every
        secret handed out signs for as long as promised."""
        return bool(WebhookEndpoint.update(previous_secret=WebhookEndpoint.secret, secret=secret,
                                           previous_secret_expires_at=previous_expires_at, updated_at=now)
                    .where(WebhookEndpoint.id == endpoint_id).execute())

    def delete_endpoint(self, endpoint_id: str) -> bool:
        _delete_deliveries(WebhookDelivery.endpoint_id == endpoint_id)
        return bool(WebhookEndpoint.delete().where(WebhookEndpoint.id == endpoint_id).execute())

    def resume_deliveries(self, endpoint_id: str, now: dt.datetime) -> None:
        """The endpoint's pending deliveries, due now with a fresh schedule (an admin enabled it
        again): no attempts counted, a new window, and any lease taken back (a run still sending
        one of them writes nothing when it ends)."""
        WebhookDelivery.update(next_attempt_at=now, first_attempt_at=None, attempts=0, lease_until=None,
                               lease_token=None).where(
            (WebhookDelivery.endpoint_id == endpoint_id) & (WebhookDelivery.status == PENDING)).execute()

    # --- events ------------------------------------------------------------------------------

    def event(self, event_id: str) -> tuple[EventRecord, PaymentRecord, RefundRecord | None] | None:
        rows = _with_payments(_events().where(PaymentEvent.id == event_id).limit(1))
        return rows[0] if rows else None

    def events_page(self, *, before_number: int | None, payment_id: str, actions: Sequence[str],
                    limit: int) -> list[tuple[EventRecord, PaymentRecord, RefundRecord | None]]:
        """Newest first; history from before webhooks (dispatched null) is not an event."""
        query = _events().where(PaymentEvent.dispatched.is_null(False))
        if payment_id:
            query = query.where(PaymentEvent.payment_id == payment_id)
        if actions:
            query = query.where(PaymentEvent.action.in_(list(actions)))
        if before_number is not None:
            query = query.where(PaymentEvent.number < before_number)
        return _with_payments(query.order_by(PaymentEvent.number.desc()).limit(limit))

    def payloads(self, event_numbers: Iterable[int]) -> dict[int, tuple[EventRecord, PaymentRecord, RefundRecord | None]]:
        numbers = sorted(set(event_numbers))
        if not numbers:
            return {}
        return {row[0].number: row for row in _with_payments(_events().where(PaymentEvent.number.in_(numbers)))}

    @contextlib.contextmanager
    def fan_out_turn(self) -> Iterator[list[EndpointRecord] | None]:
        """A transaction for one fan-out batch, yielding the enabled endpoints, held until it
        commits (None: another replica is fanning out; its turn is not waited for).

        - One replica fans out at a time (PostgreSQL: a transaction-level advisory lock, tried,
          never waited for): two would take the same events and wait on each other's inserts.
        - The endpoints are held: PostgreSQL's FOR SHARE, which an admin's delete (locked_endpoint's
          FOR UPDATE) or change (its UPDATE) waits for and which waits for them, then reads the row
          as they left it; SQLite's write lock (BEGIN IMMEDIATE), which they take too. So a delete
          either comes first (the endpoint is not fanned out to) or removes the rows this batch
          made: no delivery is ever made for an endpoint already deleted."""
        if is_postgres():
            with db.atomic():
                if not db.execute_sql("SELECT pg_try_advisory_xact_lock(%s)", (_FAN_OUT_LOCK_KEY,)).fetchone()[0]:
                    yield None
                    return
                yield _endpoints(WebhookEndpoint.select().where(WebhookEndpoint.enabled == True)  # noqa: E712
                                 .order_by(WebhookEndpoint.id).for_update("FOR SHARE"))
        else:
            with db.atomic("IMMEDIATE"):
                yield self.enabled_endpoints()

    def undispatched(self, limit: int) -> list[EventRecord]:
        query = PaymentEvent.select(*EVENT_COLUMNS).where(UNDISPATCHED).order_by(PaymentEvent.number).limit(limit)
        return [EventRecord(*r) for r in query.tuples()]

    def mark_dispatched(self, numbers: Sequence[int]) -> None:
        PaymentEvent.update(dispatched=True).where(among(PaymentEvent.number, list(numbers))).execute()

    def purge_deliveries(self, payment_ids: Sequence[str]) -> None:
        """The deliveries and attempts of payments removed for good (their events go with their history)."""
        if payment_ids:
            _delete_deliveries(among(WebhookDelivery.payment_id, payment_ids))

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
        return [DeliveryRecord(*r) for r in _due(WebhookDelivery.select(), endpoint_id, now, limit, after).tuples()]

    def claim(self, endpoint_id: str, now: dt.datetime, limit: int, until: dt.datetime, token: str,
              skip: Collection[int] = ()) -> list[DeliveryRecord]:
        """`due`'s deliveries, leased to `token` until `until` in the same statement, by next
        attempt: what this run now holds. Several replicas claiming at once get disjoint pieces,
        each the next free one: on PostgreSQL the scan skips the rows another claim is leasing
        (FOR UPDATE SKIP LOCKED) instead of waiting for them and then finding them gone; on
        SQLite the statement runs under the file's one write lock, so claims from several
        processes follow one another. The outer conditions are checked again on each row (a
        lease taken between the scan and the lock is kept). `skip`: deliveries this run has
        already held back (a payment's later events waiting for an earlier one)."""
        pick = _due(WebhookDelivery.select(WebhookDelivery.number), endpoint_id, now, limit, None)
        if skip:
            pick = pick.where(WebhookDelivery.number.not_in(sorted(skip)))
        update = WebhookDelivery.update(lease_until=until, lease_token=token)
        if is_postgres():
            # A materialized CTE: the scan runs once. As `IN (sub-select)` PostgreSQL may run it
            # again for each row, and each run skips the rows this statement just updated and
            # takes the next ones, so a claim of 1 leased two.
            picked = pick.for_update("FOR UPDATE SKIP LOCKED").cte("picked", materialized=True)
            update = update.with_cte(picked)
            pick = picked.select(picked.c.number)
        free = WebhookDelivery.lease_until.is_null() | (WebhookDelivery.lease_until < now)
        with db.atomic():
            rows = (update.where(WebhookDelivery.number.in_(pick) & (WebhookDelivery.status == PENDING) & free)
                    .returning(*WebhookDelivery._meta.sorted_fields).tuples().execute())
            claimed = [DeliveryRecord(*r) for r in rows]
        return sorted(claimed, key=lambda d: (d.next_attempt_at, d.number))

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

    def lease(self, numbers: Sequence[int], now: dt.datetime, until: dt.datetime, token: str) -> list[int]:
        """Those of `numbers` this run now holds under `token`: still pending, and no live lease on them."""
        if not numbers:
            return []
        free = WebhookDelivery.lease_until.is_null() | (WebhookDelivery.lease_until < now)
        with db.atomic():
            return [n for (n,) in WebhookDelivery.update(lease_until=until, lease_token=token)
                    .where(among(WebhookDelivery.number, list(numbers)) & (WebhookDelivery.status == PENDING) & free)
                    .returning(WebhookDelivery.number).tuples().execute()]

    def release(self, numbers: Sequence[int], token: str) -> None:
        """The leases `token` still holds on `numbers` end (a lease since taken over stays)."""
        if numbers:
            WebhookDelivery.update(lease_until=None, lease_token=None).where(
                among(WebhookDelivery.number, list(numbers)) & (WebhookDelivery.lease_token == token)).execute()

    def record_attempts(self, outcomes: Sequence, endpoint_id: str, token: str) -> list[int]:
        """webhook_delivery.Outcome rows, in one transaction, each only if its delivery is still
        pending under the lease `token` it was sent under: the attempt, the delivery's new state
        (the lease ends), the endpoint disabled if it gave up or was answered 410, its wait extended
        if it was answered a Retry-After. The deliveries whose lease had passed to someone else
        (ran out and taken by another run, or taken back by a redelivery, an enable, a delete or a
        purge) get nothing written: their numbers are returned, the late writes."""
        if not outcomes:
            return []
        late: list[int] = []
        with db.atomic():
            applied = []
            for o in outcomes:
                mine = ((WebhookDelivery.number == o.delivery_number) & (WebhookDelivery.lease_token == token)
                        & (WebhookDelivery.status == PENDING))
                if WebhookDelivery.update(status=o.status, attempts=WebhookDelivery.attempts + 1,
                                          first_attempt_at=o.first_attempt_at, next_attempt_at=o.next_attempt_at,
                                          lease_until=None, lease_token=None).where(mine).execute():
                    applied.append(o)
                else:
                    late.append(o.delivery_number)
            if applied:
                WebhookAttempt.insert_many([o.attempt for o in applied]).execute()
            for o in applied:
                if o.disable:
                    self.disable_endpoint(endpoint_id, o.disable, o.attempt["at"])
                if o.hold is not None:
                    self.hold_endpoint(endpoint_id, o.hold)
        return late

    def hold_endpoint(self, endpoint_id: str, until: dt.datetime) -> None:
        """No attempt to the endpoint before `until` (a later wait already asked for stays)."""
        WebhookEndpoint.update(not_before=until).where(
            (WebhookEndpoint.id == endpoint_id)
            & (WebhookEndpoint.not_before.is_null() | (WebhookEndpoint.not_before < until))).execute()

    def redeliver(self, event: EventRecord, endpoint_id: str, now: dt.datetime) -> DeliveryRecord:
        """Pending, due now, with a fresh schedule (no attempts counted, a new window) and no lease:
        a run still sending it writes nothing when it ends. Call it under locked_endpoint."""
        WebhookDelivery.insert({"event_number": event.number, "event_id": event.id, "endpoint_id": endpoint_id,
                                "payment_id": event.payment_id, "status": PENDING, "attempts": 0,
                                "first_attempt_at": None, "next_attempt_at": now, "lease_until": None,
                                "created_at": now}).on_conflict_ignore().execute()
        WebhookDelivery.update(status=PENDING, attempts=0, first_attempt_at=None, next_attempt_at=now,
                               lease_until=None, lease_token=None).where(
            (WebhookDelivery.event_id == event.id) & (WebhookDelivery.endpoint_id == endpoint_id)).execute()
        row = WebhookDelivery.select().where((WebhookDelivery.event_id == event.id)
                                             & (WebhookDelivery.endpoint_id == endpoint_id)).tuples().get()
        return DeliveryRecord(*row)
