"""Unfinished request bodies from several addresses cannot make Envoy refuse everyone.

Each address keeps within its own limit (edge_rate_limit: 1,000 new requests at once, then 500 a
second), but eight of them, each holding a few hundred HTTP/2 calls whose message stops 1,000 bytes
short of the largest Envoy takes (its body limit; about 40 KB of heap each with a 16 KiB limit,
until the request timeout), hold more than Envoy's heap (192 MiB): the overload manager answered
every new request 503 until the attack stopped. Now every HTTP/2 stream that buffers 4 KiB or more is tracked, and the overload manager
resets the ones holding the most from 30% of the heap, fast enough (every 20 ms) and early enough
that it never has to refuse new requests (envoy.yaml, overload_manager; envoy/README.md "The edge
under attack"). The test asserts that: the resets happened, no request was refused for memory,
and the bystander was served throughout.

The attack runs in waves, each address opening its streams again every WAVE_SECONDS (as an
attacker re-opens what was reset), on a public method (Login: nothing on Envoy's path checks a
token before the body is whole), while a bystander customer from addresses of its own creates,
reads and lists payments over REST and gRPC and logs in: every step within 5 s. Envoy's heap
and resident memory are sampled; the resident memory must stay under RSS_LIMIT_MB (the sidecar's
limit is 384 MiB).
"""

from __future__ import annotations

import collections
import contextlib
import json
import time

import pytest

from tests.support import attacks

HOST = "127.0.0.1"
ADDRESSES = 8
CONNECTIONS = 25  # per address and wave
STREAMS = 15  # per connection: 15 bodies within the limit stay within Envoy's 1 MiB connection window
# The largest message the buffer filter takes (with its 5-byte prefix), all but its last 1,000
# bytes sent: the attacker adapts to the limit.
ANNOUNCED = attacks.configured_body_limit() - 5
SENT = ANNOUNCED - 1_000
WAVES, WAVE_SECONDS = 5, 2.5
RSS_LIMIT_MB = 300  # the sidecar's limit is 384 MiB (k8s/base)
METHOD = "/payments.v1.AuthService/Login"


@pytest.fixture(scope="module", autouse=True)
def open_files():
    return attacks.raise_open_files(4 * ADDRESSES * CONNECTIONS * WAVES + 4096)


@pytest.mark.timeout(180)
def test_unfinished_bodies_from_several_addresses_leave_others_served(edge, bystander):
    bystander.check("bodies-warm")
    waves: list[attacks.PartialBodies] = []
    with attacks.EnvoyMemorySampler(edge.envoy, interval=0.2) as memory, contextlib.ExitStack() as held, \
            bystander.keep_checking("bodies-during", pause=0.1) as checking:
        for wave in range(WAVES):
            started = time.monotonic()
            sources = [f"127.72.{wave + 1}.{a + 1}" for a in range(ADDRESSES)]
            opened = held.enter_context(attacks.partial_bodies(HOST, edge.envoy.port, METHOD, sources, CONNECTIONS,
                                                               STREAMS, announced=ANNOUNCED, sent=SENT))
            waves.append(opened)
            print(f"wave {wave}: {len(opened.streams)} streams opened ({opened.refused} connections refused, "
                  f"{opened.not_opened} streams not opened) in {time.monotonic() - started:.1f} s; "
                  f"Envoy {attacks.envoy_memory(edge.envoy)}")
            time.sleep(max(0.0, WAVE_SECONDS - (time.monotonic() - started)))
        for opened in waves:
            opened.answered_within(10.0)
        stats = attacks.envoy_stats(edge.envoy, "reset_high_memory_stream.count", "fixed_heap.pressure",
                                    "payments_api.downstream_rq_overload_close", "payments_api.downstream_rq_rx_reset")
    after = bystander.check("bodies-after")
    outcomes = sum((opened.outcomes() for opened in waves), start=collections.Counter())
    print(f"attack: {sum(outcomes.values())} streams, outcomes {dict(outcomes)}")
    print(f"Envoy memory: at start {memory.first}; peak {memory.peak}; peak heap {memory.peak_heap}")
    print(f"stats {json.dumps(stats)}")
    checking.report(after)
    assert memory.peak.rss_mb < RSS_LIMIT_MB, f"Envoy reached {memory.peak}"
    bystander.assert_ok(checking.checks + [after])
    # The overload manager reset the attack's streams; it never had to refuse new requests.
    assert stats.get("envoy.overload_actions.reset_high_memory_stream.count", 0) > 0, stats
    assert stats.get("http.payments_api.downstream_rq_overload_close", 0) == 0, stats
