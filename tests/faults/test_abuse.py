"""Many bad logins do not slow the service for others.

Envoy rate-limits the auth routes with a token bucket of their own (envoy.yaml, local_ratelimit
on the AuthService route, which REST and native gRPC logins both end on): a flood of logins gets
429 in the documented JSON shape before the server spends a password hash on it, while payment
calls, which have no such limit, keep working. Asserted as properties, not timings.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
import yaml

from server.pb import payments_pb2 as pb
from server.pb import payments_pb2_grpc as pb_grpc
from tests.conftest import ALICE
from tests.e2e.envoyconf import CONFIG

RESOURCE_EXHAUSTED = 8


def auth_bucket() -> dict:
    """The token bucket envoy.yaml gives the AuthService route."""
    config = yaml.safe_load(CONFIG.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    for host in hcm["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            if route["match"].get("prefix") == "/payments.v1.AuthService/":
                return route["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]["token_bucket"]
    raise AssertionError("envoy.yaml has no rate limit on the AuthService route")


def test_a_login_flood_is_limited_and_payments_keep_working(edge, token_for):
    burst = int(auth_bucket()["max_tokens"])
    flood = 4 * burst
    api = edge.api
    token = token_for(ALICE)
    created = api.post("/v1/payments", {"email": ALICE.email, "amount": "1250"}, token=token)
    assert created.status == 200, created.text

    def bad_login(n: int):
        return api.post("/v1/auth/login", {"email": f"nobody{n}@example.com", "password": "not the password"})

    # Twice the burst in flight at once: more than the bucket holds, however fast the server
    # hashes passwords, so some must be limited.
    with concurrent.futures.ThreadPoolExecutor(2 * burst) as pool:
        answers = list(pool.map(bad_login, range(flood)))

    # Another client, right after the flood: payment calls are not limited.
    got = api.get(f"/v1/payments/{created.json['id']}", token=token)
    assert got.status == 200, got.text
    with grpc.insecure_channel(f"127.0.0.1:{edge.envoy.port}") as channel:
        listed = pb_grpc.PaymentServiceStub(channel).ListPayments(
            pb.ListPaymentsRequest(page_size=5), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
    assert listed.payments

    statuses = [a.status for a in answers]
    assert set(statuses) <= {401, 429}, statuses
    limited = [a for a in answers if a.status == 429]
    assert limited, "no login was limited"
    assert statuses.count(401) < flood, statuses
    for answer in limited[:5]:
        code, reason, body = answer.error()
        assert (code, reason) == (RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert "too many" in body["message"]

    # The limit is a rate, not a ban: logins are answered again once the bucket refills.
    deadline = time.monotonic() + 30
    while (r := bad_login(flood)).status == 429:
        assert time.monotonic() < deadline, "logins still limited 30 s after the flood"
        time.sleep(0.2)
    assert r.status == 401


def test_native_grpc_logins_share_the_limit(edge):
    """Both protocols end on the same route, so switching protocol does not double the rate."""
    burst = int(auth_bucket()["max_tokens"])
    with grpc.insecure_channel(f"127.0.0.1:{edge.envoy.port}") as channel:
        login = pb_grpc.AuthServiceStub(channel).Login
        request = pb.LoginRequest(email="nobody@example.com", password="not the password")
        futures = [login.future(request, timeout=60) for _ in range(3 * burst)]  # all in flight at once
        codes = []
        for f in futures:
            with pytest.raises(grpc.RpcError) as e:
                f.result()
            codes.append(e.value.code())
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
