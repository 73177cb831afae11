"""Capacity of its own for each kind of call, so that no kind of call, and no caller, can take
what another needs.

grpc's server runs every call on one thread pool under one cap on concurrent calls. An idle
server-reflection stream holds its thread for as long as the client keeps it open, and a login
holds one for an argon2 hash: a handful of streams opened without a token, or a flood of
logins, took every thread and every slot, and payment calls timed out behind them.

So each kind of call gets a *lane*: threads of its own and a bound on the calls it admits
(running or queued). The lanes are

    payments   every call that needs a token              PAYMENTS_WORKER_THREADS, admits PAYMENTS_MAX_CONCURRENT_RPCS
    auth       Register, Login, Refresh                   PAYMENTS_AUTH_THREADS (hashing), admits AUTH_WAITING more
    health     Health.Check and Watch setup               2 threads: probes never wait behind anything else
    streams    server reflection                          PAYMENTS_MAX_STREAMS threads, admits as many (no waiting)

and health Watch, which holds no thread, is bounded by a count of open watches. Every admitted
stream is ended after PAYMENTS_STREAM_MAX_SECONDS (Envoy ends them earlier at the edge).

Within a lane, calls are served fairly between keys (server/edge/admission.py): a key is the
caller (payments) or the client's address (the others), and virtual-time fair queueing serves
first the key that has been served least, so one caller's hundreds of calls do not delay
another's first; when a lane is full, the call shed is the busiest key's (the most calls queued,
then the most calls sent of late), answered at once with RESOURCE_EXHAUSTED (HTTP 429,
`retry-after`) on a shedding thread.
And no lane thread waits for a client: a call joins its lane only once its request message has
arrived (admission.Receiver, one per lane, at most PAYMENTS_REQUEST_SECONDS after its headers).

grpc takes a method's pool from its behaviour's `experimental_thread_pool` attribute
(grpc/_server.py, `_select_thread_pool_for_behavior`), only if it is a ThreadPoolExecutor: that
is how server/edge/interceptor.py puts each method in its lane, and why a Lane is one by name.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import threading
import time
from concurrent import futures
from typing import Callable

from server.edge import admission

log = logging.getLogger(__name__)

AUTH_WAITING = 32  # logins/sign-ups that may wait for a hashing thread; more are shed
HEALTH_THREADS = 2
HEALTH_ADMITTED = 64
MAX_WATCHES = 64  # open health watches per process; Envoy's payments_watch breaker admits as many (envoy/envoy.yaml)
BUSY_WINDOW = 1.0  # seconds: how far back a key's arrivals count towards how busy it is
MAX_KEYS = 16_384  # keys a lane counts the arrivals of in a window; a new key beyond counts as idle
RECEIVING = 128  # payment calls that may wait for their request message at once (the other lanes: shares of it)

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
    """Threads of its own and a bound on the calls it admits (queued or running), served fairly
    between keys (server/edge/admission.py: a key is a caller, or a client's address) by
    virtual-time fair queueing: each call is tagged one past the later of the lane's virtual time
    (the tag of the call last begun) and its key's previous tag, and the smallest tag runs next.
    A key that has been served little, a newcomer above all, is next; a key that sends faster
    than its share gets ever later tags. Beyond the bound, the busiest key's call is shed: the
    key with the most calls queued, then with the most calls arrived in the last BUSY_WINDOW or
    two (shed ones too), then the latest tag; the newcomer if it is that call. It runs on
    `shedder` instead, where shedding() is True, and is answered at once.

    (Round robin over keys, before this, shed from the head of the line once every key had one
    call queued: with more flooding addresses than the lane admits, a stranger's login was never
    served. The attack run found it. Then the latest tag was shed first: with every flooder one
    call queued, like a stranger once its call was in, the stranger's was the latest whenever
    the flood's came after it, and 200 addresses within their limits had its logins refused.)

    With a receiver, a call joins the queue only once its request message has arrived.
    (A ThreadPoolExecutor only in name: grpc honours `experimental_thread_pool` only on one.)"""

    def __init__(self, name: str, threads: int, admit: int, shedder: futures.ThreadPoolExecutor,
                 key: Callable[[admission.Call], str] | None = None, receiver: admission.Receiver | None = None):
        super().__init__(max_workers=1, thread_name_prefix=name)
        self.name, self.threads = name, threads
        self.admit = max(admit, threads)
        self._shedder, self._key, self._receiver = shedder, key, receiver
        # A key's standing against it (the auth lane: its client's failed logins), weighed before
        # anything else when a call must be shed. None: every key stands alike.
        self.penalty: Callable[[str], int] | None = None
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, str, tuple]] = []  # (tag, arrival, key, job): queued calls
        self._queued: collections.Counter[str] = collections.Counter()  # key -> calls queued
        self._last_tag: dict[str, int] = {}  # key -> the tag of its latest call
        self._prune_at = self._prune_floor = 4 * self.admit + 64
        self._virtual = 0  # the tag of the call last begun
        self._arrivals_now: dict[str, int] = {}  # key -> calls that arrived in this window
        self._arrivals_before: dict[str, int] = {}  # key -> calls that arrived in the window before
        self._window_ends = 0.0
        self._arrivals = itertools.count()
        self._workers: list[threading.Thread] = []
        self._idle = 0
        self._closed = False
        self.admitted = 0  # running or queued now
        self.shed = 0  # calls refused since start

    @property
    def receiver(self) -> admission.Receiver | None:
        return self._receiver

    def submit(self, fn, /, *args, **kwargs):
        """grpc's way in: a call waits for its message (with a receiver), then takes its turn.

        This runs on grpc's one polling thread, which nothing may ever raise into: an exception
        there ends the thread, and with it every call the server would take (a client's token that
        made the caller's key raise did, on the server's own port). Whatever goes wrong in reading
        the call, it is served as grpc would serve it, under a key of its own."""
        try:
            call = admission.grpc_call(fn, args) if not kwargs else None
            key = self._key(call) if call is not None and self._key is not None else ""
        except Exception:
            log.exception("a call's turn could not be read; it is served under the key '?'")
            return self.submit_keyed("?", fn, *args, **kwargs)
        if call is None or self._receiver is None:
            return self.submit_keyed(key, fn, *args, **kwargs)
        done: futures.Future = futures.Future()
        try:
            self._receiver.receive(call, lambda ready: self._enqueue(key, (fn, ready, {}, done)), done)
        except Exception as exc:
            log.exception("a call could not wait for its message")
            try:
                call.cancel(admission.cygrpc.StatusCode.internal, "the call could not be received")
            finally:
                if not done.done():
                    done.set_exception(exc)
        return done

    def submit_keyed(self, key: str, fn, /, *args, **kwargs) -> futures.Future:
        """Queue `fn` under `key`, fairly against the other keys."""
        done: futures.Future = futures.Future()
        self._enqueue(key, (fn, args, kwargs, done))
        return done

    def _enqueue(self, key: str, job) -> None:
        victim = None
        with self._cond:
            tag = max(self._virtual, self._last_tag.get(key, 0)) + 1
            busy = self._arrived(key)
            if self._closed:
                victim = job
            elif self.admitted >= self.admit:
                self.shed += 1
                busiest, latest = max(((self._busyness(queued), i) for i, queued in enumerate(self._heap)),
                                      default=(None, None))
                # The newcomer counts its own call, as a queued call's key counts it: a key with
                # nothing queued must not take a place from one as quiet as itself.
                if busiest is None or busiest[:4] <= (self._standing(key), self._queued[key] + 1, busy, tag):
                    victim = job
                else:
                    _, _, gone, victim = self._heap[latest]
                    self._heap[latest] = self._heap[-1]
                    self._heap.pop()
                    heapq.heapify(self._heap)
                    self._forget(gone)
                    self.admitted -= 1
            if victim is not job:
                self._last_tag[key] = tag
                self.admitted += 1
                self._queued[key] += 1
                heapq.heappush(self._heap, (tag, next(self._arrivals), key, job))
                if len(self._last_tag) > self._prune_at:  # keys whose tags fell behind are as good as new
                    self._last_tag = {k: t for k, t in self._last_tag.items() if t > self._virtual}
                    # Not again until it doubles: with every thread busy the virtual time stands
                    # still, nothing can go, and a rebuild on every call cost 265-398 us under the
                    # lock at 10,000 keys (an attack on the lanes).
                    self._prune_at = max(self._prune_floor, 2 * len(self._last_tag))
                if self._idle:
                    self._cond.notify()
                elif len(self._workers) < self.threads:
                    worker = threading.Thread(target=self._work, name=f"{self.name}-{len(self._workers)}", daemon=True)
                    self._workers.append(worker)
                    worker.start()
        if victim is not None:
            self._shed_job(victim)

    def _arrived(self, key: str) -> int:
        """Count a call of `key`; its calls in this window and the last (BUSY_WINDOW seconds each)."""
        now = time.monotonic()
        if now >= self._window_ends:
            self._arrivals_before = self._arrivals_now if now < self._window_ends + BUSY_WINDOW else {}
            self._arrivals_now = {}
            self._window_ends = now + BUSY_WINDOW
        if key in self._arrivals_now or len(self._arrivals_now) < MAX_KEYS:
            self._arrivals_now[key] = self._arrivals_now.get(key, 0) + 1
        return self._recent(key)

    def _recent(self, key: str) -> int:
        """The key's calls that arrived in this window and the last."""
        return self._arrivals_now.get(key, 0) + self._arrivals_before.get(key, 0)

    def _busyness(self, queued: tuple) -> tuple:
        """Which queued call to shed first: its key's penalty, then its key's calls queued, then
        its key's calls of late (a key that floods, shed or not, is busier than a stranger whose
        one call is queued beside it), then the latest turn, then the latest arrival."""
        tag, arrival, key, _ = queued
        return self._standing(key), self._queued[key], self._recent(key), tag, arrival

    def _standing(self, key: str) -> int:
        return self.penalty(key) if self.penalty is not None else 0

    def _forget(self, key: str) -> None:
        self._queued[key] -= 1
        if not self._queued[key]:
            del self._queued[key]

    def _shed_job(self, job) -> None:
        fn, args, kwargs, done = job
        try:
            self._shedder.submit(_run, done, _shed, fn, *args, **kwargs)
        except RuntimeError:  # shut down
            _run(done, fn, *args, **kwargs)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    if self._closed:
                        return
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                tag, _, key, (fn, args, kwargs, done) = heapq.heappop(self._heap)
                self._virtual = max(self._virtual, tag)
                self._forget(key)
            try:
                _run(done, fn, *args, **kwargs, _before_done=self._release)
            except BaseException:  # the future holds it
                pass

    def _release(self) -> None:
        with self._cond:
            self.admitted -= 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        super().shutdown(wait=False)


def _run(done: futures.Future, fn, *args, _before_done=None, **kwargs) -> None:
    """Run a job and complete its future (after `_before_done`, so counts are exact once it is done)."""
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:
        if _before_done is not None:
            _before_done()
        done.set_exception(exc)
        return
    if _before_done is not None:
        _before_done()
    done.set_result(result)


class Deadlines:
    """Ends streams that outlive their allowance: one thread for every stream, not one each.

    forget() lets go of the action at once: an action holds its call, and grpc keeps a call's
    HTTP/2 stream counted against the connection's limit (app.HTTP2_FLOOD_LIMITS) until the last
    reference to it is gone. Kept until their deadline instead, the receiving stage's 5 s
    actions held every call of those 5 s, and at about 800 calls a second one connection (a
    client's, Envoy's) was refused every new call after its 4,096th (the limit then).

    Every call sets a deadline and nearly every one is forgotten, so the thread is woken only
    by a deadline earlier than every other, and fires what is due in batches up to LATENESS
    late: woken for each call, it took 6% of the server's CPU at 1,200 calls a second."""

    LATENESS = 0.05  # seconds an action may fire after its deadline

    def __init__(self):
        self._heap: list[tuple[float, int]] = []
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._actions: dict[int, Callable[[], None]] = {}  # keys not yet fired or forgotten
        threading.Thread(target=self._run, name="stream-deadlines", daemon=True).start()

    def after(self, seconds: float, action: Callable[[], None]) -> int:
        with self._cond:
            key = next(self._ids)
            when = time.monotonic() + seconds
            if not self._heap or when < self._heap[0][0]:
                self._cond.notify()  # earlier than the thread's wait: it must wake sooner
            heapq.heappush(self._heap, (when, key))
            self._actions[key] = action
            return key

    def forget(self, key: int) -> None:
        with self._cond:
            self._actions.pop(key, None)

    @property
    def pending(self) -> int:
        """Actions still to fire (forgotten ones are not)."""
        with self._cond:
            return len(self._actions)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - time.monotonic() + self.LATENESS)
                now, due = time.monotonic(), []
                while self._heap and self._heap[0][0] <= now:
                    action = self._actions.pop(heapq.heappop(self._heap)[1], None)
                    if action is not None:
                        due.append(action)
            for action in due:
                try:
                    action()
                except Exception:  # a stream that ended meanwhile; nothing to do
                    pass
            due = action = None  # let go of the calls they hold


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
    receivers: tuple[admission.Receiver, ...] = ()

    @classmethod
    def create(cls, *, worker_threads: int, max_concurrent_rpcs: int, auth_threads: int, max_streams: int,
               stream_max_seconds: float, request_seconds: float = 5.0,
               receiving: int = RECEIVING) -> "Lanes":
        shedder = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="shed")
        deadlines = Deadlines()
        # A receiver per lane: a flood of one kind of call never evicts another's (health checks).
        receivers = {name: admission.Receiver(max(8, receiving * share // 8), request_seconds, deadlines)
                     for name, share in (("rpc", 8), ("auth", 4), ("health", 2), ("stream", 1))}
        callers, addresses = admission.CallerKeys(), admission.client_address
        return cls(
            payments=Lane("rpc", worker_threads, max_concurrent_rpcs, shedder, key=callers, receiver=receivers["rpc"]),
            auth=Lane("auth", auth_threads, auth_threads + AUTH_WAITING, shedder, key=addresses,
                      receiver=receivers["auth"]),
            health=Lane("health", HEALTH_THREADS, HEALTH_ADMITTED, shedder, key=addresses, receiver=receivers["health"]),
            streams=Lane("stream", max_streams, max_streams, shedder, key=addresses, receiver=receivers["stream"]),
            watches=Counter(MAX_WATCHES),
            deadlines=deadlines,
            stream_max_seconds=stream_max_seconds,
            shedder=shedder,
            receivers=tuple(receivers.values()),
        )

    @property
    def total(self) -> int:
        """Calls all lanes together admit, and those waiting for their message: grpc's own cap sits
        above it, as a last backstop."""
        receiving = sum(r.bound for r in self.receivers)
        return (self.payments.admit + self.auth.admit + self.health.admit + self.streams.admit + self.watches.limit
                + receiving)

    def all(self) -> tuple[Lane, ...]:
        return (self.payments, self.auth, self.health, self.streams)

    def shutdown(self) -> None:
        for lane in self.all():
            lane.shutdown(wait=False)
        for receiver in self.receivers:
            receiver.shutdown()
        self.shedder.shutdown(wait=False)
