"""Health Watch is public and a stream that stays open (up to max_stream_duration, 60 s): one
address may open 4 at once, then one every 15 s (envoy/envoy.yaml, the Watch route's own
bucket), so it holds at most 8, and another address's Watch is served meanwhile. Addresses
enough to fill the Watch cluster's breaker (64) take nothing that authenticated calls or
public health checks need: reflection, health Check and health Watch each have a cluster, and
so a circuit breaker, of their own. While the breaker is full, an operator's reflection call
with a valid token and a health Check from another address are answered as usual; what the
holders do take is other addresses' Watch (UNAVAILABLE) until they let go or max_stream_duration
ends their streams (envoy/README.md, "The edge under attack").
"""

from __future__ import annotations

import contextlib
import itertools
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import ALICE
from tests.support import attacks
from tests.support.idle_streams import WATCH, IdleStreams

DEADLINE = 5.0  # seconds: every call below is answered within it
HOLDER, PROBER, WATCHER = "127.74.0.1", "127.74.0.2", "127.74.0.3"
FLOOD = 20  # Watch streams one address tries to open at once


def route_cluster(path: str) -> tuple[str, int]:
    """The cluster envoy.yaml routes a gRPC path to, and its circuit breaker's max_requests."""
    config, route = attacks.configured_route(path)
    name = route["route"]["cluster"]
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == name)
    return name, cluster["circuit_breakers"]["thresholds"][0]["max_requests"]


def route_bucket(path: str) -> dict:
    """The per-address token bucket of the route envoy.yaml gives a gRPC path."""
    [descriptor] = attacks.configured_route(path)[1]["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]["descriptors"]
    return descriptor["token_bucket"]


def reflection(target: str, token: str) -> str:
    """LISTED when reflection with the token named the payment service, else the call's status."""
    with grpc.insecure_channel(target) as channel:
        try:
            answers = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=(("authorization", f"Bearer {token}"),), timeout=DEADLINE))
        except grpc.RpcError as e:
            return e.code().name
    return "LISTED" if "payments.v1.PaymentService" in str(answers) else f"not listed: {answers}"


def outcome(call) -> str:
    """A call's status name, or SERVING for a Check or Watch whose (first) answer said so."""
    try:
        answer = call() if callable(call) else call
        if not isinstance(answer, health_pb2.HealthCheckResponse):
            answer = next(answer)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    except grpc.RpcError as e:
        return e.code().name


def test_watch_streams_are_bounded_per_address_and_their_holders_take_nothing_else(edge, token_for):
    token = token_for(ALICE)
    envoy = f"127.0.0.1:{edge.envoy.port}"
    watch_cluster, watch_breaker = route_cluster(WATCH)
    burst = int(route_bucket(WATCH)["max_tokens"])
    assert reflection(envoy, token) == "LISTED"  # before: the operator's call works
    with contextlib.ExitStack() as stack:
        # One address tries to open many Watch streams at once: it gets its burst.
        holder = stack.enter_context(attacks.address_relay("127.0.0.1", edge.envoy.port, HOLDER))
        one = stack.enter_context(IdleStreams(holder.target, methods=(WATCH,), count=FLOOD, settle=0.3))
        assert one.outcomes()[WATCH] == {"open": burst, "RESOURCE_EXHAUSTED": FLOOD - burst}, one.outcomes()
        with attacks.address_relay("127.0.0.1", edge.envoy.port, WATCHER) as watcher, \
                grpc.insecure_channel(watcher.target) as channel:
            assert outcome(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                                     timeout=DEADLINE)) == "SERVING"
        # Addresses enough to fill the Watch breaker, each with its burst.
        opening = time.monotonic()
        waves = [one]
        for n in range(watch_breaker // burst):
            relay = stack.enter_context(attacks.address_relay("127.0.0.1", edge.envoy.port, f"127.74.1.{n + 1}"))
            waves.append(stack.enter_context(IdleStreams(relay.target, methods=(WATCH,), count=burst, settle=0.3)))
        held = sum(w.outcomes()[WATCH]["open"] for w in waves)
        stats = attacks.envoy_stats(edge.envoy, f"cluster.{watch_cluster}.upstream_rq_active",
                                    f"cluster.{watch_cluster}.upstream_rq_pending_overflow")
        print(f"{len(waves)} addresses opened {burst * len(waves)} Watch streams in {time.monotonic() - opening:.1f} s, "
              f"hold {held} ({watch_cluster}, breaker {watch_breaker}); {stats}")
        assert held == watch_breaker, (held, watch_breaker)  # they hold the whole Watch breaker

        # (a) An operator's reflection call with a valid token, from another client.
        started = time.monotonic()
        reflections = [reflection(envoy, token) for _ in range(3)]
        # (b) Public health checks from another address.
        with attacks.address_relay("127.0.0.1", edge.envoy.port, PROBER) as prober, \
                grpc.insecure_channel(prober.target) as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            checks = [outcome(lambda: check(health_pb2.HealthCheckRequest(), timeout=DEADLINE)) for _ in range(5)]
        elapsed = time.monotonic() - started
        # What the hold still takes: another address's Watch.
        with attacks.address_relay("127.0.0.1", edge.envoy.port, WATCHER) as watcher, \
                grpc.insecure_channel(watcher.target) as channel:
            watch = outcome(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=DEADLINE))
        print(f"while held: reflection {reflections}, checks {checks}, another address's Watch {watch}, {elapsed:.2f} s")
        assert reflections == ["LISTED"] * 3
        assert checks == ["SERVING"] * 5
        assert elapsed < DEADLINE
        assert watch == "UNAVAILABLE"  # the Watch breaker is full: the one thing a hold still takes
    # Once the holders let go, Watch serves the next caller again (each try from an address of its
    # own: one address's bucket is 4 Watch calls).
    deadline = time.monotonic() + 10
    for n in itertools.count(1):
        with attacks.address_relay("127.0.0.1", edge.envoy.port, f"127.74.2.{n}") as watcher, \
                grpc.insecure_channel(watcher.target) as channel:
            watch = outcome(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=DEADLINE))
        if watch == "SERVING":
            break
        assert watch == "UNAVAILABLE" and time.monotonic() < deadline, watch
        time.sleep(0.2)
