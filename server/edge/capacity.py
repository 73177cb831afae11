"""Capacity of its own for each kind of call, so that no kind of call can take what another needs.

grpc's server runs every call on one thread pool under one cap on concurrent calls. An idle
server-reflection stream holds its thread for as long as the client keeps it open, and a login
holds one for an argon2 hash: a handful of streams opened without a token, or a flood of
logins, took every thread and every slot, and payment calls timed out behind them.

So each kind of call gets a *lane*: threads of its own and a bound on the calls it admits
(running or waiting for a thread). A call beyond its lane's bound does not wait: a shedding
thread answers it at once with RESOURCE_EXHAUSTED (HTTP 429, `retry-after`). The lanes are

    payments   PaymentService calls          PAYMENTS_WORKER_THREADS, admits PAYMENTS_MAX_CONCURRENT_RPCS
    auth       Register and Login            PAYMENTS_AUTH_THREADS (hashing), admits AUTH_WAITING more
    health     Health.Check and Watch setup  2 threads: probes never wait behind anything else
    streams    server reflection             PAYMENTS_MAX_STREAMS threads, admits as many (no waiting)

and health Watch, which holds no thread, is bounded by a count of open watches. Every admitted
stream is ended after PAYMENTS_STREAM_MAX_SECONDS (Envoy ends them earlier at the edge).

grpc takes a method's pool from its behaviour's `experimental_thread_pool` attribute
(grpc/_server.py, `_select_thread_pool_for_behavior`): that is how server/edge/interceptor.py puts each
method in its lane. A lane is a ThreadPoolExecutor, so that attribute is honoured.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import threading
import time
from concurrent import futures
from typing import Callable

AUTH_WAITING = 32  # logins/sign-ups that may wait for a hashing thread; more are shed
HEALTH_THREADS = 2
HEALTH_ADMITTED = 64
MAX_WATCHES = 64

_shedding = threading.local()


def shedding() -> bool:
    """True inside a call that its lane did not admit: answer it RESOURCE_EXHAUSTED at once."""
    return getattr(_shedding, "active", False)


def _shed(fn, *args, **kwargs):
    _shedding.active = True
    try:
        return fn(*args, **kwargs)
    finally:
        _shedding.active = False


class Lane(futures.ThreadPoolExecutor):
    """A thread pool that admits at most `admit` calls (running or queued). Beyond that, a call
    runs on `shedder` instead, where shedding() is True, and is answered without waiting."""

    def __init__(self, name: str, threads: int, admit: int, shedder: futures.ThreadPoolExecutor):
        super().__init__(max_workers=threads, thread_name_prefix=name)
        self.name = name
        self.admit = max(admit, threads)
        self._shedder = shedder
        self._lock = threading.Lock()
        self.admitted = 0  # running or queued now
        self.shed = 0  # calls refused since start

    def submit(self, fn, /, *args, **kwargs):
        with self._lock:
            full = self.admitted >= self.admit
            if full:
                self.shed += 1
            else:
                self.admitted += 1
        if full:
            return self._shedder.submit(_shed, fn, *args, **kwargs)
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._release(None)
            raise
        # The future completes whatever becomes of the call (even one cancelled while queued:
        # grpc still runs the submitted function, which returns at once), so the count is exact.
        future.add_done_callback(self._release)
        return future

    def _release(self, _future) -> None:
        with self._lock:
            self.admitted -= 1


class Deadlines:
    """Ends streams that outlive their allowance: one thread for every stream, not one each."""

    def __init__(self):
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._live: set[int] = set()  # keys not yet fired or forgotten
        threading.Thread(target=self._run, name="stream-deadlines", daemon=True).start()

    def after(self, seconds: float, action: Callable[[], None]) -> int:
        with self._cond:
            key = next(self._ids)
            heapq.heappush(self._heap, (time.monotonic() + seconds, key, action))
            self._live.add(key)
            self._cond.notify()
            return key

    def forget(self, key: int) -> None:
        with self._cond:
            self._live.discard(key)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, key, action = heapq.heappop(self._heap)
                if key not in self._live:
                    continue
                self._live.discard(key)
            try:
                action()
            except Exception:  # a stream that ended meanwhile; nothing to do
                pass


class Counter:
    """A bounded count (open health watches): take() is False when full."""

    def __init__(self, limit: int):
        self.limit = limit
        self.value = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.value >= self.limit:
                return False
            self.value += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.value -= 1


@dataclasses.dataclass
class Lanes:
    payments: Lane
    auth: Lane
    health: Lane
    streams: Lane
    watches: Counter
    deadlines: Deadlines
    stream_max_seconds: float
    shedder: futures.ThreadPoolExecutor

    @classmethod
    def create(cls, *, worker_threads: int, max_concurrent_rpcs: int, auth_threads: int, max_streams: int,
               stream_max_seconds: float) -> "Lanes":
        shedder = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="shed")
        return cls(
            payments=Lane("rpc", worker_threads, max_concurrent_rpcs, shedder),
            auth=Lane("auth", auth_threads, auth_threads + AUTH_WAITING, shedder),
            health=Lane("health", HEALTH_THREADS, HEALTH_ADMITTED, shedder),
            streams=Lane("stream", max_streams, max_streams, shedder),
            watches=Counter(MAX_WATCHES),
            deadlines=Deadlines(),
            stream_max_seconds=stream_max_seconds,
            shedder=shedder,
        )

    @property
    def total(self) -> int:
        """Calls all lanes together admit: grpc's own cap sits above it, as a last backstop."""
        return self.payments.admit + self.auth.admit + self.health.admit + self.streams.admit + self.watches.limit

    def all(self) -> tuple[Lane, ...]:
        return (self.payments, self.auth, self.health, self.streams)

    def shutdown(self) -> None:
        for lane in self.all():
            lane.shutdown(wait=False)
        self.shedder.shutdown(wait=False)
