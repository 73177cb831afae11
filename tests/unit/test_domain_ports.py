"""The account and session rules on adapters a test hands them (server/domain/ports.py): an
in-memory store, a hasher that counts, an issuer that records, a clock the test moves. No
database: what the rules decide is theirs, not SQL's (the same rules on both databases are
tests/unit/test_accounts.py, test_sessions.py and test_sessions_model.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading

import pytest

from server.domain.accounts import Accounts
from server.domain.caller import Caller
from server.domain.errors import AlreadyExists, Unauthenticated
from server.domain.records import AccountRecord, DuplicateEmail, RefreshView, SessionState
from server.domain.sessions import REFRESH_GRACE_SECONDS, SessionCheck, Sessions, successor_of


class MemoryStore:
    """AccountStore and SessionStore in dicts; one lock is every transaction."""

    errors = (RuntimeError,)

    def __init__(self):
        self.lock = threading.RLock()
        self.users: dict[str, AccountRecord] = {}
        self.sessions: dict[str, dict] = {}
        self.tokens: dict[str, dict] = {}
        self.released = 0

    def transaction(self):
        return self.lock

    write_transaction = transaction

    # accounts
    def by_email(self, email):
        return next((u for u in self.users.values() if u.email == email), None)

    def by_id(self, user_id):
        return self.users.get(user_id)

    def insert(self, account):
        with self.lock:
            if self.by_email(account.email) is not None:
                raise DuplicateEmail(account.email)
            self.users[account.id] = account

    def update(self, user_id, **columns):
        self.users[user_id] = self.users[user_id]._replace(**columns)

    # sessions
    def start(self, session_id, user_id, role, now, expires_at, token_hash):
        with self.lock:
            self.sessions[session_id] = dict(user_id=user_id, role=role, expires_at=expires_at, revoked_at=None,
                                             why=None)
            self.add_token(token_hash, session_id, now)

    def add_token(self, token_hash, session_id, now):
        self.tokens[token_hash] = dict(session_id=session_id, used_at=None)

    def token_known(self, token_hash):
        return token_hash in self.tokens

    def token_unused(self, token_hash):
        return token_hash in self.tokens and self.tokens[token_hash]["used_at"] is None

    def spend(self, token_hash, now):
        token = self.tokens.get(token_hash)
        if token is None or token["used_at"] is not None:
            return False
        token["used_at"] = now
        return True

    def refresh_view(self, token_hash):
        token = self.tokens.get(token_hash)
        session = token and self.sessions.get(token["session_id"])
        user = session and self.users.get(session["user_id"])
        if not user:
            return None
        return RefreshView(token["session_id"], token["used_at"], session["role"], session["expires_at"],
                           session["revoked_at"], user.id, user.email, user.role, user.disabled_at)

    def revoke(self, session_id, why, now):
        session = self.sessions.get(session_id)
        if session is None or session["revoked_at"] is not None:
            return False
        session.update(revoked_at=now, why=why)
        return True

    def revoke_account(self, user_id, why, now):
        return sum(self.revoke(sid, why, now) for sid, s in list(self.sessions.items()) if s["user_id"] == user_id)

    def state(self, session_id):
        session = self.sessions.get(session_id)
        user = session and self.users.get(session["user_id"])
        if not user:
            return None
        return SessionState(session["user_id"], session["role"], session["revoked_at"], session["expires_at"],
                            user.role, user.disabled_at)

    def ended(self, kind, before, after, limit):
        key = "revoked_at" if kind == "revoked" else "expires_at"
        rows = sorted((s[key], sid) for sid, s in self.sessions.items() if s[key] is not None and s[key] < before)
        return [r for r in rows if after is None or r > tuple(after)][:limit]

    def token_hashes(self, session_ids, limit):
        return [h for h, t in self.tokens.items() if t["session_id"] in set(session_ids)][:limit]

    def delete_tokens(self, token_hashes):
        for h in token_hashes:
            del self.tokens[h]

    def delete_sessions(self, session_ids):
        return sum(self.sessions.pop(sid, None) is not None for sid in session_ids)

    def release(self):
        self.released += 1


class CountingHasher:
    """Not a hash at all: the rules must not care. Counts the verifications."""

    def __init__(self):
        self.verified = []

    def hash(self, password):
        return "plain:" + password

    def verify(self, password_hash, password):
        self.verified.append(password_hash)
        return password_hash is not None and password_hash == "plain:" + password

    def problem(self, password):
        return None if len(password) >= 4 else "too short"


@dataclasses.dataclass
class RecordingIssuer:
    ttl_seconds: int = 60
    issued: list = dataclasses.field(default_factory=list)

    def issue(self, *, subject, email, role, session_id):
        self.issued.append(dict(sub=subject, email=email, role=role, sid=session_id))
        return f"token-{len(self.issued)}"


class Clock:
    def __init__(self):
        self.now = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
        self.mono = 100.0

    def __call__(self):
        return self.now

    def move(self, seconds: float):
        self.now += dt.timedelta(seconds=seconds)
        self.mono += abs(seconds)  # the monotonic clock only goes forward


@pytest.fixture
def world():
    store, hasher, issuer, clock = MemoryStore(), CountingHasher(), RecordingIssuer(), Clock()
    sessions = Sessions(3600, clock, store=store)
    accounts = Accounts(issuer, clock, sessions=sessions, store=store, passwords=hasher)
    accounts.throttle.clock = lambda: clock.mono
    check = SessionCheck(5, clock=lambda: clock.mono, wall_clock=clock, store=store)
    return dataclasses.make_dataclass("World", ["store", "hasher", "issuer", "clock", "accounts", "check"])(
        store, hasher, issuer, clock, accounts, check)


def caller_of(world, n: int = -1) -> Caller:
    claims = world.issuer.issued[n]
    return Caller(subject=claims["sub"], email=claims["email"], role=claims["role"], session_id=claims["sid"])


def test_registering_and_logging_in_use_the_ports_handed_over(world):
    user = world.accounts.register("Me@Example.com", "pass word")
    assert world.store.users[user.id].password_hash == "plain:pass word"
    with pytest.raises(AlreadyExists):
        world.accounts.register("me@example.com", "other words")
    login = world.accounts.login("me@example.com", "pass word")
    assert login.access_token == "token-1" and login.expires_in == 60
    assert world.issuer.issued == [dict(sub=user.id, email="me@example.com", role="customer", sid=caller_of(world).session_id)]
    world.check.check(caller_of(world))
    assert world.store.released == 1  # the check gave its connection back


def test_an_unknown_email_costs_the_hasher_one_verification_too(world):
    with pytest.raises(Unauthenticated) as unknown:
        world.accounts.login("nobody@example.com", "pass word")
    world.accounts.register("me@example.com", "pass word")
    with pytest.raises(Unauthenticated) as wrong:
        world.accounts.login("me@example.com", "wrong word")
    assert world.hasher.verified == [None, "plain:pass word"]
    assert unknown.value.reason == wrong.value.reason == "BAD_CREDENTIALS"


def test_refresh_rotates_a_retry_gets_the_same_successor_and_a_reuse_ends_the_session(world):
    world.accounts.register("me@example.com", "pass word")
    first = world.accounts.login("me@example.com", "pass word")
    second = world.accounts.refresh(first.refresh_token)
    assert second.refresh_token == successor_of(first.refresh_token)
    world.clock.move(-(REFRESH_GRACE_SECONDS - 1))  # the wall clock steps back: still within the grace
    assert world.accounts.refresh(first.refresh_token).refresh_token == second.refresh_token
    world.clock.move(2 * REFRESH_GRACE_SECONDS)
    with pytest.raises(Unauthenticated) as e:
        world.accounts.refresh(first.refresh_token)
    assert e.value.reason == "REFRESH_TOKEN_REUSED"
    with pytest.raises(Unauthenticated) as e:
        world.accounts.refresh(second.refresh_token)
    assert e.value.reason == "INVALID_REFRESH_TOKEN"
    world.clock.move(5)
    with pytest.raises(Unauthenticated) as e:
        world.check.check(caller_of(world))
    assert e.value.reason == "TOKEN_REVOKED"


def test_a_role_change_ends_every_session_in_the_change(world):
    world.accounts.register("me@example.com", "pass word")
    logins = [world.accounts.login("me@example.com", "pass word") for _ in range(2)]
    world.accounts.change_role("me@example.com", "admin", promote_existing=True)
    assert all(s["why"] == "role changed to admin" for s in world.store.sessions.values())
    for login in logins:
        with pytest.raises(Unauthenticated):
            world.accounts.refresh(login.refresh_token)
    world.accounts.login("me@example.com", "pass word")
    assert world.issuer.issued[-1]["role"] == "admin"


def test_a_role_changed_behind_the_rules_back_is_revoked_by_the_check(world):
    user = world.accounts.register("me@example.com", "pass word")
    world.accounts.login("me@example.com", "pass word")
    world.store.update(user.id, role="admin")
    with pytest.raises(Unauthenticated) as e:
        world.check.check(caller_of(world))
    assert e.value.reason == "TOKEN_REVOKED"
    assert [s["why"] for s in world.store.sessions.values()] == ["the account's role changed"]


def test_the_purge_removes_ended_sessions_in_batches_and_keeps_live_ones(world):
    user = world.accounts.register("me@example.com", "pass word")
    grants = [world.accounts.sessions.start(user) for _ in range(5)]
    for grant in grants[:3]:
        world.accounts.sessions.revoke(grant.session_id, "logout")
    resume: dict = {}
    removed = [world.accounts.sessions.purge_ended(world.clock.now + dt.timedelta(seconds=1), limit=2,
                                                   resume=resume) for _ in range(4)]
    assert sum(removed) == 6 and set(world.store.sessions) == {g.session_id for g in grants[3:]}
