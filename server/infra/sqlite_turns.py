"""On SQLite, payment calls take turns with the database: at most two at a time.

Python threads and SQLite form a convoy: the sqlite3 module releases the GIL for every row it
steps, and with 16 runnable handler threads each release hands the GIL to another thread for up
to the interpreter's switch interval, so a page of 20 rows waits twenty times. Measured on 2 cores
(16 threads each listing pages of 20 from a million-row table): 180 pages/s all at once, 590/s
taking turns two at a time, the same as 1-4 threads. PostgreSQL answers a query in one round trip
and needs no turns.

Only PaymentService calls take turns: Register and Login spend their time in the password hash,
and must not hold a turn while hashing (a flood of logins would then stall every payment call).
"""

from __future__ import annotations

import functools
import queue

TURNS = 2
PAYMENT_SERVICE = "/payments.v1.PaymentService/"


def takes_turns(method: str) -> bool:
    return method.startswith(PAYMENT_SERVICE)


class Turns:
    """`count` turns, held for the whole of a payment call (server/edge/interceptor.py): take() waits for
    one, give() hands it back. The turns are tokens in a SimpleQueue, whose get and put are C
    code; threading.BoundedSemaphore is Python code around a Condition, and with 16 threads
    queueing for two turns it cost a twentieth of a GetPayment."""

    def __init__(self, count: int = TURNS):
        tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(count):
            tokens.put(None)
        self.take = tokens.get
        self.give = functools.partial(tokens.put, None)
        self.free = tokens.qsize  # turns not taken now
