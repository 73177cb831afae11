"""Where a call waits for its request, and whose call a lane runs next: the one place that knows
grpc's private calling convention.

grpc's sync server hands a call to its method's thread pool as soon as the call's HEADERS arrive,
and the pool's thread then waits, inside grpc, for the request message. A client that sends the
headers of a unary call and never its message held a lane's thread for as long as it liked: two
such streams on Health/Check took the health lane (and with it every Envoy health check, so every
call was 503), four on GetPayment took every payment thread. So a lane's `submit` (grpc calls it
with `_unary_response_in_pool` or `_stream_response_in_pool` and their arguments; see
grpc/_server.py, `_handle_unary_unary` and its siblings) does not give the call to a worker thread
at once:

1. *Receiving*: the `Receiver` starts the call's receive operation and lets go; grpc's completion
   of it hands the message on, and no thread waits for a client. A call whose message has not
   arrived within `seconds` is cancelled (`DEADLINE_EXCEEDED`, "the request message did not
   arrive within N s"), and a call whose client went away ends at once. The receiver has a bound
   of its own: beyond it, the call that has waited longest for its message (and at least 0.1 s)
   is cancelled (`RESOURCE_EXHAUSTED`) to make room. Each lane has a receiver of its own, so a
   flood of one kind of call never evicts another kind (health checks above all). For streaming
   requests (server reflection) the request iterator is handed over at once.
2. *Serving*: the call, its message in hand, joins its lane's queue under a *key*: the caller
   (the access token's subject) for payment calls, the client's address for sign-up and login.
   The lane serves keys by virtual-time fair queueing (capacity.Lane): a key that has been
   served little comes first, one that sends faster than its share waits, and when the lane is
   full the busiest key's call is shed (most queued, then most sent of late), not a newcomer's.

If grpc ever calls `submit` in another shape, the call is served as before (a worker thread waits
for the message), and tests/faults/test_partial_requests.py fails; tests/unit/test_capacity.py
checks the shape on the installed grpc.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import ipaddress
import itertools
import json
import threading
import time
from concurrent import futures
from typing import Callable

from grpc import _server as grpc_server
from grpc._cython import cygrpc

from server.infra import metrics

_UNARY_SHAPES = (grpc_server._unary_response_in_pool, grpc_server._stream_response_in_pool)
# What grpc's thunks are called: one that waits for a unary request's message, and the ones that
# hand a stream of requests over at once (grpc/_server.py, _handle_stream_unary/_stream_stream).
_UNARY_THUNK = grpc_server._unary_request(None, None, None).__qualname__
_STREAM_THUNKS = ("_handle_stream_unary.<locals>.<lambda>", "_handle_stream_stream.<locals>.<lambda>")

CLIENT_ADDRESS_HEADER = "x-payments-client-address"  # set by Envoy: the address it took as the client's
_KEYS_REMEMBERED = 4096
ADDRESS_KEY = "addr:"  # a lane's key for a call without a caller: this, then its client
_PAYLOAD_READ = 4096  # characters of a token's payload read for its subject; this API's are ~300


class Call:
    """A call as grpc hands it to a pool: `run(*args)` with args (in-pool function, rpc_event,
    state, behavior, argument_thunk, deserializer, serializer)."""

    __slots__ = ("run", "args", "rpc_event")

    def __init__(self, run, args):
        self.run, self.args, self.rpc_event = run, args, args[1]

    def metadata(self):
        return self.rpc_event.invocation_metadata

    @property
    def unary(self) -> bool:
        """A call with one request message (grpc's thunk waits for it)."""
        return getattr(self.args[4], "__qualname__", "") == _UNARY_THUNK

    @property
    def streaming(self) -> bool:
        """A call with a stream of requests (grpc's thunk returns its iterator at once)."""
        return getattr(self.args[4], "__qualname__", "") in _STREAM_THUNKS

    def receive(self):
        """grpc's thunk: blocks until the request message (or the stream) is there; None if the
        client went away or the call was cancelled."""
        return self.args[4]()

    def receive_then(self, arrived: Callable[[object], None]) -> bool:
        """What grpc's thunk for a unary request does, without a thread waiting: start the
        receive operation, and when grpc completes it (on its polling thread), `arrived(request)`,
        None if the client closed or cancelled. False if the call had already ended."""
        state, call, deserializer = self.args[2], self.rpc_event.call, self.args[5]
        received = grpc_server._receive_message(state, call, deserializer)

        def on_completion(event):
            finished = received(event)  # grpc's own: the request into state, or the client closed
            with state.condition:
                request, state.request = state.request, None
                if request is None and state.client is grpc_server._CLOSED:
                    method = self.rpc_event.call_details.method
                    method = method.decode("latin-1") if isinstance(method, bytes) else method
                    grpc_server._abort(state, call, cygrpc.StatusCode.unimplemented,
                                       f'"{method}" requires exactly one request message.'.encode())
            arrived(request)
            return finished

        with state.condition:
            if not grpc_server._is_rpc_state_active(state):
                return False
            call.start_server_batch((cygrpc.ReceiveMessageOperation(grpc_server._EMPTY_FLAGS),), on_completion)
            state.due.add(grpc_server._RECEIVE_MESSAGE_TOKEN)
        return True

    def with_argument(self, argument) -> tuple:
        return self.args[:4] + ((lambda: argument),) + self.args[5:]

    def cancel(self, code: cygrpc.StatusCode, details: str) -> None:
        self.rpc_event.call.cancel(code, details)

    def finish_unserved(self) -> None:
        """Let grpc's in-pool function see no argument: it returns at once, and the call's state
        ends with the cancellation."""
        self.run(*self.with_argument(None))


def grpc_call(fn, args) -> Call | None:
    """The call grpc submitted, if it has the shape this module knows."""
    if len(args) == 7 and args[0] in _UNARY_SHAPES and hasattr(args[1], "invocation_metadata") and callable(args[4]):
        return Call(fn, args)
    return None


def _header(metadata, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


class CallerKeys:
    """The caller behind a call, for fair turns only (the token is verified later, by the
    interceptor): the subject of the bearer token, decoded without verification and remembered
    by a digest of the token's text (not the text: unverified tokens of 15 KB each, on the
    server's own port, held 64 MB of the process); without a token, the client's address."""

    def __init__(self):
        self._subjects: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, call: Call) -> str:
        metadata = call.metadata()
        value = _header(metadata, "authorization")
        if value and value.startswith("Bearer "):
            token = hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16).digest()
            with self._lock:
                subject = self._subjects.get(token)
                if subject is not None:
                    self._subjects.move_to_end(token)
                    return subject
            subject = "sub:" + _unverified_subject(value[7:])
            with self._lock:
                self._subjects[token] = subject
                if len(self._subjects) > _KEYS_REMEMBERED:
                    self._subjects.popitem(last=False)  # the least recently used one
            return subject
        return client_address(call)


