"""Forged and broken tokens: rejected by Envoy (REST, 401/403 JSON) and, independently, by the
server itself when a client goes straight to its gRPC port."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.infra import tokens
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc

ISSUER, AUDIENCE = "payments", "payments-api"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


class Forge:
    """Tokens like the server's, each with one thing wrong."""

    def __init__(self, keys_dir):
        self.key = tokens.load_private_key(keys_dir / "jwt-private.pem")
        self.kid = tokens.public_jwk(self.key.public_key())["kid"]
        self.public_pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def claims(self, **override) -> dict:
        now = int(time.time())
        # ALICE's identity and live session (seeded by the test stack): a forgery changes one thing.
        claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "usr_alice", "email": "alice@example.com",
                  "role": "customer", "sid": "ses_test_usr_alice", "jti": "forged", "iat": now, "nbf": now,
                  "exp": now + 600}
        claims.update(override)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: dict, key=None, kid: str | None = None) -> str:
        return jwt.encode(claims, key or self.key, algorithm="ES256", headers={"kid": kid or self.kid, "typ": "at+jwt"})

    def valid(self) -> str:
        return self.sign(self.claims())

    def attacks(self) -> dict[str, str]:
        now = int(time.time())
        stranger = ec.generate_private_key(ec.SECP256R1())
        valid = self.valid()
        head, payload, sig = valid.split(".")
        tampered = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        tampered["email"] = "victim@example.com"
        hs_head = segment({"alg": "HS256", "typ": "JWT", "kid": self.kid})
        hs_body = segment(self.claims())
        hs_sig = b64(hmac.new(self.public_pem, f"{hs_head}.{hs_body}".encode(), hashlib.sha256).digest())
        return {
            "expired": self.sign(self.claims(iat=now - 7200, nbf=now - 7200, exp=now - 3600)),
            "not_yet_valid": self.sign(self.claims(iat=now, nbf=now + 3600, exp=now + 7200)),
            "wrong_signature": self.sign(self.claims(), key=stranger),  # our kid, another key
            "unknown_kid": self.sign(self.claims(), key=stranger,
                                     kid=tokens.public_jwk(stranger.public_key())["kid"]),
            "alg_none": f"{segment({'alg': 'none', 'typ': 'JWT', 'kid': self.kid})}.{segment(self.claims())}.",
            "hs256_with_public_key": f"{hs_head}.{hs_body}.{hs_sig}",
            "wrong_issuer": self.sign(self.claims(iss="someone-else")),
            "tampered_payload": f"{head}.{segment(tampered)}.{sig}",
            "garbage": "not-a-jwt",
            # Times as numeric strings: PyJWT alone would take them, Envoy does not.
            "exp_as_string": self.sign(self.claims(exp=str(now + 600))),
            "iat_as_string": self.sign(self.claims(iat=str(now))),
            "nbf_as_string": self.sign(self.claims(nbf=str(now))),
            "negative_exp": self.sign(self.claims(exp=-1)),
        }


ATTACKS = ["expired", "not_yet_valid", "wrong_signature", "unknown_kid", "alg_none",
           "hs256_with_public_key", "wrong_issuer", "tampered_payload", "garbage",
           "exp_as_string", "iat_as_string", "nbf_as_string", "negative_exp"]


@pytest.fixture(scope="module")
def forge(keys_dir) -> Forge:
    return Forge(keys_dir)


@pytest.fixture(scope="module")
def attacks(forge) -> dict[str, str]:
    return forge.attacks()


# --- at Envoy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("attack", ATTACKS)
def test_envoy_rejects_bad_tokens_with_401_json(api, attacks, attack):
    for method, path in (("GET", "/v1/payments"), ("POST", "/v1/payments/pay_aaaaaaaaaaaaaaaaaaaaaaaaaa:confirm")):
        r = api.request(method, path, token=attacks[attack], body={} if method == "POST" else None)
        assert r.status == 401, (attack, r.status, r.text)
        assert r.error()[:2] == (16, "INVALID_TOKEN")


def test_envoy_rejects_a_missing_token_with_401_json(api):
    r = api.get("/v1/payments")
    assert r.status == 401
    assert r.error()[:2] == (16, "MISSING_TOKEN")


@pytest.mark.parametrize("aud", ["another-api", None], ids=["wrong", "missing"])
def test_envoy_rejects_a_wrong_or_missing_audience_with_403_json(api, forge, aud):
    r = api.get("/v1/payments", token=forge.sign(forge.claims(aud=aud)))
    assert r.status == 403
    assert r.error()[:2] == (7, "WRONG_AUDIENCE")


