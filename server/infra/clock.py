"""The one clock the rules, the jobs and the webhook deliveries read (server/edge/app.py hands it to
each), so that replicas agree on time: a payment's expiry, the confirm window, job ticks and
delivery leases are decided by several replicas, and each replica's own wall clock could run
ahead (expiring payments early, for good) or step back.

On PostgreSQL the clock is the database's: its time is read (`SELECT statement_timestamp()`) at
most every `refresh_seconds` and carried forward in between with this process's monotonic clock,
so it costs no query per call, follows the database within the read's round trip plus the drift
of the monotonic clock over the refresh interval (microseconds), and never moves with a step of
the host's wall clock. SQLite lives on one host: its clock is the host's wall clock.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("server")

REFRESH_SECONDS = 10.0


def wall() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DatabaseClock:
    """`read()` returns the database's time (aware, UTC). If it fails (the database is away), the
    last reading goes on being carried forward; before any reading, the wall clock stands in."""

    def __init__(self, read: Callable[[], dt.datetime], refresh_seconds: float = REFRESH_SECONDS,
                 monotonic: Callable[[], float] = time.monotonic, fallback: Callable[[], dt.datetime] = wall):
        self._read, self.refresh_seconds = read, refresh_seconds
        self._monotonic, self._fallback = monotonic, fallback
        self._anchor: tuple[dt.datetime, float] | None = None  # (database time, monotonic time then)
        self._lock = threading.Lock()

    def __call__(self) -> dt.datetime:
        anchor, now = self._anchor, self._monotonic()
        if anchor is None or now - anchor[1] >= self.refresh_seconds:
            anchor = self._refresh(anchor)
            if anchor is None:
                return self._fallback()
            now = self._monotonic()
        return anchor[0] + dt.timedelta(seconds=now - anchor[1])

    def _refresh(self, anchor):
        if not self._lock.acquire(blocking=anchor is None):
            return anchor  # another thread is reading it; the old anchor serves meanwhile
        try:
            before = self._monotonic()
            at = self._read()
            after = self._monotonic()
            self._anchor = (at, (before + after) / 2)  # the reading is from the middle of the round trip
        except Exception:
            log.warning("could not read the database's time; carrying the last reading forward", exc_info=True)
        finally:
            self._lock.release()
        return self._anchor


def for_database(database) -> Callable[[], dt.datetime]:
    """The clock for this database: the database's own time on PostgreSQL, the wall clock on SQLite."""
    from server.infra import storage

    if not storage.is_postgres(database):
        return wall

    def read() -> dt.datetime:
        # On the calling thread's connection, which its call gives back as usual (inside a
        # transaction too: statement_timestamp() is this statement's time, not the transaction's).
        (at,) = database.execute_sql("SELECT statement_timestamp()").fetchone()
        return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)

    return DatabaseClock(read)
