"""Service clients against a small model (hypothesis stateful), on SQLite and PostgreSQL: create,
rotate with and without a grace, set and clear an expiry, revoke, a clock the test moves, token
grants with the current, the previous, an old or a wrong secret and with scopes held or not, and
two server processes' client checks (ClientCheck, each with its own memory). After every step:
a grant succeeds exactly when the model says the secret works and the client is live; a check
accepts a live client and refuses an ended one once the revocation bound has passed since the
last change (within the bound either answer is allowed: that is the bound). Prints the
transitions a run reached."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import itertools
import os

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, rule, run_state_machine_as_test

from server.domain import clients as rules_module
from server.domain.caller import ADMIN, CLIENT, Caller
from server.domain.clients import ClientCheck, ClientRules
from server.domain.errors import InvalidArgument, Unauthenticated
from server.domain.paging import PageTokens
from server.domain.permissions import PERMISSIONS
from server.infra import storage
from tests.support.model_clock import ModelClock
from tests.support.reached import reached

EXAMPLES = int(os.environ.get("PAYMENTS_CLIENT_MODEL_EXAMPLES", "150"))
STEPS = int(os.environ.get("PAYMENTS_CLIENT_MODEL_STEPS", "30"))
CHECK_SECONDS = 5.0
ADMIN_CALLER = Caller(subject="usr_admin", email="admin@example.com", role=ADMIN)
_addresses = itertools.count()


@dataclasses.dataclass
class MClient:
    id: str
    permissions: frozenset
    secret: str
    previous: str | None = None
    previous_until: dt.datetime | None = None
    old: list = dataclasses.field(default_factory=list)  # secrets that no longer work
    expires_at: dt.datetime | None = None
    revoked: bool = False
    changed_at: dt.datetime | None = None  # the last change of whether it is live (expiry, revocation)
    tokens: list = dataclasses.field(default_factory=list)  # the iat of each token granted, in order
    cut: float | None = None  # tokens issued before this (Unix seconds) end: a rotation without a grace

    def live(self, now: dt.datetime) -> bool:
        return not self.revoked and (self.expires_at is None or self.expires_at > now)

    def token_works(self, issued_at: float, now: dt.datetime) -> bool:
        """A token of the service's own (issued_at > 0) ends with a rotation without a grace after
        it; another issuer's (0) only with the client."""
        return self.live(now) and not (issued_at and self.cut is not None and issued_at < self.cut)

    def works(self, secret: str, now: dt.datetime) -> bool:
        if not self.live(now):
            return False
        return secret == self.secret or (secret == self.previous and self.previous_until is not None
                                         and self.previous_until > now)

    def settled(self, now: dt.datetime) -> bool:
        """Whether the last change is at least the revocation bound old (an expiry that passed by
        itself is one too)."""
        moments = [m for m in (self.changed_at, self.expires_at) if m is not None and m <= now]
        return not moments or (now - max(moments)).total_seconds() >= CHECK_SECONDS


