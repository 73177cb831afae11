"""Native gRPC through Envoy's port (grpcurl, with reflection), and CORS for the Swagger UI."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.conftest import CORS_ORIGINS
from devstack.envoyconf import ROOT

GRPCURL = ROOT / ".tools" / "bin" / "grpcurl"


def grpcurl(stack, *args: str) -> subprocess.CompletedProcess:
    """grpcurl [flags...] ENVOY_ADDRESS (list | method): the last argument is the verb."""
    *flags, verb = args
    return subprocess.run([str(GRPCURL), "-plaintext", "-max-time", "20", *flags,
                           f"127.0.0.1:{stack.envoy.port}", verb], capture_output=True, text=True, timeout=60)


PROTOSET = ROOT / "gen" / "payments.pb"  # the descriptor set `make gen` writes (Envoy's transcoder reads it)


def test_reflection_at_the_edge_needs_a_token(stack, make_user):
    """Reflection streams are public on the server's own port, not at the public edge."""
    out = grpcurl(stack, "list")
    assert out.returncode != 0
    assert "Jwt is missing" in out.stderr
    user = make_user("reflect")
    out = grpcurl(stack, "-H", f"authorization: Bearer {user.token}", "list")
    assert out.returncode == 0, out.stderr
    services = set(out.stdout.split())
    assert {"payments.v1.PaymentService", "payments.v1.AuthService", "payments.v1.WebhookService", "grpc.health.v1.Health"} <= services
    # grpcio-reflection serves v1alpha (grpcurl falls back to it from v1, which is UNIMPLEMENTED).
    out = grpcurl(stack, "-H", f"authorization: Bearer {user.token}", "-d", '{"list_services": ""}',
                  "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert out.returncode == 0 and "payments.v1.PaymentService" in out.stdout, out.stderr


def test_grpc_health_without_a_token(stack, make_user):
    # The token only lets grpcurl ask reflection what Health looks like; the call itself has none.
    reflect = f"authorization: Bearer {make_user('health').token}"
    out = grpcurl(stack, "-reflect-header", reflect, "grpc.health.v1.Health/Check")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"status": "SERVING"}


def test_grpc_calls_with_a_bearer_token_work(stack, make_user):
    user = make_user("grpc")
    auth = f"authorization: Bearer {user.token}"
    created = grpcurl(stack, "-H", auth, "-d", json.dumps({"payment": {"email": user.email, "amount": "42"}}),
                      "payments.v1.PaymentService/CreatePayment")
    assert created.returncode == 0, created.stderr
    payment = json.loads(created.stdout)
    assert payment["status"] == "PENDING" and payment["amount"] == "42"
    listed = grpcurl(stack, "-H", auth, "payments.v1.PaymentService/ListPayments")
    assert listed.returncode == 0, listed.stderr
    assert [p["id"] for p in json.loads(listed.stdout)["payments"]] == [payment["id"]]
    # A server error keeps its gRPC status and details on the native path.
    missing = grpcurl(stack, "-H", auth, "-d", '{"id": "pay_aaaaaaaaaaaaaaaaaaaaaaaaaa"}',
                      "payments.v1.PaymentService/GetPayment")
    assert missing.returncode != 0
    assert "Code: NotFound" in missing.stdout + missing.stderr
    assert "PAYMENT_NOT_FOUND" in missing.stdout + missing.stderr


def test_grpc_call_without_a_token_is_unauthenticated_at_envoy(stack):
    out = grpcurl(stack, "-protoset", str(PROTOSET), "payments.v1.PaymentService/ListPayments")
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "Code: Unauthenticated" in text
    assert "Jwt is missing" in text  # Envoy's answer, as a plain gRPC status (not JSON)


def test_public_grpc_auth_calls_need_no_token(stack):
    # Without reflection at the edge, grpcurl reads the API from the descriptor set `make gen` writes.
    out = grpcurl(stack, "-protoset", str(PROTOSET), "-d", '{"email": "nobody@example.com", "password": "wrong password!"}',
                  "payments.v1.AuthService/Login")
    assert "Code: Unauthenticated" in out.stdout + out.stderr
    assert "wrong email or password" in out.stdout + out.stderr  # the server answered, not Envoy