def _unverified_subject(token: str) -> str:
    """Best effort, on grpc's polling thread: any token it cannot read is "?" (a payload nested
    5,000 deep raised RecursionError out of json.loads, which ended that thread)."""
    try:
        payload = token.split(".", 2)[1]
        if len(payload) > _PAYLOAD_READ:
            return "?"
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        subject = claims.get("sub") if isinstance(claims, dict) else None
        return subject if isinstance(subject, str) and len(subject) <= 128 else "?"
    except Exception:
        return "?"


def trusted_address(claimed: str | None, peer: str) -> str:
    """The client's address: what Envoy wrote in x-payments-client-address (the address it took as
    the client's, after its trusted hops; Envoy replaces any copy a client sent), but only from a
    peer on loopback, which is where the pod's Envoy connects from; from anywhere else (a client on
    the server's own port, from the node) the header is the caller's own claim and the TCP peer
    counts instead. `peer` is grpc's form: ipv4:127.0.0.1:5000, ipv6:[::1]:5000."""
    host = peer.split(":", 1)[1] if ":" in peer else peer
    host = host[1:host.index("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
    try:
        address = ipaddress.ip_address(host)
        loopback = address.is_loopback or (getattr(address, "ipv4_mapped", None) or address).is_loopback
    except ValueError:
        loopback = False
    return claimed if claimed and loopback else host


def client_network(address: str) -> str:
    """Who a client is, for fair turns and throttles: an IPv6 client by its /64, since one host
    there has 2^64 addresses to rotate through (Envoy's per-address limits count the same way);
    an IPv4 client, or an IPv4-mapped IPv6 one, by its address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def trusted_client(claimed: str | None, peer: str) -> str:
    """The client as the lanes and the throttles count it (servicers.client_address): the
    trusted_address, an IPv6 one by its /64 (client_network). One function for both, so that the
    login throttle never counts clients otherwise than the turns do."""
    return client_network(trusted_address(claimed, peer))


def client_address(call: Call) -> str:
    """The lanes' key for a call without a caller: its client (trusted_client)."""
    peer = call.rpc_event.call.peer()
    peer = peer.decode("latin-1") if isinstance(peer, bytes) else peer
    return ADDRESS_KEY + trusted_client(_header(call.metadata(), CLIENT_ADDRESS_HEADER), peer)


def client_of(key: str) -> str:
    """The client a lane's key names (client_address), as the throttles count it."""
    return key.removeprefix(ADDRESS_KEY)


class Receiver:
    """Where calls wait for their request message: no thread waits for one.

    A unary call's receive operation is started here, and grpc's completion of it (on grpc's
    polling thread, as every completion is) hands the message to `then`, which queues the call
    in its lane. A call whose message has not arrived within `seconds` is cancelled, and a call
    whose client went away ends as soon as grpc sees it. Waiting costs a call grpc holds anyway
    and no thread, so the bound is on calls: beyond `limit` waiting, the call that has waited
    longest is cancelled (`RESOURCE_EXHAUSTED`) to make room if it has waited STALE_SECONDS at
    least (a request sent whole waits for microseconds, so that one is not sending); beyond twice
    `limit` (a burst of stalled calls comes faster than STALE_SECONDS), the longest waiting at once.

    (Each call used to wait for its message on a thread of a pool of `limit`: the hand-over from
    that thread to the lane's took 25% of the server's CPU on GetPayment, with every message
    already there, and an attack of header-only streams grew the server by 220 threads.)"""

    STALE_SECONDS = 0.1

    def __init__(self, limit: int, seconds: float, deadlines):
        self.limit, self.seconds = limit, seconds
        self.bound = 2 * limit  # waiting: beyond it, eviction need not wait for staleness
        self._deadlines = deadlines
        self._lock = threading.Lock()
        self._waiting: collections.OrderedDict[int, tuple[Call, float]] = collections.OrderedDict()  # oldest first
        self._ids = itertools.count()
        self._closed = False
        self.evicted = 0  # calls cancelled to make room for a newer one
        self.expired = 0  # calls cancelled because their message did not arrive in time

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def receive(self, call: Call, then: Callable[[tuple], None], done: futures.Future) -> None:
        """Once `call`'s message is there, `then(args)` with it in hand; `done` is completed here
        for a call that never gets that far."""
        if self._closed:
            call.cancel(cygrpc.StatusCode.unavailable, "the server is stopping")
            _complete(done, call.finish_unserved)
            return
        if not call.unary:
            # A stream of requests: grpc hands its iterator over at once. A thunk of a shape this
            # module does not know is left to the lane's thread, which waits as grpc's own would
            # (never called here: grpc's polling thread must not wait for a client).
            then(call.with_argument(call.receive()) if call.streaming else call.args)
            return
        ident, now = next(self._ids), time.monotonic()
        with self._lock:
            stalled = self._stalled(now) if len(self._waiting) >= self.limit else None
            self._waiting[ident] = (call, now)
        self._cancel(stalled)
        key = self._deadlines.after(self.seconds, lambda: self._expire(call))

        def arrived(argument) -> None:
            self._deadlines.forget(key)
            with self._lock:
                self._waiting.pop(ident, None)
            if done.done():
                return
            if argument is None:  # the client went away, or the call was cancelled here
                _complete(done, call.finish_unserved)
                return
            try:
                then(call.with_argument(argument))
            except BaseException as exc:  # on grpc's polling thread: nothing may escape
                if not done.done():
                    done.set_exception(exc)

        if not call.receive_then(arrived):
            arrived(None)

    def _stalled(self, now: float) -> Call | None:
        """The call waiting longest, if it is stalled (or the receiver holds `bound`), taken out."""
        ident, (call, since) = next(iter(self._waiting.items()))
        if len(self._waiting) >= self.bound or now - since >= self.STALE_SECONDS:
            del self._waiting[ident]
            self.evicted += 1
            return call
        return None

    @staticmethod
    def _cancel(stalled: Call | None) -> None:
        if stalled is not None:
            metrics.unreceived_calls.labels("evicted").inc()
            stalled.cancel(cygrpc.StatusCode.resource_exhausted,
                           "the request message was not sent while others waited; retry shortly")

    def _expire(self, call: Call) -> None:
        with self._lock:
            self.expired += 1
        metrics.unreceived_calls.labels("expired").inc()
        call.cancel(cygrpc.StatusCode.deadline_exceeded,
                    f"the request message did not arrive within {self.seconds:g} s")

    def shutdown(self) -> None:
        self._closed = True


def _complete(done: futures.Future, work: Callable[[], object]) -> None:
    try:
        work()
    except BaseException as exc:
        if not done.done():
            done.set_exception(exc)
        return
    if not done.done():
        done.set_result(None)
