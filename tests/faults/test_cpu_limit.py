"""A login flood on a server held to the API pod's CPU limit (k8s/base: 500m for the server
container), as a cgroup CPU quota on the server process: the kubelet's probes and payment calls are
still answered in time.

Each login is an argon2 hash, the most expensive thing a client can ask for without an account. The
server hashes on a lane of its own (PAYMENTS_AUTH_THREADS threads; server/edge/capacity.py) and
sheds logins beyond its queue at once with RESOURCE_EXHAUSTED; health checks have two threads of
their own and payment calls theirs, so under the quota the hashing takes its share of the CPU and
no more than that. Here 64 clients, each login from an address nobody has used (so Envoy's
per-address buckets do not stop them), send logins as fast as they are answered, for 8 s, while
a probe opens a new connection every half second and asks grpc.health.v1 with the kubelet's
default timeout (1 s), and a client reads a payment through Envoy every 100 ms."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.cpu_quota import cpu_quota, pod_cpu_limit, throttled
from tests.support.loops import paced_reads, run_for
from tests.support.rest import Client, loopback_address
from tests.support.stack import Envoy, Server, prepare_workdir, server_env

FLOODERS = 64
FLOOD_SECONDS = 8
PASSWORD = "correct horse battery"


@pytest.fixture
def quota():
    """A cgroup with the server container's CPU quota; its cpu.stat afterwards tells whether it throttled."""
    with cpu_quota(pod_cpu_limit("server")) as group:
        yield group


def test_probes_and_payments_are_answered_under_a_login_flood_at_the_pods_cpu_limit(tmp_path, keys_dir, quota):
    prepare_workdir(tmp_path, keys_dir)
    # The shell joins the cgroup, then becomes the server: every thread it starts is under the quota.
    server = Server.start(tmp_path, server_env(tmp_path),
                          argv=["sh", "-c", f"echo $$ > {quota}/cgroup.procs && exec {sys.executable} -m server"])
    try:
        envoy = Envoy.start(tmp_path, server.port)
        try:
            run_flood(server, Client(envoy.url), quota)
        finally:
            envoy.stop()
    finally:
        server.stop()


def run_flood(server: Server, api: Client, quota: Path) -> None:
    assert str(server.proc.pid) in (quota / "cgroup.procs").read_text()
    me = api.from_address(loopback_address())
    assert me.post("/v1/auth/register", {"email": "buyer@example.com", "password": PASSWORD}).status == 200
    token = me.post("/v1/auth/login", {"email": "buyer@example.com", "password": PASSWORD}).json["access_token"]
    payment = me.post("/v1/payments", {"email": "buyer@example.com", "amount": "1250"}, token=token).json["id"]
    throttled_before = throttled(quota)

    logins: list[int] = []
    probes: list[float | None] = []
    reads: list[tuple[int, float]] = []

    def flood(stop):
        n = 0
        while not stop.is_set():
            client = api.from_address(loopback_address())
            logins.append(client.post("/v1/auth/login", {"email": f"flood{n}-{id(client)}@example.com",
                                                         "password": "not the password"}).status)
            n += 1

    def probe(stop):
        while not stop.is_set():
            started = time.monotonic()
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # a new connection, as the kubelet's
                try:
                    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    probes.append(time.monotonic() - started if answer.status == health_pb2.HealthCheckResponse.SERVING else None)
                except grpc.RpcError:
                    probes.append(None)
            time.sleep(0.5)

    run_for(FLOOD_SECONDS, [flood] * FLOODERS + [probe, paced_reads(me, f"/v1/payments/{payment}", token, reads)])

    hashed, shed = logins.count(401), logins.count(429)
    answered = [p for p in probes if p is not None]
    latencies = sorted(seconds for _, seconds in reads)
    print(f"\nlogins in {FLOOD_SECONDS} s: {hashed} hashed, {shed} shed; probes: {len(answered)} of {len(probes)} "
          f"answered, the slowest {max(answered, default=0):.2f} s; reads: p99 "
          f"{statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else 0:.2f} s; "
          f"quota bit in {throttled(quota) - throttled_before} periods")
    assert set(logins) <= {401, 429}, set(logins)
    assert hashed > 0 and shed > 10 * hashed, (hashed, shed)  # the flood was real, and mostly shed
    assert throttled(quota) > throttled_before, "the quota never bit: the test did not reproduce the limit"
    assert len(probes) >= FLOOD_SECONDS and len(answered) == len(probes), probes  # every probe in under 1 s
    assert max(answered) < 0.5, probes
    assert {status for status, _ in reads} == {200}, reads
    assert statistics.quantiles(latencies, n=100)[98] < 0.5, latencies[-5:]