# --- CORS -------------------------------------------------------------------------------------

PREFLIGHT = {"Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.mark.parametrize("origin", CORS_ORIGINS)
def test_preflight_from_a_swagger_ui_origin_is_allowed(api, origin):
    r = api.request("OPTIONS", "/v1/payments", headers={"Origin": origin, **PREFLIGHT})
    assert r.status == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert "authorization" in r.headers["access-control-allow-headers"]
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in r.headers


# Loopback origins too: a deployment allows exactly its configured origins (make run and compose
# configure their own loopback Swagger UI).
@pytest.mark.parametrize("origin", ["https://evil.example", "http://127.0.0.1.evil.example:8081", "null",
                                    "https://docs.payments.example.evil.example", "http://docs.payments.example",
                                    "http://127.0.0.1:8081", "http://localhost:3000"])
@pytest.mark.parametrize("forged_marker", [False, True])
def test_preflight_from_another_origin_gets_no_allow_headers(api, origin, forged_marker):
    # A client cannot claim to be a configured origin by sending the internal marker itself.
    marker = {"X-Payments-Cors-Origin": "configured"} if forged_marker else {}
    r = api.request("OPTIONS", "/v1/payments", headers={"Origin": origin, **PREFLIGHT, **marker})
    assert not any(k.startswith("access-control-allow") for k in r.headers), r.headers
    assert r.status == 401
    r.error()


def test_cors_headers_on_an_actual_request(api, make_user):
    user = make_user()
    configured = api.get("/v1/payments", token=user.token, headers={"Origin": CORS_ORIGINS[0]})
    assert configured.headers["access-control-allow-origin"] == CORS_ORIGINS[0]
    denied = api.get("/v1/payments", token=user.token, headers={"Origin": "https://evil.example"})
    assert denied.status == 200 and "access-control-allow-origin" not in denied.headers


def test_curl_preflight(stack):
    out = subprocess.run(["curl", "-sS", "-i", "-X", "OPTIONS", f"{stack.url}/v1/auth/login",
                          "-H", f"Origin: {CORS_ORIGINS[0]}", "-H", "Access-Control-Request-Method: POST"],
                         capture_output=True, text=True, timeout=30, check=True).stdout.lower()
    assert out.startswith("http/1.1 200")
    assert f"access-control-allow-origin: {CORS_ORIGINS[0]}" in out


def test_the_edges_own_refusals_carry_cors_headers_for_a_configured_origin(api, keys_dir):
    """Envoy's Lua filter answers some requests itself, before the CORS filter sees them (a bucket
    of bad signatures spent, a header gRPC cannot carry): a Swagger UI user still reads the
    error and its Retry-After, not "Failed to fetch"."""
    from tests.faults.test_forged_tokens import budget, forged
    from tests.support.rest import loopback_address

    limit, _ = budget()
    client, origin = api.from_address(loopback_address()), {"Origin": CORS_ORIGINS[0]}
    for _ in range(limit):
        client.get("/v1/payments", token=forged(keys_dir), headers=origin)
    refused = client.get("/v1/payments", token=forged(keys_dir), headers=origin)
    assert refused.status == 429, refused.text
    assert refused.headers["access-control-allow-origin"] == CORS_ORIGINS[0]
    assert "retry-after" in refused.headers["access-control-expose-headers"]
    bad_name = api.get("/v1/payments", headers={**origin, "x#y": "1"})
    assert bad_name.status == 400 and bad_name.headers["access-control-allow-origin"] == CORS_ORIGINS[0]
    elsewhere = client.get("/v1/payments", token=forged(keys_dir), headers={"Origin": "https://evil.example"})
    assert elsewhere.status == 429 and "access-control-allow-origin" not in elsewhere.headers
