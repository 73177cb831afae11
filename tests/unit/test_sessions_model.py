"""A model-based test of sessions (hypothesis's stateful testing), on SQLite and PostgreSQL.

A small reference model (accounts, sessions, each session's chain of refresh tokens, the access
tokens minted) runs beside the real rules - Accounts, Sessions, and two SessionCheck instances as
the session caches of two server processes - with one clock the test moves (the rules' wall clock
and the checks' monotonic one go together). The transitions: register, login (and a login to a
disabled account), refresh, a retried refresh (its answer lost), a replay of an old token, two
refreshes of one token at once (two threads), logout, a role change, a password reset, disabling,
an operator's revocation, time passing (and up to a session's end), and a call to one process. After every step, for every
access token ever minted, on both processes:

- a session that was revoked, ended by a privilege change, or expired more than the check's
  bound ago is refused (TOKEN_REVOKED);
- a session that is current is accepted;
- (in between, either answer is allowed: that is the documented bound);

and whenever a token is minted, its role is the account's role at that moment. Refreshes are
predicted exactly: a new successor for an unused token, the same one for a retry within the grace
while it is unused, REFRESH_TOKEN_REUSED (and the session ended) otherwise, INVALID_REFRESH_TOKEN
for an ended session.

Process B only looks at some tokens (chosen as they are minted, and whenever the `call` rule
says), so its cache is not a copy of A's: a process that saw a token and one that did not must
still agree once the bound has passed.

Size: PAYMENTS_SESSION_MODEL_EXAMPLES examples (default 150) of up to
PAYMENTS_SESSION_MODEL_STEPS steps (default 30) per database; the default run is derandomized (the
same examples every time), one of a chosen size explores at random; tests/README.md says how to run
a larger one. Each run prints the transitions it covered, and the default run (or a random one of
1,000 examples or more) fails if it missed one of the transitions it is meant to reach.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime as dt
import itertools
import os
import threading

import jwt
import pytest
from argon2 import PasswordHasher
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from server.domain.accounts import Accounts
from server.domain.caller import ADMIN, CUSTOMER
from server.domain.errors import Unauthenticated
from server.domain.sessions import REFRESH_GRACE_SECONDS, SessionCheck, Sessions, successor_of
from server.infra import passwords, storage, tokens
from tests.support.model_clock import ModelClock

EXAMPLES = int(os.environ.get("PAYMENTS_SESSION_MODEL_EXAMPLES", "150"))
STEPS = int(os.environ.get("PAYMENTS_SESSION_MODEL_STEPS", "30"))
# The default run is the same on every run (hypothesis derandomized: its coverage and time do not
# vary, and what it asserts it reached it always reaches); a run of a chosen size explores at random.
RANDOM = "PAYMENTS_SESSION_MODEL_EXAMPLES" in os.environ or "PAYMENTS_SESSION_MODEL_STEPS" in os.environ
CHECK_SECONDS = 5.0  # the processes' PAYMENTS_REVOCATION_CHECK_SECONDS
TTL_SECONDS = 120  # a session's lifetime; `a_session_expires` reaches its end
EPSILON = dt.timedelta(milliseconds=2)  # the clocks move in whole milliseconds; stay off the boundary

_runs = itertools.count()


@dataclasses.dataclass
class MToken:
    value: str
    used_at: dt.datetime | None = None


@dataclasses.dataclass
class MSession:
    sid: str
    email: str
    role: str
    expires: dt.datetime
    tokens: list[MToken]
    ended_at: dt.datetime | None = None

    def end(self, now: dt.datetime) -> None:
        if self.ended(now) is None:
            self.ended_at = now

    def ended(self, now: dt.datetime) -> dt.datetime | None:
        """When it ended, or None if it is current."""
        if self.ended_at is not None:
            return self.ended_at
        return self.expires if now >= self.expires else None


@dataclasses.dataclass
class MAccount:
    email: str
    password: str
    role: str = CUSTOMER
    disabled: bool = False


@dataclasses.dataclass
class MAccess:
    token: str
    caller: object
    session: MSession
    seen_by_b: bool


class SessionsMachine(RuleBasedStateMachine):
    issuer = verifier = covered = None  # set per test

    def __init__(self):
        super().__init__()
        self.run = next(_runs)
        self.clock = ModelClock()
        self.sessions = Sessions(TTL_SECONDS, self.clock.wall)
        self.accounts = Accounts(self.issuer, clock=self.clock.wall, sessions=self.sessions)
        self.accounts.throttle.clock = self.clock.mono
        self.processes = {name: SessionCheck(CHECK_SECONDS, clock=self.clock.mono, wall_clock=self.clock.wall)
                          for name in ("A", "B")}
        self.model_accounts: list[MAccount] = []
        self.model_sessions: list[MSession] = []
        self.minted: list[MAccess] = []
        self.clients = itertools.count()

    # --- helpers ---------------------------------------------------------------------------

    def now(self) -> dt.datetime:
        return self.clock.wall()

    def note(self, what: str) -> None:
        self.covered[what] += 1

    def client(self) -> str:
        return f"10.{self.run % 250}.{next(self.clients) % 250}.1"

    def minted_token(self, login, session: MSession, data) -> None:
        account = self.account_of(session.email)
        claims = jwt.decode(login.access_token, options={"verify_signature": False})
        # No token's role exceeds (or differs from) the account's role when it was minted.
        assert claims["role"] == account.role == session.role, (claims["role"], account.role, session.role)
        assert claims["sid"] == session.sid
        caller = self.verifier.verify(login.access_token)
        self.minted.append(MAccess(login.access_token, caller, session, data.draw(st.booleans(), "seen by B")))

    def account_of(self, email: str) -> MAccount:
        return next(a for a in self.model_accounts if a.email == email)

    def live_sessions(self) -> list[MSession]:
        return [s for s in self.model_sessions if s.ended(self.now()) is None]

    def expect(self, access: MAccess) -> str:
        ended = access.session.ended(self.now())
        if ended is None:
            return "accept"
        if self.now() >= ended + dt.timedelta(seconds=CHECK_SECONDS) + EPSILON:
            return "refuse"
        return "either"

    def look(self, process: str, access: MAccess) -> None:
        expected = self.expect(access)
        try:
            self.processes[process].check(access.caller)
            got = "accept"
        except Unauthenticated as e:
            assert e.reason == "TOKEN_REVOKED", e.reason
            got = "refuse"
        if expected != "either":
            assert got == expected, (process, expected, got, access.session, self.now())
            self.note(f"check on {process}: {'accepted (current)' if got == 'accept' else 'refused (ended)'}")
        else:
            self.note(f"check within the bound: {got}")

    def refresh_expecting(self, session: MSession, token: MToken) -> str:
        """What a refresh of `token` must answer now, with the model changed accordingly."""
        now = self.now()
        if session.ended(now) is not None:
            return "INVALID_REFRESH_TOKEN"
        if token.used_at is None:
            token.used_at = now
            session.tokens.append(MToken(successor_of(token.value)))
            return "new"
        successor = session.tokens[session.tokens.index(token) + 1]
        if abs(now - token.used_at) <= dt.timedelta(seconds=REFRESH_GRACE_SECONDS) and successor.used_at is None:
            return "same"
        session.end(now)
        return "REFRESH_TOKEN_REUSED"

    def do_refresh(self, session: MSession, token: MToken, data, label: str) -> None:
        expected = self.refresh_expecting(session, token)
        try:
            got = self.accounts.refresh(token.value)
        except Unauthenticated as e:
            assert e.reason == expected, (label, expected, e.reason)
            self.note(f"{label}: {e.reason}")
            return
        assert expected in ("new", "same"), (label, expected, "granted")
        assert got.refresh_token == successor_of(token.value)
        self.minted_token(got, session, data)
        self.note(f"{label}: granted ({expected} successor)")

    def end_account_sessions(self, email: str) -> None:
        for s in self.model_sessions:
            if s.email == email:
                s.end(self.now())

    # --- transitions ---------------------------------------------------------------------------

    @precondition(lambda self: len(self.model_accounts) < 3)
    @rule()
    def register(self):
        email = f"model-{os.getpid()}-{self.run}-{len(self.model_accounts)}@example.com"
        password = f"password of {email}"
        self.accounts.register(email, password)
        self.model_accounts.append(MAccount(email, password))
        self.note("register")

    @precondition(lambda self: self.model_accounts)
    @rule(data=st.data())
    def login(self, data):
        account = data.draw(st.sampled_from(self.model_accounts), "account")
        try:
            got = self.accounts.login(account.email, account.password, client=self.client())
        except Unauthenticated as e:
            assert account.disabled and e.reason == "BAD_CREDENTIALS"
            self.note("login to a disabled account: refused")
            return
        assert not account.disabled
        sid = jwt.decode(got.access_token, options={"verify_signature": False})["sid"]
        session = MSession(sid, account.email, account.role, self.now() + dt.timedelta(seconds=TTL_SECONDS),
                           [MToken(got.refresh_token)])
        self.model_sessions.append(session)
        self.minted_token(got, session, data)
        self.note(f"login ({account.role})")

    def some_session(self, data, where=lambda s: True) -> MSession:
        """Mostly a current session (refreshing ended ones is covered, but tells less), and among
        those mostly the one with the longest chain of refresh tokens."""
        live = sorted((s for s in self.live_sessions() if where(s)), key=lambda s: -len(s.tokens))
        if live and data.draw(st.booleans(), "the longest?"):
            return live[0]
        every = [s for s in self.model_sessions if where(s)]
        return data.draw(st.sampled_from(live if live and data.draw(st.integers(0, 3), "live?") else every),
                         "session")

    @precondition(lambda self: self.model_sessions)
    @rule(data=st.data())
    def refresh(self, data):
        session = self.some_session(data)
        self.do_refresh(session, session.tokens[-1], data, "refresh")

    @precondition(lambda self: any(len(s.tokens) > 1 for s in self.model_sessions))
    @rule(data=st.data(), late=st.booleans())
    def retried_refresh(self, data, late):
        """The answer to the last refresh was lost: the client sends the same token again, at once
        or (`late`) only after the grace."""
        session = self.some_session(data, lambda s: len(s.tokens) > 1)
        if late:
            self.clock.ms += (REFRESH_GRACE_SECONDS + 1) * 1000
        self.do_refresh(session, session.tokens[-2], data, "retried refresh" + (" after the grace" if late else ""))

    @precondition(lambda self: any(len(s.tokens) > 1 for s in self.model_sessions))
    @rule(data=st.data())
    def replayed_refresh(self, data):
        """A used token of the session again: a thief, or a client far behind. Mostly one whose
        successor was used too (a reuse whatever the time), else any used one."""
        session = self.some_session(data, lambda s: len(s.tokens) > 1)
        if not session.tokens[:-2] and session.ended(self.now()) is None and data.draw(st.booleans(), "moves on?"):
            self.do_refresh(session, session.tokens[-1], data, "refresh")  # the client has moved on meanwhile
        stale = session.tokens[:-2]
        choices = stale if stale and data.draw(st.integers(0, 3), "stale?") else session.tokens[:-1]
        token = data.draw(st.sampled_from(choices), "token")
        self.do_refresh(session, token, data, "replayed refresh")

    @precondition(lambda self: self.model_sessions)
    @rule(data=st.data())
    def concurrent_refresh(self, data):
        """Two refreshes of one token at the same moment (two threads, two connections)."""
        session = self.some_session(data)
        token = session.tokens[-1]
        first = self.refresh_expecting(session, token)
        second = self.refresh_expecting(session, token) if first == "new" else first
        start = threading.Barrier(2)

        def refresh(_):
            start.wait()
            try:
                return self.accounts.refresh(token.value)
            except Unauthenticated as e:
                return e.reason
            finally:
                storage.end_call()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(refresh, range(2)))
        if first == "new":  # one spends it, the other is the same client's twin within the grace
            assert second == "same", second
            assert all(not isinstance(a, str) and a.refresh_token == successor_of(token.value) for a in answers), answers
            for got in answers:
                self.minted_token(got, session, data)
            self.note("concurrent refresh: both granted the same successor")
        else:  # the last token of a session is unused: only an ended session refuses it
            assert first == "INVALID_REFRESH_TOKEN" and answers == [first, first], (first, answers)
            self.note(f"concurrent refresh: {first}")

    @precondition(lambda self: self.minted)
    @rule(data=st.data())
    def logout(self, data):
        access = data.draw(st.sampled_from(self.minted), "token")
        self.accounts.logout(access.caller)
        access.session.end(self.now())
        self.note("logout")

    @precondition(lambda self: self.model_accounts)
    @rule(data=st.data(), change=st.sampled_from(["role change", "password reset", "disable", "revoke"]))
    def privilege_change(self, data, change):
        """An operator's change to an account (one rule for all four, so that sessions live long
        enough to be refreshed, retried and replayed between them)."""
        account = data.draw(st.sampled_from(self.model_accounts), "account")
        if change == "role change":
            new = ADMIN if account.role == CUSTOMER else CUSTOMER
            self.accounts.change_role(account.email, new, promote_existing=True)
            account.role = new
            change = f"role change to {new}"
        elif change == "password reset":
            account.password = account.password + "!"
            self.accounts.reset_password(account.email, account.password)
        elif change == "disable":
            if account.disabled:
                return
            self.accounts.disable(account.email)
            account.disabled = True
        else:
            self.accounts.revoke_sessions(account.email)
            change = "operator revokes sessions"
        self.end_account_sessions(account.email)
        self.note(change)

    @rule(ms=st.one_of(st.sampled_from([1, 100, 4_999, 5_001, 5_003, 29_999, 30_001, 31_000, 60_000]),
                       st.integers(1, 90_000)))
    def time_passes(self, ms):
        self.clock.ms += ms
        self.note("time passes")

    @precondition(lambda self: self.live_sessions())
    @rule()
    def a_session_expires(self):
        """Time passes until just after the next session's absolute end."""
        self.clock.ms += int((min(s.expires for s in self.live_sessions()) - self.now()).total_seconds() * 1000) + 1
        self.note("time passes: a session expired")

    @precondition(lambda self: self.minted)
    @rule(data=st.data(), process=st.sampled_from(["A", "B"]))
    def call(self, data, process):
        """A call with some token to one process (B sees only what it is shown)."""
        self.look(process, data.draw(st.sampled_from(self.minted), "token"))

    # --- after every step ------------------------------------------------------------------

    @invariant()
    def revoked_refused_everywhere_and_current_refused_nowhere(self):
        for access in self.minted:
            self.look("A", access)
            if access.seen_by_b or self.expect(access) == "refuse":
                self.look("B", access)
        storage.end_call()


