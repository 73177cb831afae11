"""Forged and broken tokens, shared by the server tests and the end-to-end tests through Envoy.

Each maker takes the issuer's private key file and JWKS and returns a token that must be refused.
"""

from __future__ import annotations

import base64
import json
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.infra.tokens import public_jwk

ISS, AUD = "payments", "payments-api"


def claims(**over):
    now = int(time.time())
    c = {"iss": ISS, "aud": AUD, "sub": "usr_alice", "email": "alice@example.com", "role": "customer",
         "sid": "ses_test_usr_alice", "jti": "attack", "iat": now, "nbf": now, "exp": now + 600}
    c.update(over)
    return {k: v for k, v in c.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(private_pem: bytes, payload: dict, kid: str | None = None) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    kid = kid or public_jwk(key.public_key())["kid"]
    # A well-formed access token in every way but the one each attack breaks.
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": kid, "typ": "at+jwt"})


def attacks(private_pem: bytes, public_jwks: dict) -> dict[str, str]:
    """name -> token. Every one must be rejected (wrong_aud with 403, the rest with 401)."""
    now = int(time.time())
    kid = public_jwks["keys"][0]["kid"]
    stranger = ec.generate_private_key(ec.SECP256R1())
    stranger_pem = stranger.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
    good = sign(private_pem, claims())
    h, p, s = good.split(".")
    tampered_payload = _b64(json.dumps(claims(role="admin")).encode())
    alg_none = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode()) + "." + _b64(json.dumps(claims(role="admin")).encode()) + "."
    pub_pem = serialization.load_pem_private_key(private_pem, None).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    hs_body = _b64(json.dumps(claims(role="admin")).encode())
    import hashlib
    import hmac
    hs_sig = _b64(hmac.new(pub_pem, f"{hs_header}.{hs_body}".encode(), hashlib.sha256).digest())
    return {
        "expired": sign(private_pem, claims(iat=now - 7200, nbf=now - 7200, exp=now - 3600)),
        "not_yet_valid": sign(private_pem, claims(nbf=now + 3600, iat=now, exp=now + 7200)),
        "wrong_signature": sign(stranger_pem, claims(), kid=kid),
        "unknown_kid": sign(stranger_pem, claims()),
        "alg_none": alg_none,
        "hs256_with_public_key": f"{hs_header}.{hs_body}.{hs_sig}",
        "wrong_iss": sign(private_pem, claims(iss="someone-else")),
        "wrong_aud": sign(private_pem, claims(aud="another-api")),
        "tampered_payload": f"{h}.{tampered_payload}.{s}",
        "garbage": "not-a-jwt",
    }
