"""When a failed call is sent again, and when not.

A create is retried only with the request_id of its first attempt: the service answers a repeat
of the same request_id and body with the first call's payment, so a retry can never make a second
payment, whatever happened to the first attempt. Which failures are worth that retry:

- UNAVAILABLE: Envoy found no server, the connection broke, or the database was unreachable
  (DATABASE_UNAVAILABLE): the call may or may not have been carried out; the request_id makes
  repeating it harmless, and the next attempt may reach a healthy replica.
- DEADLINE_EXCEEDED on one attempt (not on the whole budget): the payment may exist already;
  the repeat returns it.
- RESOURCE_EXHAUSTED with SERVER_BUSY or RATE_LIMITED: refused before any work, and the
  service says when to come back (RetryInfo); we wait at least that long.
- ABORTED: gRPC's "retry at a higher level".

Never retried: INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, PERMISSION_DENIED
(the same request gets the same answer), INTERNAL and UNKNOWN (a defect: repeating the same bytes
hammers it and fixes nothing), RESOURCE_EXHAUSTED for any other reason (LOGIN_THROTTLED,
TOO_MANY_ATTEMPTS: credentials being throttled must not be retried into a lockout). UNAUTHENTICATED
is a case of its own (the client renews its token once and repeats: the token is checked before
the method runs, so nothing was done).

A read is retried on the same codes (it changes nothing). Confirm and cancel are not retried: a
repeat after a lost answer gets PAYMENT_NOT_PENDING for a change that happened, which is worse than
the honest UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable

import grpc

from payments_client import errors

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
RETRYABLE_EXHAUSTED = frozenset({"SERVER_BUSY", "RATE_LIMITED"})


def retryable(error: errors.PaymentsError) -> bool:
    if error.code in RETRYABLE:
        return True
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason in RETRYABLE_EXHAUSTED


@dataclasses.dataclass
class RetryPolicy:
    """At most `attempts` attempts within `budget` seconds in all (each attempt's deadline is the
    client's per-call deadline, cut to what is left of the budget); between them, exponential
    backoff with full jitter (`base` doubling to `cap`), or the service's RetryInfo delay if longer."""

    attempts: int = 4
    budget: float = 20.0
    base: float = 0.1
    cap: float = 2.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    jitter: Callable[[float], float] = dataclasses.field(default=lambda top: random.uniform(0, top))

    def delay(self, attempt: int, error: errors.PaymentsError) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        backoff = self.jitter(min(self.cap, self.base * 2 ** (attempt - 1)))
        return max(backoff, error.retry_after or 0.0)


NO_RETRY = RetryPolicy(attempts=1)