@pytest.fixture
def cheap_hashes(monkeypatch):
    """Password hashing is not what this test is about: argon2 at its cheapest."""
    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    monkeypatch.setattr(passwords, "_hasher", cheap)
    monkeypatch.setattr(passwords, "_DUMMY_HASH", cheap.hash("dummy"))


COVERED: dict[str, collections.Counter] = {}


@pytest.mark.timeout(max(120, EXAMPLES * STEPS // 10))
def test_sessions_behave_like_the_model(database, backend, issuer, keys_dir, cheap_hashes, capsys):
    covered = COVERED.setdefault(backend, collections.Counter())
    SessionsMachine.issuer = issuer
    SessionsMachine.verifier = tokens.TokenVerifier.from_file(keys_dir / "jwks.json", issuer=issuer.issuer,
                                                              audience=issuer.audience)
    SessionsMachine.covered = covered
    run_state_machine_as_test(
        SessionsMachine,
        settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=not RANDOM,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                 HealthCheck.data_too_large]))
    with capsys.disabled():
        print(f"\nsession model on {backend}: {EXAMPLES} examples of up to {STEPS} steps; transitions covered:")
        for name, count in sorted(covered.items()):
            print(f"  {count:6d}  {name}")
    wanted = {"register", "login (customer)", "login (admin)", "login to a disabled account: refused",
              "refresh: granted (new successor)", "retried refresh: granted (same successor)",
              "replayed refresh: REFRESH_TOKEN_REUSED", "retried refresh after the grace: REFRESH_TOKEN_REUSED",
              "refresh: INVALID_REFRESH_TOKEN",
              "concurrent refresh: both granted the same successor", "logout", "disable", "password reset",
              "operator revokes sessions", "role change to admin", "role change to customer",
              "time passes: a session expired", "check on A: refused (ended)", "check on B: refused (ended)",
              "check on A: accepted (current)", "check on B: accepted (current)"}
    if not RANDOM or EXAMPLES >= 1000:  # a small random run may miss a rare one by chance
        missing = wanted - set(covered)
        assert not missing, f"transitions never reached: {missing}"
