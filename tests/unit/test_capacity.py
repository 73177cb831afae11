"""Lanes admit a bounded number of calls and shed the rest at once; stream deadlines fire."""

import threading
import time
from concurrent import futures

from server.edge import capacity


def test_a_full_lane_sheds_calls_at_once_and_counts_exactly():
    shedder = futures.ThreadPoolExecutor(1)
    lane = capacity.Lane("t", threads=2, admit=3, shedder=shedder)
    release = threading.Event()
    seen = []

    def work():
        seen.append(capacity.shedding())
        if not capacity.shedding():
            release.wait(5)

    admitted = [lane.submit(work) for _ in range(3)]  # two run, one waits for a thread
    shed = [lane.submit(work) for _ in range(5)]
    for f in shed:
        f.result(timeout=2)  # answered while the lane is still full
    assert lane.admitted == 3 and lane.shed == 5
    release.set()
    for f in admitted:
        f.result(timeout=5)
    time.sleep(0.05)
    assert lane.admitted == 0
    assert sorted(seen) == [False] * 3 + [True] * 5
    assert not capacity.shedding()  # the flag does not leak out of a shed call
    lane.submit(work).result(timeout=2)  # the lane admits again
    lane.shutdown()
    shedder.shutdown()


def test_deadlines_fire_once_and_forgotten_ones_never():
    deadlines = capacity.Deadlines()
    fired = []
    deadlines.after(0.05, lambda: fired.append("a"))
    key = deadlines.after(0.05, lambda: fired.append("b"))
    deadlines.forget(key)
    deadlines.after(0.01, lambda: 1 / 0)  # a failing action does not stop the thread
    deadlines.after(0.1, lambda: fired.append("c"))
    time.sleep(0.4)
    assert fired == ["a", "c"]
