"""Login sessions: rotating refresh tokens, and revocation that reaches every call within seconds.

A login starts a session and hands out a short-lived access token (a JWT naming the session in
`sid`) and an opaque refresh token. The refresh token is stored only as its SHA-256 hash, works
once, and is replaced by a new one on every refresh (rotation); presenting a used one again means
it was stolen or replayed, so the whole session is revoked (reuse detection, as the OAuth 2.0
security BCP asks). Logout, disabling or deleting the account, and a role change all end the
session's access: every protected call checks its session (`SessionCheck`), at most
`check_seconds` old, so the bound is seconds, not the access token's lifetime. No gRPC here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import threading
import time
from typing import Callable

from server.infra import storage
from server.domain.errors import Unauthenticated
from server.domain.ids import opaque_id
from server.domain.caller import Caller
from server.infra.storage import RefreshToken, Session, User


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def revoked(why: str) -> Unauthenticated:
    return Unauthenticated(f"the session has ended ({why}): log in again", reason="TOKEN_REVOKED")


@dataclasses.dataclass(frozen=True)
class Grant:
    """What a login or a refresh hands out (the access token is made by the caller)."""

    user: User
    session_id: str
    refresh_token: str
    refresh_expires_in: int


class Sessions:
    def __init__(self, refresh_ttl_seconds: int, clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)):
        self.refresh_ttl = dt.timedelta(seconds=refresh_ttl_seconds)
        self.clock = clock

    def _new_refresh_token(self, session_id: str, now: dt.datetime) -> str:
        token = opaque_id("rt_", random_bytes=20)
        RefreshToken.create(hash=_hash(token), session_id=session_id, issued_at=now)
        return token

    def start(self, user: User) -> Grant:
        now = self.clock()
        with storage.db.atomic():
            session = Session.create(id=opaque_id("ses_", random_bytes=20), user_id=user.id, created_at=now,
                                     expires_at=now + self.refresh_ttl)
            token = self._new_refresh_token(session.id, now)
        return Grant(user, session.id, token, int(self.refresh_ttl.total_seconds()))

    def refresh(self, refresh_token: str) -> Grant:
        """A new refresh token for an unused one (the old one is spent); reuse revokes the session."""
        now = self.clock()
        bad = Unauthenticated("invalid refresh token: log in again", reason="INVALID_REFRESH_TOKEN")
        if not refresh_token.startswith("rt_"):
            raise bad
        with storage.db.atomic():
            stored = RefreshToken.get_or_none(RefreshToken.hash == _hash(refresh_token))
            if stored is None:
                raise bad
            session = Session.get_or_none(Session.id == stored.session_id)
            if session is None or session.revoked_at is not None or session.expires_at <= now:
                raise bad
            # Spend it with one conditional UPDATE: of two refreshes racing with one token, one wins.
            spent = (RefreshToken.update(used_at=now)
                     .where((RefreshToken.hash == stored.hash) & RefreshToken.used_at.is_null()).execute())
            if not spent:
                reused = True
            else:
                reused = False
                user = User.get_or_none(User.id == session.user_id)
                if user is None or user.disabled_at is not None:
                    raise bad
                token = self._new_refresh_token(session.id, now)
        if reused:  # outside the transaction above, so the revocation is not rolled back with it
            self.revoke(session.id, "refresh token reused")
            raise Unauthenticated("refresh token already used: the session is revoked, log in again",
                                  reason="REFRESH_TOKEN_REUSED")
        return Grant(user, session.id, token, int((session.expires_at - now).total_seconds()))

    def revoke(self, session_id: str, why: str) -> bool:
        changed = (Session.update(revoked_at=self.clock(), revoke_reason=why[:64])
                   .where((Session.id == session_id) & Session.revoked_at.is_null()).execute())
        return bool(changed)

    def revoke_user(self, user_id: str, why: str) -> int:
        return (Session.update(revoked_at=self.clock(), revoke_reason=why[:64])
                .where((Session.user_id == user_id) & Session.revoked_at.is_null()).execute())


class SessionCheck:
    """Is the session behind an access token still live, with the role the token claims?

    Asked on every protected call, answered from memory for `check_seconds` after the database
    last said yes: that is the bound within which logout, a disabled or deleted account, or a
    role change takes effect. A session the database said no to is remembered as dead for good.
    """

    def __init__(self, check_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.check_seconds = check_seconds
        self.clock = clock
        self._live: dict[str, tuple[str, float]] = {}  # sid -> (role, checked at)
        self._dead: dict[str, str] = {}  # sid -> why
        self._lock = threading.Lock()

    def check(self, caller: Caller) -> None:
        sid = caller.session_id
        if not sid:
            raise Unauthenticated("invalid token: no session", reason="INVALID_TOKEN")
        hit = self._live.get(sid)
        now = self.clock()
        if hit is not None and now - hit[1] < self.check_seconds:
            if hit[0] != caller.role:
                raise revoked("the account's role changed")
            return
        why = self._dead.get(sid)
        if why is None:
            why = self._ask(sid, caller.role)
        if why is not None:
            with self._lock:
                if len(self._dead) > 100_000:
                    self._dead.clear()
                self._dead[sid] = why
                self._live.pop(sid, None)
            raise revoked(why)
        with self._lock:
            if len(self._live) > 100_000:
                self._live.clear()
            self._live[sid] = (caller.role, now)

    def _ask(self, sid: str, role: str) -> str | None:
        # Once per session per check_seconds: an ordinary query is cheap enough here. The connection
        # goes back to the pool at once (the call may end right here, before any handler runs).
        try:
            row = (Session.select(Session.revoked_at, Session.expires_at, User.role, User.disabled_at)
                   .join(User, on=(User.id == Session.user_id)).where(Session.id == sid).tuples().first())
        finally:
            storage.end_call()
        if row is None:
            return "no such session or account"
        revoked_at, expires_at, current_role, disabled_at = row
        if revoked_at is not None:
            return "logged out or revoked"
        if Session.expires_at.python_value(expires_at) <= dt.datetime.now(dt.UTC):
            return "expired"
        if disabled_at is not None:
            return "the account is disabled"
        if current_role != role:
            return "the account's role changed"
        return None
