"""Hundreds of idle gRPC streams held open at once, without a thread each (grpc.aio on a loop of
its own), as an attacker would hold them: opened, then never sent a message or read."""

from __future__ import annotations

import asyncio
import collections
import threading

from grpc import aio

REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
REFLECTION_V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
WATCH = "/grpc.health.v1.Health/Watch"
STREAMING_METHODS = (REFLECTION_V1, REFLECTION_V1ALPHA, WATCH)
STREAMS_PER_CONNECTION = 100  # Envoy's max_concurrent_streams: more connections, not queued streams


class IdleStreams:
    """`count` idle streams on each of `methods` to `target`, held until close()."""

    def __init__(self, target: str, methods=STREAMING_METHODS, count: int = 300, metadata=(), settle: float = 1.0):
        """`settle`: seconds to wait, once every stream has reached the server or been refused,
        before the test goes on (for the server's side of each to begin)."""
        self.target, self.methods, self.count, self.metadata = target, methods, count, tuple(metadata)
        self.settle = settle
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.calls: list[tuple[str, object]] = []
        self.channels: list[aio.Channel] = []

    def __enter__(self) -> "IdleStreams":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self.loop).result(timeout=120)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    async def _open(self) -> None:
        total = self.count * len(self.methods)
        for i in range((total + STREAMS_PER_CONNECTION - 1) // STREAMS_PER_CONNECTION):
            # A subchannel pool of its own: a connection per channel, not one shared by all.
            self.channels.append(aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]))
        n = 0
        for method in self.methods:
            for _ in range(self.count):
                channel = self.channels[n // STREAMS_PER_CONNECTION]
                n += 1
                if method == WATCH:
                    call = channel.unary_stream(method)(b"", metadata=self.metadata)
                else:
                    call = channel.stream_stream(method)(metadata=self.metadata)  # never writes
                self.calls.append((method, call))
        # Every stream has reached the server (or been refused) before the test goes on.
        await asyncio.gather(*(call.wait_for_connection() for _, call in self.calls), return_exceptions=True)
        await asyncio.sleep(self.settle)

    async def _close(self) -> None:
        for _, call in self.calls:
            call.cancel()
        for channel in self.channels:
            await channel.close(grace=None)

    def outcomes(self) -> dict[str, collections.Counter]:
        """method -> Counter of status codes of the streams that ended, and 'open' for the rest."""

        async def read():
            out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
            for method, call in self.calls:
                out[method][(await call.code()).name if call.done() else "open"] += 1
            return out

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(timeout=30)
