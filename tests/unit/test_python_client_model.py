"""The Python client's token cache (clients/python/payments_client/tokens.py CachedTokenSource)
against a small reference model: hypothesis drives a clock the test moves, a token service that
goes down and comes back and hands out tokens of varying lifetimes, refusals (invalidate), and
bursts of callers racing for a token; after every step the cache must have answered what the
model says (the same token, a fresh one, the old one through a failed renewal, or the error) and
fetched exactly as often. Prints which transitions a run reached."""

from __future__ import annotations

import collections
import os
import threading

import grpc
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from tests.support.python_client import import_from, shared_copy
from tests.support.reached import reached

EXAMPLES = int(os.environ.get("PAYMENTS_MODEL_EXAMPLES", "150"))
STEPS = int(os.environ.get("PAYMENTS_MODEL_STEPS", "40"))
RANDOM = "PAYMENTS_MODEL_EXAMPLES" in os.environ or "PAYMENTS_MODEL_STEPS" in os.environ
RENEW_BEFORE, MIN_LEFT = 60.0, 5.0
COVERED: collections.Counter = collections.Counter()


@pytest.fixture(scope="module")
def pc(tmp_path_factory):
    return import_from(shared_copy(tmp_path_factory))


class CountingLock:
    """The cache's lock, counting the callers waiting for it (so a burst's fetch can wait until
    every other caller of the burst is queued behind it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.waiting = 0
        self._count = threading.Lock()

    def __enter__(self):
        with self._count:
            self.waiting += 1
        self._lock.acquire()
        with self._count:
            self.waiting -= 1
        return self

    def __exit__(self, *exc):
        self._lock.release()


def machine_for(pc):
    class Service(pc.tokens.CachedTokenSource):
        """The token service as the cache sees it: up or down, each token with the lifetime set."""

        def __init__(self, clock):
            super().__init__(renew_before=RENEW_BEFORE, min_left=MIN_LEFT, clock=clock)
            self.up, self.lifetime, self.issued = True, 300.0, 0
            self._lock = CountingLock()
            self.burst = 0  # callers in the current burst

        def fetch(self):
            # A burst's fetch ends only once every other caller of the burst waits behind it.
            for _ in range(1000):
                if self._lock.waiting >= self.burst - 1:
                    break
                threading.Event().wait(0.005)
            if not self.up:
                raise pc.errors.Unavailable(grpc.StatusCode.UNAVAILABLE, "down", reason="DATABASE_UNAVAILABLE")
            self.issued += 1
            return f"token-{self.issued}", self.lifetime

    class TokenCacheMachine(RuleBasedStateMachine):
        @initialize()
        def start(self):
            self.ms = 0
            self.sut = Service(lambda: self.ms / 1000)
            # The model: the cached token, when it expires and when it is renewed; what was fetched.
            self.value, self.expires, self.renew, self.fetches = "", 0.0, 0.0, 0

        def now(self) -> float:
            return self.ms / 1000

        def expect(self) -> tuple[str, str]:
            """(what token() should answer, or "!" for the error; which transition that is), and
            the model moved as the cache should move."""
            now = self.now()
            if self.value and now < self.renew:
                return self.value, "cached"
            self.fetches += 1
            if self.sut.up:
                lifetime = self.sut.lifetime
                first = not self.value
                self.value = f"token-{self.sut.issued + 1}"
                self.expires = now + lifetime
                self.renew = self.expires - min(RENEW_BEFORE, lifetime / 2)
                return self.value, "first fetch" if first else "renewed"
            if self.value and now < self.expires - MIN_LEFT:
                return self.value, "renewal failed: the valid token kept"
            return "!", "renewal failed: expired, the error raised" if self.value else "first fetch failed"

        def ask(self):
            try:
                return self.sut.token()
            except pc.errors.Unavailable:
                return "!"

        @rule(ms=st.integers(0, 400_000))
        def time_passes(self, ms):
            self.ms += ms

        @rule(late_ms=st.integers(1, 2000))
        def until_the_renewal_is_due(self, late_ms):
            """Time to just past the cached token's renewal point (renewals are rare at random)."""
            if self.value and self.now() < self.renew:
                self.ms = int(self.renew * 1000) + late_ms

        @rule()
        def until_the_token_has_too_little_left(self):
            """Time to where a failed renewal may no longer fall back on the cached token."""
            if self.value and self.now() < self.expires - MIN_LEFT:
                self.ms = int((self.expires - MIN_LEFT) * 1000) + 1

        @rule()
        def service_goes_down(self):
            self.sut.up = False

        @rule()
        def service_comes_back(self):
            self.sut.up = True

        @rule(seconds=st.sampled_from([10.0, 40.0, 119.0, 120.0, 300.0, 3600.0]))
        def next_tokens_live(self, seconds):
            self.sut.lifetime = seconds

        @rule()
        def a_call(self):
            want, transition = self.expect()
            assert self.ask() == want, transition
            reached("python client token cache", transition)
            COVERED[transition] += 1

        @rule()
        def the_service_refuses_the_token(self):
            if self.value:
                self.sut.invalidate(self.value)
                self.value, self.expires, self.renew = "", 0.0, 0.0
                COVERED["invalidated"] += 1

        @rule(callers=st.integers(2, 5))
        def a_burst_of_callers(self, callers):
            """Callers racing for a token: all get the one answer, and at most one fetch is sent."""
            want, transition = self.expect()
            answers: list = []
            self.sut.burst = callers
            threads = [threading.Thread(target=lambda: answers.append(self.ask())) for _ in range(callers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            self.sut.burst = 0
            assert answers == [want] * callers, (answers, want, transition)
            COVERED[f"burst: {transition}"] += 1

        @invariant()
        def fetched_as_often_as_the_model(self):
            if hasattr(self, "sut"):
                assert self.sut.fetches == self.fetches, (self.sut.fetches, self.fetches)

    return TokenCacheMachine


def test_the_token_cache_behaves_like_the_model(pc, capsys):
    run_state_machine_as_test(machine_for(pc), settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, derandomize=not RANDOM,
        suppress_health_check=[HealthCheck.too_slow]))
    with capsys.disabled():
        print(f"\npython client token cache: {EXAMPLES} examples of up to {STEPS} steps; transitions covered:")
        for name, count in sorted(COVERED.items()):
            print(f"  {count:6d}  {name}")
    wanted = {"first fetch", "cached", "renewed", "renewal failed: the valid token kept",
              "renewal failed: expired, the error raised", "first fetch failed", "invalidated",
              "burst: cached", "burst: renewed", "burst: first fetch", "burst: first fetch failed"}
    if not RANDOM or EXAMPLES >= 1000:
        assert not wanted - set(COVERED), f"transitions never reached: {wanted - set(COVERED)}"
