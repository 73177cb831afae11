"""A thread pool that gives its threads back.

The receiving stage (admission.Receiver) needs up to a lane's bound of threads at once, but only
while clients are slow to send: an attack of header-only streams grew the server from 11 threads
to 235, and concurrent.futures.ThreadPoolExecutor never ends a thread it started, so they stayed
at 235 long after every stream had ended. Here a thread that has had nothing to do for
`idle_seconds` ends; the next burst starts threads again, up to `max_workers`.

Work is run in the order submitted; nothing is returned to the caller (the receiving stage
completes its own futures), and an exception from the work is logged, never lost silently.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class ElasticPool:
    def __init__(self, max_workers: int, *, idle_seconds: float = 30.0, name: str = "pool"):
        if max_workers < 1:
            raise ValueError("a pool needs at least one thread")
        self.max_workers, self.idle_seconds, self.name = max_workers, idle_seconds, name
        self._queue: collections.deque[tuple[Callable, tuple]] = collections.deque()
        self._cond = threading.Condition()
        self._threads = 0  # started and not yet ended
        self._idle = 0  # of those, waiting for work
        self._stopped = False
        self._ids = itertools.count()

    @property
    def threads(self) -> int:
        """Threads alive now (busy or idle)."""
        with self._cond:
            return self._threads

    def submit(self, fn: Callable, *args) -> None:
        """Run fn(*args) on a thread of the pool: an idle one, a new one while fewer than
        max_workers run, else the first to finish its work. RuntimeError after shutdown()."""
        with self._cond:
            if self._stopped:
                raise RuntimeError("cannot schedule new work after shutdown")
            self._queue.append((fn, args))
            if self._idle >= len(self._queue):
                self._cond.notify()
                return
            if self._threads >= self.max_workers:
                return  # a busy thread takes it when it is done
            self._threads += 1
        try:
            threading.Thread(target=self._work, name=f"{self.name}_{next(self._ids)}", daemon=True).start()
        except BaseException:
            with self._cond:
                self._threads -= 1
            raise

    def shutdown(self) -> None:
        """Refuse new work, drop what is queued, and end idle threads; work running finishes."""
        with self._cond:
            self._stopped = True
            self._queue.clear()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._idle += 1
                    woken = self._cond.wait(self.idle_seconds)
                    self._idle -= 1
                    if not woken and not self._queue:
                        self._threads -= 1  # idle for idle_seconds: give the thread back
                        return
                if not self._queue:  # stopped
                    self._threads -= 1
                    return
                fn, args = self._queue.popleft()
            try:
                fn(*args)
            except BaseException:
                log.exception("work on %s failed", self.name)
