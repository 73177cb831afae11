"""Login floods from hundreds of loopback addresses at once, each address paced to a rate of its
own, run in child processes so that the test's own clients (the stranger whose login must be
served) do not share an interpreter with the attacker.

A flood is a Plan: the addresses (127.x.y.z, all loopback on Linux), how many calls a second each
sends (open loop: whether or not its earlier calls were answered), for how long, over REST
(HTTP/1.1 keep-alive connections, a pool per address) or native gRPC (one HTTP/2 connection per
address, every call a stream on it) or both (every other address), and optionally a burst: calls
each address sends at once before its paced ones. Every other login carries the right password of
one of `accounts` (the same one for each address), the others a wrong password for an unknown email
(a new one each time, so the server's per-account throttle never answers instead of its hashing).

`flood(plan, processes=2)` is a context manager: the plan's addresses are split between the
processes, `.wait_started()` returns once every process has opened its connections and begun, and
`.result()` waits for the calls to be answered and returns a FloodResult: what each call got,
counted separately for the burst and the paced calls, and every call's latency. What a call got:

    ok                    200 / OK (a right password)
    wrong password        401 / UNAUTHENTICATED
    RATE_LIMITED          Envoy's per-address bucket (429 RATE_LIMITED / RESOURCE_EXHAUSTED
                          "local_rate_limited")
    breaker overflow      Envoy's circuit breaker for the login cluster (REST 429 SERVER_BUSY from
                          Envoy; gRPC UNAVAILABLE "overflow")
    SERVER_BUSY           the server's auth lane shed it (429 / RESOURCE_EXHAUSTED from the server)
    timeout, reset (an HTTP/2 RST_STREAM's code, or the socket's error), connection ended,
    connect error, or the status and reason of anything else

(A REST call whose kept-alive connection Envoy had closed before any answer is sent again on a new
one, as HTTP clients do.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import multiprocessing
import struct
import time
import uuid

OK, WRONG, RATE_LIMITED, OVERFLOW, BUSY = "ok", "wrong password", "RATE_LIMITED", "breaker overflow", "SERVER_BUSY"
REST_PATHS = {"login": "/v1/auth/login", "refresh": "/v1/auth/refresh"}
GRPC_PATHS = {"login": "/payments.v1.AuthService/Login", "refresh": "/payments.v1.AuthService/Refresh"}


@dataclasses.dataclass(frozen=True)
class Plan:
    host: str
    port: int
    sources: tuple[str, ...]
    rate: float  # calls a second from each address
    seconds: float
    protocol: str = "rest"  # "rest", "grpc" or "mixed" (every other address)
    burst: int = 0  # calls each address sends at once, before its paced ones
    accounts: tuple[tuple[str, str], ...] = ()  # (email, password): every other login is right for one
    call: str = "login"  # or "refresh" (with a refresh token nobody issued)
    timeout: float = 30.0

    def part(self, index: int, parts: int) -> "Plan":
        return dataclasses.replace(self, sources=self.sources[index::parts])


@dataclasses.dataclass
class FloodResult:
    burst: collections.Counter
    paced: collections.Counter
    latencies: list[float]  # seconds, every call's

    @property
    def outcomes(self) -> collections.Counter:
        return self.burst + self.paced

    @property
    def calls(self) -> int:
        return sum(self.outcomes.values())

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0

    def __str__(self) -> str:
        burst = f"burst {dict(self.burst)}; " if self.burst else ""
        return (f"{self.calls} calls: {burst}paced {dict(self.paced)}; p50 {self.percentile(50):.2f} s, "
                f"p99 {self.percentile(99):.2f} s, max {max(self.latencies, default=0):.2f} s")


# --------------------------------------------------------------------------------------------
# What a call got


def rest_outcome(status: int, body: bytes) -> str:
    if status == 200:
        return OK
    if status == 401:
        return WRONG
    try:
        [info] = [d for d in json.loads(body).get("details", []) if "reason" in d][:1]
    except (ValueError, AttributeError):
        return f"{status} {body[:60].decode(errors='replace')}"
    reason = info["reason"]
    if reason == "SERVER_BUSY" and info.get("metadata", {}).get("source") == "envoy":
        return OVERFLOW
    return reason if reason in (RATE_LIMITED, BUSY) else f"{status} {reason}"


def grpc_outcome(status: str | None, message: str) -> str:
    if status == "0":
        return OK
    if status == "16":
        return WRONG
    if status == "8" and "local_rate_limited" in message:
        return RATE_LIMITED
    if status == "8" and "busy" in message:
        return BUSY
    if status == "14" and "overflow" in message:
        return OVERFLOW
    return f"grpc {status} {message[:60]}"


# --------------------------------------------------------------------------------------------
# The two protocols


class RestAddress:
    """HTTP/1.1 keep-alive connections from one source address, as many as calls in flight."""

    def __init__(self, host: str, port: int, source: str):
        self.host, self.port, self.source = host, port, source
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self) -> None:
        self.idle.append(await asyncio.open_connection(self.host, self.port, local_addr=(self.source, 0)))

    async def call(self, path: str, body: bytes, timeout: float) -> str:
        reused = bool(self.idle)
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=(self.source, 0))
            except OSError:
                return "connect error"
        writer.write(f"POST {path} HTTP/1.1\r\nhost: payments\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\n\r\n".encode() + body)
        try:
            status, data, close = await asyncio.wait_for(self._answer(reader), timeout)
        except asyncio.TimeoutError:
            writer.close()
            return "timeout"
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            writer.close()
            if reused and isinstance(e, asyncio.IncompleteReadError) and not e.partial:
                # Envoy closed the idle connection as the request went out: a client sends it again.
                return await self.call(path, body, timeout)
            return f"reset ({type(e).__name__})"
        if close:
            writer.close()
        else:
            self.idle.append((reader, writer))
        return rest_outcome(status, data)

    @staticmethod
    async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = b""
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                data += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
        else:
            data = await reader.readexactly(int(headers.get("content-length", "0")))
        return status, data, headers.get("connection", "").lower() == "close"

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


class _H2:
    """One HTTP/2 connection; every call a stream on it."""

    def __init__(self):
        import h2.config
        import h2.connection

        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.waiting: dict[int, asyncio.Future] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.closed = False

    async def open(self, host: str, port: int, source: str) -> None:
        self.reader, self.writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(2 ** 24)
        self.writer.write(self.conn.data_to_send())
        self.task = asyncio.ensure_future(self._read())

    @property
    def full(self) -> bool:
        return self.closed or self.conn.open_outbound_streams >= self.conn.remote_settings.max_concurrent_streams

    async def _read(self) -> None:
        import h2.events

        try:
            while data := await self.reader.read(65536):
                for event in self.conn.receive_data(data):
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        self.headers.setdefault(event.stream_id, {}).update(dict(event.headers))
                    elif isinstance(event, h2.events.DataReceived):
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        headers = self.headers.pop(event.stream_id, {})
                        waiter = self.waiting.pop(event.stream_id, None)
                        if waiter is not None and not waiter.done():
                            waiter.set_result(f"reset ({getattr(event.error_code, 'name', event.error_code)})"
                                              if isinstance(event, h2.events.StreamReset) else
                                              grpc_outcome(headers.get("grpc-status"), headers.get("grpc-message", "")))
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        self.ended = f"GOAWAY {getattr(event.error_code, 'name', event.error_code)}"
                        raise ConnectionError(self.ended)
                if out := self.conn.data_to_send():
                    self.writer.write(out)
        except Exception as e:  # noqa: BLE001 - whatever ended the connection ends its calls
            self.ended = getattr(self, "ended", None) or type(e).__name__
        self.closed = True
        for waiter in self.waiting.values():
            if not waiter.done():
                waiter.set_result(f"connection ended ({getattr(self, 'ended', None) or 'EOF'})")
        self.waiting.clear()

    async def call(self, path: str, message: bytes, timeout: float) -> str:
        stream = self.conn.get_next_available_stream_id()
        waiter = asyncio.get_running_loop().create_future()
        self.waiting[stream] = waiter
        self.conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                        (":authority", "payments"), ("content-type", "application/grpc"),
                                        ("te", "trailers")])
        self.conn.send_data(stream, b"\x00" + struct.pack(">I", len(message)) + message, end_stream=True)
        self.writer.write(self.conn.data_to_send())
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            return "timeout"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class GrpcAddress:
    """HTTP/2 connections from one source address: one, and another whenever every one open has
    as many streams as Envoy allows a connection (100)."""

    def __init__(self, host: str, port: int, source: str):
        self.host, self.port, self.source = host, port, source
        self.connections: list[_H2] = []

    async def open(self) -> None:
        connection = _H2()
        await connection.open(self.host, self.port, self.source)
        self.connections.append(connection)

    async def call(self, path: str, message: bytes, timeout: float) -> str:
        self.connections = [c for c in self.connections if not c.closed]
        connection = next((c for c in self.connections if not c.full), None)
        if connection is None:
            try:
                await self.open()
            except OSError:
                return "connect error"
            connection = self.connections[-1]
        return await connection.call(path, message, timeout)

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


# --------------------------------------------------------------------------------------------
# A flood in one process


def _request(plan: Plan, grpc: bool, address: int, n: int) -> bytes:
    """The `n`th call of the `address`th address: a right password every other login (one account
    per address), else a wrong one for an unknown email."""
    if plan.call == "refresh":
        token = f"rt_{uuid.uuid4().hex}"
        if grpc:
            from server.edge.pb import payments_pb2 as pb

            return pb.RefreshRequest(refresh_token=token).SerializeToString()
        return json.dumps({"refresh_token": token}).encode()
    if plan.accounts and n % 2 == 0:
        email, password = plan.accounts[address % len(plan.accounts)]
    else:
        email, password = f"nobody-{uuid.uuid4().hex[:12]}@example.com", "not the password"
    if grpc:
        from server.edge.pb import payments_pb2 as pb

        return pb.LoginRequest(email=email, password=password).SerializeToString()
    return json.dumps({"email": email, "password": password}).encode()


async def _flood(plan: Plan, started) -> FloodResult:
    result = FloodResult(collections.Counter(), collections.Counter(), [])
    clients = []
    for i, source in enumerate(plan.sources):
        grpc = plan.protocol == "grpc" or (plan.protocol == "mixed" and i % 2 == 1)
        client = (GrpcAddress if grpc else RestAddress)(plan.host, plan.port, source)
        await client.open()
        clients.append((client, grpc))
    tasks: set[asyncio.Task] = set()

    async def one(i: int, n: int, counts: collections.Counter) -> None:
        client, grpc = clients[i]
        path = (GRPC_PATHS if grpc else REST_PATHS)[plan.call]
        began = time.monotonic()
        got = await client.call(path, _request(plan, grpc, i, n), plan.timeout)
        counts[got] += 1
        result.latencies.append(time.monotonic() - began)

    def spawn(coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    started.set()
    for i in range(len(clients)):
        for n in range(plan.burst):
            spawn(one(i, n, result.burst))
    start = time.monotonic()
    for k in range(int(plan.rate * plan.seconds)):
        for i in range(len(clients)):
            delay = start + (k + i / len(clients)) / plan.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            spawn(one(i, plan.burst + k, result.paced))
    if tasks:
        await asyncio.wait(tasks, timeout=plan.timeout + 5)
    for client, _ in clients:
        client.close()
    return result


def _child(plan: Plan, started, results) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = asyncio.run(_flood(plan, started))
    results.put((dict(result.burst), dict(result.paced), result.latencies))


class Flood:
    def __init__(self, plan: Plan, processes: int):
        context = multiprocessing.get_context("spawn")
        self.plan = plan
        self._results = context.Queue()
        self._started = [context.Event() for _ in range(processes)]
        self._processes = [context.Process(target=_child, args=(plan.part(i, processes), self._started[i], self._results),
                                           name=f"login-flood-{i}", daemon=True) for i in range(processes)]
        self._result: FloodResult | None = None

    def __enter__(self) -> "Flood":
        for process in self._processes:
            process.start()
        return self

    def __exit__(self, *exc) -> None:
        for process in self._processes:
            process.join(timeout=self.plan.seconds + self.plan.timeout + 30)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)

    def wait_started(self, timeout: float = 30.0) -> None:
        """Returns once every process has opened its connections and sent its first calls."""
        deadline = time.monotonic() + timeout
        for event in self._started:
            if not event.wait(max(0.0, deadline - time.monotonic())):
                raise AssertionError(f"the flood did not start within {timeout:.0f} s")

    def result(self) -> FloodResult:
        """Waits for every call to be answered (or to time out); what they got."""
        if self._result is None:
            total = FloodResult(collections.Counter(), collections.Counter(), [])
            for _ in self._processes:
                burst, paced, latencies = self._results.get(timeout=self.plan.seconds + self.plan.timeout + 30)
                total.burst.update(burst)
                total.paced.update(paced)
                total.latencies += latencies
            self._result = total
        return self._result


def flood(plan: Plan, processes: int = 2) -> Flood:
    """`with flood(plan) as f: f.wait_started(); ...; f.result()` (see the module's docstring)."""
    return Flood(plan, processes)


def addresses(block: int, count: int) -> tuple[str, ...]:
    """`count` loopback addresses of 127.<block>.0.0/16: 127.<block>.<i // 250>.<i % 250 + 1>."""
    return tuple(f"127.{block}.{i // 250}.{i % 250 + 1}" for i in range(count))
