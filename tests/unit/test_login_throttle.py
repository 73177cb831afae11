"""Failed logins per email: free at first, then growing waits with a ceiling, forgotten in time."""

import datetime as dt

import pytest

from server.domain import login_throttle
from server.domain.errors import ResourceExhausted
from server.domain.login_throttle import FREE_FAILURES, MAX_DELAY_SECONDS, LoginThrottle

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def test_waits_double_after_the_free_failures_and_never_exceed_the_ceiling():
    throttle, now, waits = LoginThrottle(), 0.0, []
    for _ in range(FREE_FAILURES + 10):
        throttle.check("a@example.com", at(now))  # allowed: each attempt comes when it may
        throttle.failed("a@example.com", at(now))
        try:
            throttle.check("a@example.com", at(now))
            waits.append(0)
        except ResourceExhausted as e:
            assert e.reason == "LOGIN_THROTTLED"
            waits.append(e.retry_after)
        now += waits[-1]
    assert waits[:FREE_FAILURES - 1] == [0] * (FREE_FAILURES - 1)
    assert waits[FREE_FAILURES - 1:FREE_FAILURES + 4] == [1, 2, 4, 8, 16]
    assert max(waits) == MAX_DELAY_SECONDS


def test_other_emails_success_and_time_reset_the_count():
    throttle = LoginThrottle()
    for _ in range(FREE_FAILURES):
        throttle.failed("a@example.com", at(0))
    with pytest.raises(ResourceExhausted):
        throttle.check("a@example.com", at(0))
    throttle.check("b@example.com", at(0))  # another account is untouched
    throttle.check("a@example.com", at(1.01))  # the wait is over
    throttle.succeeded("a@example.com")
    throttle.failed("a@example.com", at(2))
    throttle.check("a@example.com", at(2))  # one failure after a success: free again
    for _ in range(FREE_FAILURES):
        throttle.failed("c@example.com", at(0))
    throttle.check("c@example.com", at(login_throttle.FORGET_SECONDS + 1))  # forgotten


def test_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(login_throttle, "MAX_TRACKED", 100)
    throttle = LoginThrottle()
    for i in range(1000):
        throttle.failed(f"u{i}@example.com", at(0))
    assert len(throttle._by_email) == 100
