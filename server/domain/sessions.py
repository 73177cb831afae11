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
token's lifetime. No gRPC here.
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

import peewee

from server.infra import storage
from server.domain.errors import Unauthenticated
from server.domain.ids import opaque_id
from server.domain.caller import CUSTOMER, Caller
from server.domain.remembered import Remembered
from server.infra.storage import RefreshToken, Session, User

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
    def __init__(self, refresh_ttl_seconds: int, clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 grace_seconds: float = REFRESH_GRACE_SECONDS):
        self.refresh_ttl = dt.timedelta(seconds=refresh_ttl_seconds)
        self.clock = clock
        self.grace = dt.timedelta(seconds=grace_seconds)

    def start(self, user: User) -> Grant:
        now = self.clock()
        token = opaque_id("rt_", random_bytes=20)
        with storage.db.atomic():
            session = Session.create(id=opaque_id("ses_", random_bytes=20), user_id=user.id, role=user.role,
                                     created_at=now, expires_at=now + self.refresh_ttl)
            RefreshToken.create(hash=_hash(token), session_id=session.id, issued_at=now)
        return Grant(user.id, user.email, user.role, session.id, token, int(self.refresh_ttl.total_seconds()))

    def refresh(self, refresh_token: str) -> Grant:
        """A new access token's grant and the successor of an unused refresh token (which is then
        spent). A retry within the grace gets the same successor; a reuse revokes the session."""
        bad = Unauthenticated("invalid refresh token: log in again", reason="INVALID_REFRESH_TOKEN")
        if not refresh_token.startswith("rt_") or len(refresh_token) > _MAX_TOKEN_LENGTH:
            raise bad
        now = self.clock()
        spent_hash, successor = _hash(refresh_token), successor_of(refresh_token)
        # A token nobody issued is refused by a read: only real ones queue for SQLite's write lock.
        if not RefreshToken.select(RefreshToken.hash).where(RefreshToken.hash == spent_hash).exists():
            raise bad
        with storage.write_transaction():
            # Write first: of two refreshes of one token, exactly one spends it, and the other
            # waits for that and then reads what it did.
            spent = (RefreshToken.update(used_at=now)
                     .where((RefreshToken.hash == spent_hash) & RefreshToken.used_at.is_null()).execute())
            row = (RefreshToken
                   .select(RefreshToken.session_id, RefreshToken.used_at, Session.role, Session.expires_at,
                           Session.revoked_at, User.id, User.email, User.role, User.disabled_at)
                   .join(Session, on=(Session.id == RefreshToken.session_id))
                   .join(User, on=(User.id == Session.user_id))
                   .where(RefreshToken.hash == spent_hash).tuples().first())
            outcome, row = self._judge(spent, row, successor, now)
        if outcome == _REUSED:
            raise Unauthenticated("refresh token already used: the session is revoked, log in again",
                                  reason="REFRESH_TOKEN_REUSED")
        if outcome != _GRANTED:
            raise bad
        session_id, _, role, expires_at, _, user_id, email, _, _ = row
        return Grant(user_id, email, session_role(role), session_id, successor,
                     int((Session.expires_at.python_value(expires_at) - now).total_seconds()))

    def _judge(self, spent: int, row, successor: str, now: dt.datetime):
        """Inside refresh's transaction: what the token earns, with any revocation it causes."""
        if row is None:  # no such token, or its session or account is gone
            return _BAD, row
        session_id, used_at, role, expires_at, revoked_at, _, _, account_role, disabled_at = row
        if revoked_at is not None or Session.expires_at.python_value(expires_at) <= now or disabled_at is not None:
            return _BAD, row
        if session_role(role) != account_role:  # changed behind the rules' back: the session is over
            self._revoke_in_transaction(session_id, "the account's role changed", now)
            return _BAD, row
        if spent:
            RefreshToken.create(hash=_hash(successor), session_id=session_id, issued_at=now)
            return _GRANTED, row
        # Used before: a retry of a refresh whose answer was lost, or the loser of two at once,
        # gets the same successor, if it comes within the grace and nobody has used that yet.
        used_at = RefreshToken.used_at.python_value(used_at)
        successor_unused = (RefreshToken.select(RefreshToken.hash)
                            .where((RefreshToken.hash == _hash(successor)) & RefreshToken.used_at.is_null()).exists())
        if used_at is not None and abs(now - used_at) <= self.grace and successor_unused:
            return _GRANTED, row
        self._revoke_in_transaction(session_id, "refresh token reused", now)
        return _REUSED, row

    @staticmethod
    def _revoke_in_transaction(session_id: str, why: str, now: dt.datetime) -> None:
        (Session.update(revoked_at=now, revoke_reason=why[:64])
         .where((Session.id == session_id) & Session.revoked_at.is_null()).execute())

    def revoke(self, session_id: str, why: str) -> bool:
        changed = (Session.update(revoked_at=self.clock(), revoke_reason=why[:64])
                   .where((Session.id == session_id) & Session.revoked_at.is_null()).execute())
        return bool(changed)

    def revoke_user(self, user_id: str, why: str) -> int:
        """End every session of an account (call it in the transaction that changes the account)."""
        return (Session.update(revoked_at=self.clock(), revoke_reason=why[:64])
                .where((Session.user_id == user_id) & Session.revoked_at.is_null()).execute())

    # --- the purge job -----------------------------------------------------------------------

    def purge_ended(self, before: dt.datetime, *, limit: int, resume: dict | None = None) -> int:
        """Remove a batch of the sessions that ended (were revoked, or expired) before `before`:
        at most `limit` of their refresh tokens, then the sessions (at most `limit`) once none is
        left. Revoked ones first, then expired ones, each through its own index, each batch starting
        where the last one ended (`resume`, kept by the caller for a run). Returns the rows removed:
        fewer than `limit` only when nothing more has ended."""
        resume = {} if resume is None else resume
        removed = 0
        for kind, key in (("revoked", Session.revoked_at), ("expired", Session.expires_at)):
            if resume.get(kind) == "done":
                continue
            rows, exhausted = self._purge_batch(kind, key, before, limit, resume)
            removed += rows
            if not exhausted:
                return removed
            resume[kind] = "done"
        return removed

    @staticmethod
    def _purge_batch(kind: str, key: peewee.Field, before: dt.datetime, limit: int,
                     resume: dict) -> tuple[int, bool]:
        """(rows removed, whether no session of this kind is left)."""
        ended = key.is_null(False) & (key < before)
        query = Session.select(Session.id, key).where(ended)
        if kind in resume:
            last_key, last_id = resume[kind]
            query = query.where(peewee.Tuple(key, Session.id) > peewee.Tuple(key.db_value(last_key), last_id))
        rows = list(query.order_by(key, Session.id).limit(limit).tuples())
        if not rows:
            return 0, True
        ids = [sid for sid, _ in rows]
        with storage.db.atomic():
            hashes = [h for (h,) in RefreshToken.select(RefreshToken.hash)
                      .where(storage.among(RefreshToken.session_id, ids)).limit(limit + 1).tuples()]
            if hashes:
                RefreshToken.delete().where(storage.among(RefreshToken.hash, hashes[:limit])).execute()
            if len(hashes) > limit:  # more tokens than a batch: the sessions wait for the next one
                return limit, False
            sessions = Session.delete().where(storage.among(Session.id, ids)).execute()
        resume[kind] = (rows[-1][1], rows[-1][0])
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
                 wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 bound: int = MAX_REMEMBERED_SESSIONS):
        self.check_seconds = check_seconds
        self.clock, self.wall_clock = clock, wall_clock
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
            row = (Session.select(Session.user_id, Session.role, Session.revoked_at, Session.expires_at, User.role,
                                  User.disabled_at)
                   .join(User, on=(User.id == Session.user_id)).where(Session.id == sid).tuples().first())
            if row is None:
                return "no such session or account"
            user_id, role, revoked_at, expires_at, account_role, disabled_at = row
            if revoked_at is not None:
                return "logged out or revoked"
            if Session.expires_at.python_value(expires_at) <= self.wall_clock():
                return "expired"
            if disabled_at is not None:
                return "the account is disabled"
            if session_role(role) != account_role:
                # Changed behind the rules' back: end the session in the database too, so every
                # process says the same from now on, whatever the role does next.
                why = "the account's role changed"
                try:
                    (Session.update(revoked_at=self.wall_clock(), revoke_reason=why)
                     .where((Session.id == sid) & Session.revoked_at.is_null()).execute())
                except peewee.PeeweeException:  # refused here all the same; the next refresh revokes it
                    log.warning("cannot revoke a session whose account changed role", exc_info=True)
                return why
            return user_id, session_role(role)
        finally:
            storage.end_call()
