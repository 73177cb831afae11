"""Login sessions: rotating refresh tokens, and revocation that reaches every call within seconds.

A login starts a session and hands out a short-lived access token (a JWT naming the session in
`sid`) and an opaque refresh token. The session remembers the account's role at the login: no
token of it ever carries another role, and a role change, a password reset or disabling the
account ends every session of the account in the transaction that makes the change
(server/domain/accounts.py). An account whose role differs from its session's by any other road
(SQL by hand) has lost the session too: the first refresh or check that sees it revokes it.

Refresh tokens are stored only as their SHA-256, work once, and are replaced on every refresh
(rotation). The successor is derived from the token presented (an HMAC keyed by it), so it needs
no storage of its own: a refresh retried within REFRESH_GRACE_SECONDS of the first (its answer
was lost), or two refreshes of one token at the same moment, get that same successor while it is
still unused. Presented again after the grace, or once its successor was used, a used token means
it was stolen or replayed, and the whole session is revoked (reuse detection, as the OAuth 2.0
security BCP asks). The spend is the refresh's first statement, a conditional UPDATE in a
transaction that holds the write lock from its start (storage.write_transaction), so of two
refreshes at once one spends and the other sees the spend: never a busy database, never an
unnoticed reuse.

Every protected call checks its session (`SessionCheck`), at most `check_seconds` old, so the
bound for logout, revocation, a role change or a disabled account is seconds, not the access
token's lifetime. No gRPC and no SQL here: the store, and the clocks, are ports
(server/domain/ports.py) the assembly hands over.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import time
from typing import Callable

from server.domain import ports
from server.domain.errors import Unauthenticated
from server.domain.ids import opaque_id
from server.domain.caller import CUSTOMER, Caller
from server.domain.ports import Clock, SessionStore
from server.domain.records import RefreshView
from server.domain.remembered import Remembered

log = logging.getLogger(__name__)

# A used refresh token presented again this soon, while its successor is unused, is a retry (or
# the other half of two refreshes at once): it gets the same successor instead of ending the session.
REFRESH_GRACE_SECONDS = 30
# Ended (revoked or expired) sessions are kept this long for operators (revoke_reason), then
# purged with their refresh tokens.
ENDED_SESSION_RETENTION = dt.timedelta(days=7)
# Sessions a SessionCheck remembers, live and dead each; beyond it the least recently used one is
# forgotten (it costs one more query when it comes back).
MAX_REMEMBERED_SESSIONS = 100_000
_MAX_TOKEN_LENGTH = 128


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def successor_of(token: str) -> str:
    """The refresh token that replaces `token`: unguessable without `token` itself, and the same
    however often it is computed, so a retried refresh gets the same answer and nothing but
    hashes is ever stored."""
    mac = hmac.new(token.encode(), b"next", hashlib.sha256).digest()
    return "rt_" + base64.b32encode(mac).decode().rstrip("=").lower()


def revoked(why: str) -> Unauthenticated:
    return Unauthenticated(f"the session has ended ({why}): log in again", reason="TOKEN_REVOKED")


def session_role(stored: str | None) -> str:
    """A session's role; one started before sessions had a role counts as a customer's."""
    return stored or CUSTOMER


@dataclasses.dataclass(frozen=True)
class Grant:
    """What a login or a refresh hands out (the access token is made by the caller, with this role)."""

    user_id: str
    email: str
    role: str
    session_id: str
    refresh_token: str
    refresh_expires_in: int


_BAD, _REUSED, _GRANTED = "bad", "reused", "granted"


class Sessions:
    """`store`: the session store (server/domain/ports.py), the installed one if None."""

    def __init__(self, refresh_ttl_seconds: int, clock: Clock = lambda: dt.datetime.now(dt.UTC),
                 grace_seconds: float = REFRESH_GRACE_SECONDS, *, store: SessionStore | None = None):
        self.refresh_ttl = dt.timedelta(seconds=refresh_ttl_seconds)
        self.clock = clock
        self.grace = dt.timedelta(seconds=grace_seconds)
        self.store = store if store is not None else ports.default(SessionStore)

    def start(self, user) -> Grant:
        """A session for the account (anything with its id, email and role: an AccountRecord)."""
        now = self.clock()
        token = opaque_id("rt_", random_bytes=20)
        session_id = opaque_id("ses_", random_bytes=20)
        self.store.start(session_id, user.id, user.role, now, now + self.refresh_ttl, _hash(token))
        return Grant(user.id, user.email, user.role, session_id, token, int(self.refresh_ttl.total_seconds()))

    def refresh(self, refresh_token: str) -> Grant:
        """A new access token's grant and the successor of an unused refresh token (which is then
        spent). A retry within the grace gets the same successor; a reuse revokes the session."""
        bad = Unauthenticated("invalid refresh token: log in again", reason="INVALID_REFRESH_TOKEN")
        if not refresh_token.startswith("rt_") or len(refresh_token) > _MAX_TOKEN_LENGTH:
            raise bad
        now = self.clock()
        spent_hash, successor = _hash(refresh_token), successor_of(refresh_token)
        # A token nobody issued is refused by a read: only real ones queue for SQLite's write lock.
        if not self.store.token_known(spent_hash):
            raise bad
        with self.store.write_transaction():
            # Write first: of two refreshes of one token, exactly one spends it, and the other
            # waits for that and then reads what it did.
            spent = self.store.spend(spent_hash, now)
            row = self.store.refresh_view(spent_hash)
            outcome = self._judge(spent, row, successor, now)
        if outcome == _REUSED:
            raise Unauthenticated("refresh token already used: the session is revoked, log in again",
                                  reason="REFRESH_TOKEN_REUSED")
        if outcome != _GRANTED:
            raise bad
        return Grant(row.user_id, row.email, session_role(row.session_role), row.session_id, successor,
                     int((row.expires_at - now).total_seconds()))

    def _judge(self, spent: bool, row: RefreshView | None, successor: str, now: dt.datetime) -> str:
        """Inside refresh's transaction: what the token earns, with any revocation it causes."""
        if row is None:  # no such token, or its session or account is gone
            return _BAD
        if row.revoked_at is not None or row.expires_at <= now or row.disabled_at is not None:
            return _BAD
        if session_role(row.session_role) != row.account_role:  # changed behind the rules' back: it is over
            self.store.revoke(row.session_id, "the account's role changed", now)
            return _BAD
        if spent:
            self.store.add_token(_hash(successor), row.session_id, now)
            return _GRANTED
        # Used before: a retry of a refresh whose answer was lost, or the loser of two at once,
        # gets the same successor, if it comes within the grace and nobody has used that yet.
        successor_unused = self.store.token_unused(_hash(successor))
        if row.used_at is not None and abs(now - row.used_at) <= self.grace and successor_unused:
            return _GRANTED
        self.store.revoke(row.session_id, "refresh token reused", now)
        return _REUSED

    def revoke(self, session_id: str, why: str) -> bool:
        return self.store.revoke(session_id, why[:64], self.clock())

    def revoke_user(self, user_id: str, why: str) -> int:
        """End every session of an account (call it in the transaction that changes the account)."""
        return self.store.revoke_account(user_id, why[:64], self.clock())

    # --- the purge job -----------------------------------------------------------------------

    def purge_ended(self, before: dt.datetime, *, limit: int, resume: dict | None = None) -> int:
        """Remove a batch of the sessions that ended (were revoked, or expired) before `before`:
        at most `limit` of their refresh tokens, then the sessions (at most `limit`) once none is
        left. Revoked ones first, then expired ones, each through its own index, each batch starting
        where the last one ended (`resume`, kept by the caller for a run). Returns the rows removed:
        fewer than `limit` only when nothing more has ended."""
        resume = {} if resume is None else resume
        removed = 0
        for kind in ("revoked", "expired"):
            if resume.get(kind) == "done":
                continue
            rows, exhausted = self._purge_batch(kind, before, limit, resume)
            removed += rows
            if not exhausted:
                return removed
            resume[kind] = "done"
        return removed

    def _purge_batch(self, kind: str, before: dt.datetime, limit: int, resume: dict) -> tuple[int, bool]:
        """(rows removed, whether no session of this kind is left)."""
        rows = self.store.ended(kind, before, resume.get(kind), limit)
        if not rows:
            return 0, True
        ids = [sid for _, sid in rows]
        with self.store.transaction():
            hashes = self.store.token_hashes(ids, limit + 1)
            if hashes:
                self.store.delete_tokens(hashes[:limit])
            if len(hashes) > limit:  # more tokens than a batch: the sessions wait for the next one
                return limit, False
            sessions = self.store.delete_sessions(ids)
        resume[kind] = rows[-1]
        return len(hashes) + sessions, len(rows) < limit


