"""Failed logins for one email slow down, without locking the real owner out for long.

Per-address limits at Envoy stop a flood from one place; this stops slow guessing against one
account from many places. After FREE_FAILURES wrong passwords in a row, each further attempt
for that email must wait 1, 2, 4 ... seconds, at most MAX_DELAY_SECONDS (the owner, who knows
the password, is held up for at most that long), and the count is forgotten FORGET_SECONDS
after the last failure or at the next correct login. A refused attempt costs no password hash.

Every email is tracked the same way whether or not it has an account, so a 429 says nothing
about who is a customer. The count lives in this process: with several replicas an attacker
gets FREE_FAILURES per replica, and then the same delays on each.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import threading

from server.domain.errors import ResourceExhausted

FREE_FAILURES = 5
MAX_DELAY_SECONDS = 30
FORGET_SECONDS = 15 * 60
MAX_TRACKED = 100_000  # emails remembered at once (the least recently failed are forgotten)


@dataclasses.dataclass
class _Failures:
    count: int
    last: dt.datetime
    next_allowed: dt.datetime


class LoginThrottle:
    def __init__(self):
        self._lock = threading.Lock()
        self._by_email: collections.OrderedDict[str, _Failures] = collections.OrderedDict()

    def check(self, email: str, now: dt.datetime) -> None:
        """Raise ResourceExhausted (LOGIN_THROTTLED) if this email must wait before trying again."""
        with self._lock:
            entry = self._by_email.get(email)
            if entry is None:
                return
            if (now - entry.last).total_seconds() > FORGET_SECONDS:
                del self._by_email[email]
                return
            wait = (entry.next_allowed - now).total_seconds()
        if wait > 0:
            raise ResourceExhausted("too many failed logins for this email; retry later", reason="LOGIN_THROTTLED",
                                    retry_after=int(wait + 0.999))

    def failed(self, email: str, now: dt.datetime) -> None:
        with self._lock:
            entry = self._by_email.pop(email, None)
            if entry is None or (now - entry.last).total_seconds() > FORGET_SECONDS:
                entry = _Failures(0, now, now)
            entry.count += 1
            entry.last = now
            over = entry.count - FREE_FAILURES
            delay = 0 if over < 0 else min(2 ** over, MAX_DELAY_SECONDS)
            entry.next_allowed = now + dt.timedelta(seconds=delay)
            self._by_email[email] = entry
            while len(self._by_email) > MAX_TRACKED:
                self._by_email.popitem(last=False)

    def succeeded(self, email: str) -> None:
        with self._lock:
            self._by_email.pop(email, None)
