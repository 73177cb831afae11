"""Clients that push data faster than anyone reads it cannot grow Envoy's memory past a bound.

Before the edge limits, one unauthenticated stream pushing 1 MiB messages grew Envoy by tens of
MB in seconds: HTTP/2's default windows (256 MiB) let a client park that much in Envoy. With the
edge guidance's 64 KiB stream and 1 MiB connection windows and 32 KiB buffers, flow control holds
the client back instead. Here several such streams push for a few seconds, on a public method
(health Watch takes one message and never reads more), and Envoy's resident memory is sampled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time

import grpc

from tests.support import attacks

STREAMS = 8
SECONDS = 6.0
BOUND_MB = 24  # Envoy may grow by at most this much (its idle RSS is ~40-60 MB)
MESSAGE = b"\x00" * (1 << 20)


def push(target: str) -> int:
    """Push 1 MiB messages on one stream until the deadline; returns how many the client got out."""
    sent = 0

    def messages():
        nonlocal sent
        while True:
            sent += 1
            yield MESSAGE

    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        call = channel.stream_stream("/grpc.health.v1.Health/Watch")
        try:
            for _ in call(messages(), timeout=SECONDS):
                pass
        except grpc.RpcError:
            pass
    return sent


def test_streams_pushing_megabytes_cannot_grow_envoy_past_a_bound(edge):
    before = attacks.rss_mb(edge.envoy.proc.pid)
    peak = before
    with contextlib.ExitStack() as relays, concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        # Each stream from an address of its own (one address may open only a few Watch streams).
        sources = [relays.enter_context(attacks.address_relay("127.0.0.1", edge.envoy.port, f"127.75.0.{n + 1}"))
                   for n in range(STREAMS)]
        pushed = [pool.submit(push, source.target) for source in sources]
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            peak = max(peak, attacks.rss_mb(edge.envoy.proc.pid))
            time.sleep(0.1)
        sent = sum(f.result() for f in pushed)
    assert sent >= STREAMS  # each stream did push (the client's own buffer takes a few messages)
    assert peak - before < BOUND_MB, f"Envoy grew from {before:.0f} MB to {peak:.0f} MB"
    # Envoy still serves.
    assert edge.api.get("/ready").status == 200
