"""server/edge/elastic_pool.py: threads start as work needs them, at most max_workers, and end
after idle_seconds without work."""

from __future__ import annotations

import threading
import time

import pytest

from server.edge.elastic_pool import ElasticPool


def wait_until(predicate, seconds: float = 5.0) -> bool:
    until = time.monotonic() + seconds
    while not predicate() and time.monotonic() < until:
        time.sleep(0.01)
    return predicate()


def named(prefix: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith(prefix + "_"))


def test_threads_grow_to_the_bound_run_everything_and_end_when_idle():
    pool = ElasticPool(4, idle_seconds=0.3, name="grow")
    release, done = threading.Event(), []
    for i in range(10):
        pool.submit(lambda i=i: (release.wait(5), done.append(i)))
    assert wait_until(lambda: pool.threads == 4)
    time.sleep(0.1)
    assert pool.threads == 4 and named("grow") == 4  # never more than max_workers, the rest queued
    release.set()
    assert wait_until(lambda: len(done) == 10)
    assert sorted(done) == list(range(10))
    assert wait_until(lambda: pool.threads == 0) and wait_until(lambda: named("grow") == 0)


def test_an_idle_thread_is_reused_before_a_new_one_starts():
    pool = ElasticPool(8, idle_seconds=5.0, name="reuse")
    for _ in range(20):
        ran = threading.Event()
        pool.submit(ran.set)
        assert ran.wait(2)
        time.sleep(0.01)  # the thread is idle again
    assert pool.threads == 1
    pool.shutdown()
    assert wait_until(lambda: pool.threads == 0)


def test_a_thread_ends_only_after_idle_seconds_without_work():
    pool = ElasticPool(2, idle_seconds=0.5, name="idle")
    pool.submit(lambda: None)
    assert wait_until(lambda: pool.threads == 1)
    time.sleep(0.2)
    assert pool.threads == 1  # not yet
    assert wait_until(lambda: pool.threads == 0, 2.0)


def test_failing_work_is_logged_and_the_thread_goes_on(caplog):
    pool = ElasticPool(1, idle_seconds=5.0, name="fails")
    ran = threading.Event()
    pool.submit(lambda: 1 / 0)
    pool.submit(ran.set)
    assert ran.wait(2)
    assert any("fails" in r.getMessage() and r.exc_info for r in caplog.records)
    assert pool.threads == 1
    pool.shutdown()


def test_after_shutdown_new_work_is_refused_and_queued_work_dropped():
    pool = ElasticPool(1, idle_seconds=5.0, name="stop")
    release, ran = threading.Event(), []
    pool.submit(release.wait, 5)
    pool.submit(lambda: ran.append("queued"))
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(lambda: None)
    release.set()
    assert wait_until(lambda: pool.threads == 0)
    assert ran == []