def test_envoy_accepts_the_token_only_from_the_authorization_header(api, forge, stack):
    token = forge.valid()
    assert api.get("/v1/payments", token=token).status == 200  # the forge makes good tokens too
    r = api.get(f"/v1/payments?access_token={token}")
    assert r.status == 401
    assert r.error()[:2] == (16, "MISSING_TOKEN")
    other_header = api.get("/v1/payments", headers={"X-Access-Token": token, "Cookie": f"access_token={token}"})
    assert other_header.status == 401


def test_access_log_is_json_and_never_holds_a_token(api, forge, stack):
    token = forge.valid()
    agent = f"e2e-{uuid.uuid4().hex}"
    api.get(f"/v1/payments?access_token={token}", headers={"User-Agent": agent})
    api.get("/v1/payments", token=token, headers={"User-Agent": agent})
    ours = []
    deadline = time.monotonic() + 15
    while len(ours) < 2 and time.monotonic() < deadline:  # Envoy flushes its log on a timer
        time.sleep(0.1)
        ours = [json.loads(line) for line in stack.envoy.access_log.read_text().splitlines() if agent in line]
    assert sorted((e["path"], e["status"], e["method"]) for e in ours) == [
        ("/v1/payments", 200, "GET"), ("/v1/payments", 401, "GET")]
    [served] = [e for e in ours if e["status"] == 200]
    assert str(served["upstream_ms"]).isdigit() and str(served["duration_ms"]).isdigit(), served  # no empty timings
    text = stack.envoy.access_log.read_text()
    assert token not in text and token.split(".")[2] not in text


# --- at the server directly (no Envoy in front) -----------------------------------------------

def direct_call(channel, token: str | None):
    stub = pb_grpc.PaymentServiceStub(channel)
    md = () if token is None else (("authorization", f"Bearer {token}"),)
    with pytest.raises(grpc.RpcError) as err:
        stub.ListPayments(pb.ListPaymentsRequest(), metadata=md, timeout=10)
    return err.value.code()


@pytest.mark.parametrize("attack", ATTACKS)
def test_server_rejects_bad_tokens_on_its_own_port(direct_channel, attacks, attack):
    assert direct_call(direct_channel, attacks[attack]) == grpc.StatusCode.UNAUTHENTICATED


def test_server_rejects_missing_token_and_wrong_audience_like_envoy(direct_channel, forge):
    assert direct_call(direct_channel, None) == grpc.StatusCode.UNAUTHENTICATED
    wrong_aud = forge.sign(forge.claims(aud="another-api"))
    assert direct_call(direct_channel, wrong_aud) == grpc.StatusCode.PERMISSION_DENIED
    no_aud = forge.sign(forge.claims(aud=None))  # 403 at Envoy too: one answer from either layer
    assert direct_call(direct_channel, no_aud) == grpc.StatusCode.PERMISSION_DENIED
    ok = pb_grpc.PaymentServiceStub(direct_channel).ListPayments(
        pb.ListPaymentsRequest(), metadata=(("authorization", f"Bearer {forge.valid()}"),), timeout=10)
    assert isinstance(ok, pb.ListPaymentsResponse)


def _envoy_stat(stack, name: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://{stack.envoy.admin}/stats?filter=^{name}$&format=json", timeout=5) as r:
        stats = json.load(r)["stats"]
    return int(stats[0]["value"]) if stats else 0


def test_envoy_verifies_a_signature_once_and_still_rejects_a_forgery_of_a_cached_token(api, forge, stack):
    hits = "http.payments_api.jwt_authn.jwt_cache_hit"
    token = forge.valid()
    before = _envoy_stat(stack, hits)
    assert api.get("/v1/payments", token=token).status == 200
    assert api.get("/v1/payments", token=token).status == 200
    assert _envoy_stat(stack, hits) >= before + 1  # the second request did not verify again
    # The cache is keyed by the whole token: the same claims under another signature are verified.
    head, payload, _ = token.split(".")
    other = forge.sign(forge.claims(), key=ec.generate_private_key(ec.SECP256R1())).split(".")[2]
    r = api.get("/v1/payments", token=f"{head}.{payload}.{other}")
    assert r.status == 401 and r.error()[:2] == (16, "INVALID_TOKEN")
