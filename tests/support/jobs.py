"""Helpers shared by the scheduled-job tests: bulk rows and deadline polling."""

from __future__ import annotations

import datetime as dt
import time
from typing import Callable, TypeVar

from server.infra import storage
from server.domain.payments import FAILED, PENDING, new_payment_id
from server.infra.storage import Payment

T = TypeVar("T")


def insert_payments(count: int, *, created_at: dt.datetime, ttl: dt.timedelta, status: str = PENDING,
                    deleted_at: dt.datetime | None = None, email: str = "alice@example.com") -> list[str]:
    """`count` payment rows written directly (fast: many rows per INSERT), returning their ids."""
    rows = [
        dict(id=new_payment_id(), email=email, amount=100, currency="IDR", description="", status=status,
             failure_reason=None if status != FAILED else "cancelled", created_by="usr_alice",
             created_at=created_at, updated_at=created_at, expires_at=created_at + ttl, deleted_at=deleted_at)
        for _ in range(count)
    ]
    with storage.db.atomic():
        for start in range(0, count, 500):
            Payment.insert_many(rows[start:start + 500]).execute()
    return [r["id"] for r in rows]


def wait_for(probe: Callable[[], T], *, timeout: float, interval: float = 0.1, what: str = "condition") -> T:
    """Poll until probe() returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
