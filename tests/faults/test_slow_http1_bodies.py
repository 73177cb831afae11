"""Slow HTTP/1.1 bodies from several addresses cannot make Envoy refuse everyone.

Envoy's overload manager resets only HTTP/2 streams that hold memory (reset_high_memory_stream);
an HTTP/1 request is never reset. So what an HTTP/1 attacker can make Envoy hold is bounded only
by (connections Envoy accepts) x (what one connection with an unfinished request holds: the
buffer filter's limit on a body, rounded up to Envoy's 16 KiB buffer slices, plus the connection's
and the stream's own state). With 64 KiB bodies and 4,096 connections that product was above the
heap's 503 threshold (92% of 192 MiB), and was measured so: half of the attack's requests and
some of a bystander's were refused with 503. The body limit and the connection cap in envoy.yaml
now keep the product well below it (envoy/README.md "The edge under attack").

The attacker adapts to the limit: every connection announces a body of exactly the limit (read
from envoy.yaml) and sends all but its last 1,000 bytes, then nothing, from eight addresses each
within its own per-address limit, in waves (as an attacker re-opens what timed out), holding
all but ROOM of the connections the cap allows (a full cap refuses new clients: that case is
test_connection_floods.py's). Meanwhile a bystander customer from addresses of its own creates,
reads and lists payments over REST and gRPC and logs in: every step within 5 s. No request may
be refused for memory (the overload manager's 503), Envoy's RSS stays under RSS_LIMIT_MB, and
the cap times the heap each attacking connection was measured to cost stays under
PRODUCT_AT_MOST of the heap's size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import time

import pytest
from tests.support import attacks

HOST = "127.0.0.1"
ADDRESSES = 8
CONNECTIONS = 110  # per address and wave at most: 880 a wave
ROOM = 150  # connections of the cap the attacker leaves free (for the bystander)
WAVES, WAVE_SECONDS = 5, 1.0
SHORT_BY = 1_000  # bytes of the announced body never sent
RSS_LIMIT_MB = 300  # the sidecar's limit is 384 MiB (k8s/base)
PRODUCT_AT_MOST = 0.75  # of the heap Envoy may use: the 503 threshold is 92%
PATH = "/v1/auth/login"  # public: nothing on Envoy's path checks a token before the body is whole


LIMIT = attacks.configured_body_limit()
CAP, HEAP = attacks.configured_overload_limits()


@pytest.fixture(scope="module", autouse=True)
def open_files():
    return attacks.raise_open_files(4 * ADDRESSES * CONNECTIONS * WAVES + 4096)


def open_wave(held: contextlib.ExitStack, port: int, wave: int, per_address: int) -> list[attacks.RawConnections]:
    """One wave: `per_address` slow bodies from each of ADDRESSES addresses, the addresses opened
    side by side (each on a thread: connect and send are system calls, outside the GIL)."""
    makers = [attacks.slow_body_posts(HOST, port, PATH, per_address, content_length=LIMIT,
                                      sent=LIMIT - SHORT_BY, source=f"127.73.{wave + 1}.{a + 1}")
              for a in range(ADDRESSES)]
    with concurrent.futures.ThreadPoolExecutor(ADDRESSES) as pool:
        list(pool.map(lambda m: m.open(), makers))
    for m in makers:
        held.callback(m.close)
    return makers


@pytest.mark.timeout(180)
def test_slow_http1_bodies_from_several_addresses_leave_others_served(edge, bystander):
    print(f"\nREST body limit: {LIMIT} bytes; each connection sends {LIMIT - SHORT_BY}")
    bystander.check("slow-http1-warm")
    waves: list[list[attacks.RawConnections]] = []
    costs = []  # heap per open connection, measured after each wave
    with attacks.EnvoyMemorySampler(edge.envoy, interval=0.2) as memory, contextlib.ExitStack() as held, \
            bystander.keep_checking("slow-http1-during", pause=0.1) as checking:
        for wave in range(WAVES):
            started = time.monotonic()
            active = attacks.envoy_stats(edge.envoy, "downstream_cx_active").get(
                "http.payments_api.downstream_cx_active", 0)
            opened = open_wave(held, edge.envoy.port, wave,
                               max(0, min(CONNECTIONS, (CAP - ROOM - active) // ADDRESSES)))
            waves.append(opened)
            stats = attacks.envoy_stats(edge.envoy, "downstream_cx_active")
            now, active = attacks.envoy_memory(edge.envoy), stats.get("http.payments_api.downstream_cx_active", 0)
            if active >= 500:
                costs.append((now.allocated_mb - memory.first.allocated_mb) * 1024 * 1024 / active)
            print(f"wave {wave}: {sum(len(m.conns) for m in opened)} connections opened "
                  f"({sum(m.refused for m in opened)} refused) in {time.monotonic() - started:.1f} s; "
                  f"active {active}; Envoy {now}")
            time.sleep(max(0.0, WAVE_SECONDS - (time.monotonic() - started)))
        for wave in waves:
            for m in wave:
                m.closed_within(15.0)
        stats = attacks.envoy_stats(edge.envoy, "fixed_heap.pressure", "payments_api.downstream_rq_overload_close",
                                    "payments_api.downstream_rq_4xx", "payments_api.downstream_rq_5xx",
                                    "stop_accepting_requests", "downstream_cx_overload_reject")
    after = bystander.check("slow-http1-after")
    outcomes = sum((m.outcomes() for wave in waves for m in wave), start=collections.Counter())
    print(f"attack: {sum(outcomes.values())} connections, outcomes {dict(outcomes)}")
    print(f"Envoy memory: at start {memory.first}; peak {memory.peak}; peak heap {memory.peak_heap}")
    print(f"stats {json.dumps(stats)}")
    checking.report(after)
    cost = max(costs, default=0.0)
    product = CAP * cost + memory.first.allocated_mb * 1024 * 1024
    print(f"heap per attacking connection: {cost / 1024:.1f} KiB (at most); {CAP} connections: "
          f"{product / 1024 / 1024:.0f} MiB = {product / HEAP:.0%} of the heap's {HEAP / 1024 / 1024:.0f} MiB")
    assert costs, "the attack never held 500 connections at once"
    assert product < PRODUCT_AT_MOST * HEAP, "the connection cap times one slow body's cost is too near the 503 threshold"
    assert not sum(m.refused for wave in waves for m in wave), "the attack reached the connection cap"
    assert memory.peak.rss_mb < RSS_LIMIT_MB, f"Envoy reached {memory.peak}"
    # No new request was refused because of Envoy's memory, and the bystander was served.
    assert stats.get("http.payments_api.downstream_rq_overload_close", 0) == 0, stats
    bystander.assert_ok(checking.checks + [after])
