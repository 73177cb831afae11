"""Failed logins per (email, client address): free at first, then growing waits with a ceiling,
forgotten in time; counted before the hash and atomically; never holding up another address;
bounded in memory without letting a flood of other emails push a penalised pair out."""

import concurrent.futures
import threading
import time

from server.domain import login_throttle
from server.domain.errors import ResourceExhausted
from server.domain.login_throttle import FORGET_SECONDS, FREE_FAILURES, MAX_DELAY_SECONDS, LoginThrottle

ATTACKER, OWNER = "203.0.113.9", "198.51.100.7"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def allowed(throttle: LoginThrottle, email: str, client: str) -> bool:
    try:
        throttle.attempt(email, client)
        return True
    except ResourceExhausted as e:
        assert e.reason == "LOGIN_THROTTLED" and 1 <= e.retry_after <= MAX_DELAY_SECONDS
        return False


def test_waits_double_after_the_free_failures_and_never_exceed_the_ceiling():
    clock = Clock()
    throttle, waits, counted = LoginThrottle(clock), [], 0
    while len(waits) < 10:  # an attempt whenever one may come, at once
        try:
            throttle.attempt("a@example.com", ATTACKER)
            counted += 1
        except ResourceExhausted as e:
            waits.append(e.retry_after)
            clock.now += e.retry_after
    assert waits == [1, 2, 4, 8, 16] + [MAX_DELAY_SECONDS] * 5
    assert counted == FREE_FAILURES + 9


def test_the_free_attempts_come_first():
    clock = Clock()
    throttle = LoginThrottle(clock)
    assert [allowed(throttle, "a@example.com", ATTACKER) for _ in range(FREE_FAILURES + 1)] == \
        [True] * FREE_FAILURES + [False]


def test_refused_attempts_are_not_counted_and_do_not_move_the_wait():
    clock = Clock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_FAILURES):
        throttle.attempt("a@example.com", ATTACKER)
    for _ in range(100):  # hammering during the wait
        assert not allowed(throttle, "a@example.com", ATTACKER)
        clock.now += 0.0099
    clock.now = 1000.0 + 1.0  # the first wait (1 s) is over, however much was sent meanwhile
    assert allowed(throttle, "a@example.com", ATTACKER)


def test_another_address_is_never_held_up_whatever_the_guesser_sends():
    """The guesser tries at every opening (re-arming the wait each time) for an hour; the owner,
    from elsewhere, is let through on the first try every time."""
    clock = Clock()
    throttle = LoginThrottle(clock)
    for step in range(3600 * 4):
        clock.now = 1000.0 + step / 4
        allowed(throttle, "victim@example.com", ATTACKER)
        if step % 97 == 0:
            key = throttle.attempt("victim@example.com", OWNER)  # never raises
            throttle.succeeded(key)
    assert not allowed(throttle, "victim@example.com", ATTACKER)


def test_a_correct_login_and_time_reset_the_count():
    clock = Clock()
    throttle = LoginThrottle(clock)
    keys = [throttle.attempt("a@example.com", ATTACKER) for _ in range(FREE_FAILURES)]
    assert not allowed(throttle, "a@example.com", ATTACKER)
    assert allowed(throttle, "b@example.com", ATTACKER)  # another account is untouched
    clock.now += 1.01
    throttle.succeeded(throttle.attempt("a@example.com", ATTACKER))  # the right password
    assert all(allowed(throttle, "a@example.com", ATTACKER) for _ in range(FREE_FAILURES))  # free again
    for _ in range(FREE_FAILURES):
        throttle.attempt("c@example.com", ATTACKER)
    clock.now += FORGET_SECONDS + 1
    assert allowed(throttle, "c@example.com", ATTACKER)  # forgotten
    assert len(set(keys)) == 1