class ClientsMachine(RuleBasedStateMachine):
    covered: collections.Counter

    clients = Bundle("clients")

    def __init__(self):
        super().__init__()
        storage.ServiceClient.delete().execute()
        self.clock = ModelClock()
        self.rules = ClientRules(store=storage.ClientQueries(), clock=self.clock.wall,
                                 page_tokens=PageTokens(b"k"), issue=lambda cid, scope: f"token:{cid}:{scope}")
        self.checks = {name: ClientCheck(storage.ClientQueries(), CHECK_SECONDS, clock=self.clock.mono,
                                         wall_clock=self.clock.wall) for name in "AB"}

    def reach(self, what: str) -> None:
        self.covered[what] += 1
        reached("service clients", what)

    @rule(target=clients, perms=st.sets(st.sampled_from(PERMISSIONS), min_size=1))
    def create(self, perms):
        made, secret = self.rules.create(ADMIN_CALLER, name="shop", permissions=perms)
        self.reach("create")
        return MClient(made.id, frozenset(perms), secret)

    @rule(client=clients, ttl=st.sampled_from([None, 0, 3, 60]))
    def rotate(self, client, ttl):
        if client.revoked:
            with pytest.raises(Exception) as e:
                self.rules.rotate(ADMIN_CALLER, client.id, ttl)
            assert getattr(e.value, "reason", "") == "CLIENT_REVOKED"
            self.reach("rotate a revoked client: CLIENT_REVOKED")
            return
        _, secret = self.rules.rotate(ADMIN_CALLER, client.id, ttl)
        now, seconds = self.clock.wall(), rules_module.DEFAULT_PREVIOUS_TTL if ttl is None else ttl
        if client.previous is not None:
            client.old.append(client.previous)
        if seconds:
            client.previous, client.previous_until = client.secret, now + dt.timedelta(seconds=seconds)
        else:
            client.old.append(client.secret)
            client.previous, client.previous_until = None, None
            client.cut, client.changed_at = float(int(now.timestamp())), now  # this second's start
        client.secret = secret
        self.reach("rotate with a grace" if seconds else "rotate, the previous secret ends now")

    @rule(client=clients)
    def leak_response(self, client):
        """A token is taken, then the secret that minted it rotated out without a grace (what an
        admin does after a leak): the rotation alone is rarely drawn after a successful grant."""
        self.grant(client, "current", frozenset())
        self.clock.ms += 1000  # a token minted in the rotation's own second is kept (iat has whole seconds)
        self.rotate(client, 0)

    @rule(client=clients, seconds=st.sampled_from([None, 1, 4, 30]))
    def set_expiry(self, client, seconds):
        if client.revoked:
            return
        now = self.clock.wall()
        at = None if seconds is None else now + dt.timedelta(seconds=seconds)
        self.rules.set_expiry(ADMIN_CALLER, client.id, at)
        if client.live(now) != (at is None or at > now) or client.expires_at != at:
            client.changed_at = now
        client.expires_at = at
        self.reach("clear the expiry" if at is None else "set an expiry")

    @rule(client=clients)
    def revoke(self, client):
        self.rules.revoke(ADMIN_CALLER, client.id)
        if not client.revoked:
            client.revoked, client.changed_at = True, self.clock.wall()
        self.reach("revoke")

    @rule(ms=st.sampled_from([1, 500, 1000, 3000, 5001, 31_000, 61_000]))
    def time_passes(self, ms):
        self.clock.ms += ms
        self.reach("time passes")

    @rule(client=clients, which=st.sampled_from(["current", "previous", "old", "wrong"]),
          scope=st.sets(st.sampled_from(PERMISSIONS)))
    def grant(self, client, which, scope):
        secret = {"current": client.secret, "previous": client.previous,
                  "old": client.old[-1] if client.old else None, "wrong": client.secret[:-1] + "!"}[which]
        if secret is None:
            return
        now = self.clock.wall()
        asked = " ".join(sorted(scope))
        try:
            got = self.rules.grant(grant_type="client_credentials", client_id=client.id, client_secret=secret,
                                   scope=asked, address=f"10.0.0.{next(_addresses)}")
        except Unauthenticated as e:
            assert e.reason == "INVALID_CLIENT"
            assert not client.works(secret, now), f"{which} secret refused while it works"
            self.reach(f"grant with the {which} secret: INVALID_CLIENT"
                       + ("" if client.live(now) else " (not live)"))
            return
        except InvalidArgument as e:
            assert e.reason == "INVALID_SCOPE" and client.works(secret, now) and not scope <= client.permissions
            self.reach("grant for a scope not held: INVALID_SCOPE")
            return
        assert client.works(secret, now), f"{which} secret worked when the model says it does not"
        assert scope <= client.permissions
        assert got.scope == (asked or " ".join(sorted(client.permissions)))
        client.tokens.append(float(int(now.timestamp())))  # its iat, as TokenIssuer.issue_client sets it
        self.reach(f"grant with the {which} secret")

    @rule(client=clients, process=st.sampled_from("AB"), which=st.sampled_from(["oldest", "newest", "another issuer's"]))
    def check(self, client, process, which):
        now = self.clock.wall()
        issued_at = {"oldest": client.tokens[0] if client.tokens else 0.0,
                     "newest": client.tokens[-1] if client.tokens else 0.0, "another issuer's": 0.0}[which]
        token = Caller(subject=client.id, email="", role=CLIENT, permissions=client.permissions, issued_at=issued_at)
        try:
            who = self.checks[process].check(token)
            accepted = True
        except Unauthenticated as e:
            assert e.reason == "TOKEN_REVOKED"
            accepted = False
        if client.settled(now):
            assert accepted == client.token_works(issued_at, now), (accepted, which, issued_at, client, now)
        if accepted:
            assert who.permissions == client.permissions
        state = "live" if client.token_works(issued_at, now) else (
            "ended by a rotation without a grace" if client.live(now) else "ended")
        bound = "" if client.settled(now) else " within the bound"
        self.reach(f"check on {process}: {'accepted' if accepted else 'refused'} ({state}{bound})")


COVERED: dict[str, collections.Counter] = {}


@pytest.mark.timeout(max(120, EXAMPLES * STEPS // 5))
def test_service_clients_behave_like_the_model(database, backend, capsys):
    covered = COVERED.setdefault(backend, collections.Counter())
    ClientsMachine.covered = covered
    run_state_machine_as_test(
        ClientsMachine,
        settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    with capsys.disabled():
        print(f"\nservice client model on {backend}: {EXAMPLES} examples of up to {STEPS} steps; transitions:")
        for name, count in sorted(covered.items()):
            print(f"  {count:6d}  {name}")
    wanted = {"create", "rotate with a grace", "rotate, the previous secret ends now", "set an expiry",
              "clear the expiry", "revoke", "grant with the current secret", "grant with the previous secret",
              "grant with the old secret: INVALID_CLIENT", "grant with the wrong secret: INVALID_CLIENT",
              "grant for a scope not held: INVALID_SCOPE", "check on A: accepted (live)",
              "check on A: refused (ended)", "check on B: refused (ended)",
              "grant with the current secret: INVALID_CLIENT (not live)", "check on B: accepted (live)"}
    missing = wanted - set(covered)
    if not any("refused (ended by a rotation without a grace" in name for name in covered):
        missing.add("check: refused (ended by a rotation without a grace)")
    assert not missing, f"transitions never reached: {missing}"
