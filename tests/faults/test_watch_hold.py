"""One address holding every health Watch stream Envoy lets through takes nothing that
authenticated calls or public health checks need (envoy/envoy.yaml: reflection, health Check and
health Watch each on a cluster, and so a circuit breaker, of their own).

Health Watch is public and a stream: it stays open until max_stream_duration, and the per-address
limit counts new calls, not open ones, so one address that opens 20 and then 10 a second holds
as many as the Watch cluster's breaker admits. While it does, an operator's reflection call with a
valid token and a health Check from another address are answered as usual. What the hold does
take is the Watch breaker itself: another address's Watch is refused (UNAVAILABLE) until the
holder lets go or max_stream_duration ends its streams (envoy/README.md, "The edge under attack").
"""

from __future__ import annotations

import contextlib
import time

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devstack.envoyconf import CONFIG
from tests.conftest import ALICE
from tests.support import attacks
from tests.support.idle_streams import WATCH, IdleStreams

DEADLINE = 5.0  # seconds: every call below is answered within it
HOLDER, PROBER, WATCHER = "127.74.0.1", "127.74.0.2", "127.74.0.3"
FIRST_WAVE, WAVE, WAVES = 20, 10, 7  # the health route's per-address burst, then a second's refill each


def route_cluster(path: str) -> tuple[str, int]:
    """The cluster envoy.yaml routes a gRPC path to, and its circuit breaker's max_requests."""
    config = yaml.safe_load(CONFIG.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        match = route["match"]
        if match.get("path") == path or ("prefix" in match and path.startswith(match["prefix"])):
            name = route["route"]["cluster"]
            break
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == name)
    return name, cluster["circuit_breakers"]["thresholds"][0]["max_requests"]


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


def test_one_address_holding_watch_streams_leaves_reflection_and_health_checks_served(edge, token_for):
    token = token_for(ALICE)
    envoy = f"127.0.0.1:{edge.envoy.port}"
    watch_cluster, watch_breaker = route_cluster(WATCH)
    assert reflection(envoy, token) == "LISTED"  # before: the operator's call works
    with contextlib.ExitStack() as stack:
        # One address opens Watch streams as fast as its limit lets it, and keeps them.
        holder = stack.enter_context(attacks.address_relay("127.0.0.1", edge.envoy.port, HOLDER))
        opening = time.monotonic()
        waves = [stack.enter_context(IdleStreams(holder.target, methods=(WATCH,), count=FIRST_WAVE))]
        for _ in range(WAVES - 1):  # IdleStreams waits a second after each wave: the bucket refills
            waves.append(stack.enter_context(IdleStreams(holder.target, methods=(WATCH,), count=WAVE)))
        held = sum(w.outcomes()[WATCH]["open"] for w in waves)
        stats = attacks.envoy_stats(edge.envoy, f"cluster.{watch_cluster}.upstream_rq_active",
                                    f"cluster.{watch_cluster}.upstream_rq_pending_overflow")
        print(f"holder opened {FIRST_WAVE + WAVE * (WAVES - 1)} Watch streams in {time.monotonic() - opening:.1f} s, holds {held} "
              f"({watch_cluster}, breaker {watch_breaker}); {stats}")
        assert held == watch_breaker, (held, watch_breaker)  # it holds the whole Watch breaker

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
    # Once the holder lets go, Watch serves the next caller again.
    deadline = time.monotonic() + 10
    with attacks.address_relay("127.0.0.1", edge.envoy.port, WATCHER) as watcher, \
            grpc.insecure_channel(watcher.target) as channel:
        while (watch := outcome(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                                           timeout=DEADLINE))) != "SERVING":
            assert watch == "UNAVAILABLE" and time.monotonic() < deadline, watch
            time.sleep(0.2)
