"""Failed logins slow the guesser down, per account and client address, never the owner elsewhere.

Per-address limits at Envoy stop a flood from one place; this stops slow guessing at one account.
Attempts are counted per (email, client address), as OWASP's authentication guidance asks (slow
the guesser, per account and source, rather than lock the account for everyone): after
FREE_FAILURES attempts in a row that were not a correct login, each further attempt for that email
from that address must wait 1, 2, 4 ... seconds, at most MAX_DELAY_SECONDS, and the count is
forgotten FORGET_SECONDS after the last attempt, or at the next correct login from that address.
The owner, logging in from any other address, is never held up, whatever is sent from elsewhere;
behind the very address that guesses (a shared NAT), the owner waits as the guesser does.
A refused attempt costs no password hash, is not counted and does not move the wait.

Each attempt is counted *before* its password is checked, atomically (`attempt`): concurrent
guesses cannot all pass the check before the first failure is counted, so a burst from one
address gets exactly FREE_FAILURES password checks. A correct login takes its count back
(`succeeded`). Waits are measured on a monotonic clock: a wall clock stepped back locks nobody out.

At most MAX_TRACKED (email, address) pairs are remembered. When full, the entry to forget is one
that has run out (FORGET_SECONDS) if the oldest has, else the least recently counted among those
that impose no wait yet, and only when there are none of those the least recently counted one
with a wait: failing once on many other emails does not push a penalised pair out.

Every email is tracked the same way whether or not it has an account, so a 429 says nothing
about who is a customer. The table lives in this server process: with P processes (Envoy spreads
calls over them) and R replicas, one address gets FREE_FAILURES free guesses per email in each of
the P x R tables before the waits begin, and then the waits of each; an attacker with A
addresses gets that A times over (Envoy's per-address rate limit bounds each address). The edge
hands in the client as it counts clients: an IPv6 one by its /64 (server/edge/admission.py
client_network), or one host would get FREE_FAILURES free guesses from each of 2^64 addresses.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from server.domain.errors import ResourceExhausted

FREE_FAILURES = 5
MAX_DELAY_SECONDS = 30
FORGET_SECONDS = 15 * 60
MAX_TRACKED = 100_000  # (email, address) pairs remembered at once
CLIENT_FORGET_SECONDS = 60  # a client's failures are forgotten this long after its last attempt


class _Count:
    __slots__ = ("count", "last", "next_allowed")

    def __init__(self, now: float):
        self.count, self.last, self.next_allowed = 0, now, now


def delay_after(count: int) -> int:
    """Seconds before the next attempt after `count` counted ones: 0 for the first FREE_FAILURES - 1,
    then 1, 2, 4 ... up to MAX_DELAY_SECONDS."""
    over = count - FREE_FAILURES
    return 0 if over < 0 else min(2 ** min(over, 16), MAX_DELAY_SECONDS)


class LoginThrottle:
    def __init__(self, clock: Callable[[], float] = time.monotonic, max_tracked: int | None = None):
        self.clock = clock
        self.max_tracked = max_tracked or MAX_TRACKED
        self._lock = threading.Lock()
        # Least recently counted first; pairs with no wait yet apart from those with one.
        self._free: collections.OrderedDict[str, _Count] = collections.OrderedDict()
        self._waiting: collections.OrderedDict[str, _Count] = collections.OrderedDict()
        # client -> [attempts that were not a correct login, the last one's time]; least recent first
        self._clients: collections.OrderedDict[str, list] = collections.OrderedDict()

    def failures(self, client: str) -> int:
        """Attempts from `client`, on any email, that were not a correct login (those throttled,
        and those still being checked, too), and its sign-ups (`signed_up`: each a hash, and a
        person signs up once), until CLIENT_FORGET_SECONDS pass without one. The
        auth lane sheds the calls of the client with the most first (server/edge/app.py): a
        flood spread over hundreds of addresses, each sending no faster than a stranger, is told
        from the stranger by its failures, and a flood of right passwords is cheap to answer
        (server/infra/passwords.py remembers a verified password)."""
        with self._lock:
            entry = self._clients.get(client)
            return entry[0] if entry is not None and self.clock() - entry[1] < CLIENT_FORGET_SECONDS else 0

    def signed_up(self, client: str) -> None:
        """A sign-up from `client`, right or wrong: it counts as a failure would, and for good."""
        with self._lock:
            self._count_client(client, self.clock(), +1)

    def _count_client(self, client: str, now: float, change: int) -> None:
        entry = self._clients.get(client)
        if entry is None or now - entry[1] >= CLIENT_FORGET_SECONDS:
            entry = self._clients[client] = [0, now]
        entry[0], entry[1] = max(0, entry[0] + change), now
        self._clients.move_to_end(client)
        while len(self._clients) > self.max_tracked:
            self._clients.popitem(last=False)

    def attempt(self, email: str, client: str) -> str:
        """Count a login attempt for `email` from `client` before its password is checked, or raise
        ResourceExhausted (LOGIN_THROTTLED, with retry-after) if it must wait. Returns the key to
        hand to `succeeded` if the password was right."""
        key = f"{email}\x00{client}"  # one string: a third less memory than a tuple of two
        now = self.clock()
        with self._lock:
            entry = self._waiting.get(key) or self._free.get(key)
            if entry is not None and now - entry.last >= FORGET_SECONDS:
                self._forget(key)
                entry = None
            wait = entry.next_allowed - now if entry is not None else 0.0
            if wait <= 0:
                if entry is None:
                    entry = _Count(now)
                else:
                    self._forget(key)
                entry.count += 1
                entry.last = now
                delay = delay_after(entry.count)
                entry.next_allowed = now + delay
                (self._waiting if delay else self._free)[key] = entry
                self._evict(now)
            self._count_client(client, now, +1)
        if wait > 0:
            raise ResourceExhausted("too many failed logins for this email; retry later", reason="LOGIN_THROTTLED",
                                    retry_after=int(wait + 0.999))
        return key

    def succeeded(self, key: str) -> None:
        """The attempt was a correct login: its email and address start from nothing again."""
        with self._lock:
            self._forget(key)
            self._count_client(key.partition("\x00")[2], self.clock(), -1)

    def tracked(self) -> int:
        return len(self._free) + len(self._waiting)

    def _forget(self, key) -> None:
        self._free.pop(key, None)
        self._waiting.pop(key, None)

    def _evict(self, now: float) -> None:
        while len(self._free) + len(self._waiting) > self.max_tracked:
            for table in (self._waiting, self._free):
                if table and now - next(iter(table.values())).last >= FORGET_SECONDS:
                    table.popitem(last=False)
                    break
            else:
                (self._free or self._waiting).popitem(last=False)