class SessionCheck:
    """Is the session behind an access token still live, with the token's subject and role?

    Asked on every protected call, answered from memory for `check_seconds` after the database
    last said yes: that is the bound within which logout, revocation, a role change, a password
    reset or a disabled or deleted account takes effect, in every process, since each of them
    ends the session in the database. A session the database said no to is remembered as dead
    for good (none ever comes back). Each map holds at most `bound` sessions, evicting the least
    recently used one at a time. `clock`: monotonic seconds, for how old an answer is;
    `wall_clock`: for the session's expiry.
    """

    def __init__(self, check_seconds: float, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Clock = lambda: dt.datetime.now(dt.UTC),
                 bound: int = MAX_REMEMBERED_SESSIONS, *, store: SessionStore | None = None):
        self.check_seconds = check_seconds
        self.clock, self.wall_clock = clock, wall_clock
        self.store = store if store is not None else ports.default(SessionStore)
        self._live = Remembered(bound)  # sid -> (user id, role, checked at)
        self._dead = Remembered(bound)  # sid -> why

    def check(self, caller: Caller) -> None:
        sid = caller.session_id
        if not sid:
            raise Unauthenticated("invalid token: no session", reason="INVALID_TOKEN")
        now = self.clock()
        hit = self._live.get(sid)
        if hit is None or now - hit[2] >= self.check_seconds:
            why = self._dead.get(sid)
            if why is None:
                answer = self._ask(sid)
                if isinstance(answer, str):
                    why = answer
            if why is not None:
                self._dead.put(sid, why)
                self._live.pop(sid)
                raise revoked(why)
            hit = (*answer, now)
            self._live.put(sid, hit)
        user_id, role, _ = hit
        if caller.subject != user_id:
            raise Unauthenticated("invalid token: its subject is not its session's account", reason="INVALID_TOKEN")
        if caller.role != role:
            raise revoked("the token's role is not its session's")

    def _ask(self, sid: str) -> str | tuple[str, str]:
        """(user id, role) of a live session, or why it is not live."""
        # Once per session per check_seconds: an ordinary query is cheap enough here. The connection
        # goes back to the pool at once (the call may end right here, before any handler runs).
        try:
            row = self.store.state(sid)
            if row is None:
                return "no such session or account"
            if row.revoked_at is not None:
                return "logged out or revoked"
            if row.expires_at <= self.wall_clock():
                return "expired"
            if row.disabled_at is not None:
                return "the account is disabled"
            if session_role(row.session_role) != row.account_role:
                # Changed behind the rules' back: end the session in the database too, so every
                # process says the same from now on, whatever the role does next.
                why = "the account's role changed"
                try:
                    self.store.revoke(sid, why, self.wall_clock())
                except self.store.errors:  # refused here all the same; the next refresh revokes it
                    log.warning("cannot revoke a session whose account changed role", exc_info=True)
                return why
            return row.user_id, session_role(row.session_role)
        finally:
            self.store.release()