def test_concurrent_attempts_are_counted_before_any_is_checked():
    """20 at once from one address: exactly FREE_FAILURES get through to a password check."""
    throttle = LoginThrottle()
    start = threading.Barrier(20)

    def attempt(_):
        start.wait()
        return allowed(throttle, "a@example.com", ATTACKER)

    for _ in range(5):
        throttle = LoginThrottle()
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            passed = list(pool.map(attempt, range(20)))
        assert passed.count(True) == FREE_FAILURES


def test_a_flood_of_other_emails_does_not_push_a_penalised_pair_out():
    clock = Clock()
    throttle = LoginThrottle(clock, max_tracked=100)
    for _ in range(FREE_FAILURES):
        throttle.attempt("victim@example.com", ATTACKER)
    for i in range(10_000):  # one failure each on other emails: entries with no wait yet
        throttle.attempt(f"other{i}@example.com", ATTACKER)
    assert throttle.tracked() == 100
    assert not allowed(throttle, "victim@example.com", ATTACKER)


def test_entries_that_ran_out_are_forgotten_first_and_memory_is_bounded(monkeypatch):
    clock = Clock()
    throttle = LoginThrottle(clock, max_tracked=100)
    for i in range(50):
        for _ in range(FREE_FAILURES):
            throttle.attempt(f"old{i}@example.com", ATTACKER)
    clock.now += FORGET_SECONDS + 1
    for _ in range(FREE_FAILURES):
        throttle.attempt("victim@example.com", ATTACKER)
    for i in range(60):  # penalised pairs of their own: the old ones, run out, make room
        for _ in range(FREE_FAILURES):
            throttle.attempt(f"new{i}@example.com", "192.0.2.1")
    assert throttle.tracked() == 100
    assert not allowed(throttle, "victim@example.com", ATTACKER)
    assert not allowed(throttle, "new0@example.com", "192.0.2.1")
    for i in range(10_000):
        throttle.attempt(f"more{i}@example.com", "192.0.2.2")
    assert throttle.tracked() == 100  # whatever comes
    monkeypatch.setattr(login_throttle, "MAX_TRACKED", 100)
    assert LoginThrottle().max_tracked == 100


def test_the_cost_of_an_attempt_is_microseconds():
    """What the per-process table costs a login (docs/failures.md quotes it): far below the hash."""
    throttle = LoginThrottle()
    n = 20_000
    started = time.perf_counter()
    for i in range(n):
        throttle.succeeded(throttle.attempt(f"user{i % 1000}@example.com", f"10.0.{i % 250}.1"))
    per_attempt = (time.perf_counter() - started) / n
    print(f"throttle: {per_attempt * 1e6:.1f} us per attempt and success")
    assert per_attempt < 200e-6


def test_a_clients_failures_on_every_email_are_counted_for_the_auth_lane_and_forgotten_in_time():
    """What the auth lane sheds by (server/edge/app.py): attempts from a client, on any email,
    that were not a correct login, throttled ones too; a correct login takes its own attempt back,
    and a client quiet for CLIENT_FORGET_SECONDS starts from nothing."""
    clock = Clock()
    throttle = LoginThrottle(clock)
    for n in range(FREE_FAILURES + 3):  # the same email: the last three are throttled, and count
        allowed(throttle, "a@example.com", ATTACKER)
    for n in range(4):  # other emails each time, as a flood that dodges the per-email waits does
        allowed(throttle, f"nobody-{n}@example.com", ATTACKER)
    assert throttle.failures(ATTACKER) == FREE_FAILURES + 3 + 4
    throttle.succeeded(throttle.attempt("owner@example.com", OWNER))  # a correct login costs nothing
    assert throttle.failures(OWNER) == 0
    allowed(throttle, "owner@example.com", OWNER)  # a mistyped password counts once
    assert throttle.failures(OWNER) == 1
    clock.now += login_throttle.CLIENT_FORGET_SECONDS
    assert throttle.failures(ATTACKER) == 0 and throttle.failures(OWNER) == 0
