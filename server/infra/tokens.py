"""JWTs: signing with the private key, verifying against the JWKS, and the dev key pair.

Tokens are ES256 with a `kid` header (the RFC 7638 thumbprint of the public key). The JWKS file
holds every key that may still verify (rotation: add the new key, roll Envoy and the server,
switch the signing key, remove the old key once its tokens have expired). Envoy's jwt_authn
reads the same JWKS file, so both layers accept exactly the same tokens.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Callable

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.domain.errors import PermissionDenied, Unauthenticated
from server.domain.caller import CLIENT, ROLES, Caller
from server.infra.verified_tokens import VerifiedTokens, signed_header

ALGORITHM = "ES256"
ACCESS_TOKEN_TYPE = "at+jwt"  # RFC 9068
CLIENT_ID = "payments-api-clients"  # RFC 9068 asks for one; every client of this API is a public client
LEEWAY_SECONDS = 30
CLIENT_TOKEN_SECONDS = 300  # a service client's access token (server/domain/clients.py TOKEN_SECONDS)
VERIFIED_CACHE_SIZE = 10_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(public_key: ec.EllipticCurvePublicKey) -> dict:
    numbers = public_key.public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }
    thumbprint = hashlib.sha256(json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()).digest()
    return {**jwk, "kid": _b64(thumbprint), "use": "sig", "alg": ALGORITHM}


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError(f"{path}: the signing key must be an EC P-256 private key")
    return key


def create_key_pair(private_key_file: Path, jwks_file: Path) -> str:
    """Write a new P-256 private key and add its public key to the JWKS; returns its kid.

    Keys already in the JWKS stay, so this is also the first step of a rotation.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    private_key_file.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private_key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    jwk = public_jwk(key.public_key())
    keys = json.loads(jwks_file.read_text())["keys"] if jwks_file.exists() else []
    keys = [k for k in keys if k.get("kid") != jwk["kid"]] + [jwk]
    jwks_file.parent.mkdir(parents=True, exist_ok=True)
    jwks_file.write_text(json.dumps({"keys": keys}, indent=2) + "\n")
    return jwk["kid"]


class TokenIssuer:
    def __init__(self, private_key: ec.EllipticCurvePrivateKey, *, issuer: str, audience: str, ttl_seconds: int,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)):
        self._key = private_key
        self.kid = public_jwk(private_key.public_key())["kid"]
        self.issuer, self.audience, self.ttl_seconds, self.clock = issuer, audience, ttl_seconds, clock

    @classmethod
    def from_settings(cls, settings) -> "TokenIssuer":
        """The issuer the settings describe (the server and the operator CLI both use this)."""
        return cls(load_private_key(settings.jwt_private_key_file), issuer=settings.jwt_issuer,
                   audience=settings.jwt_audience, ttl_seconds=settings.jwt_ttl_seconds)

    def issue(self, *, subject: str, email: str, role: str, session_id: str) -> str:
        """An access token (RFC 9068: typ at+jwt, a jti of its own, client_id) for a session."""
        now = int(self.clock().timestamp())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "client_id": CLIENT_ID,
            "email": email,
            "role": role,
            "sid": session_id,
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl_seconds,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.kid, "typ": ACCESS_TOKEN_TYPE})

    def issue_client(self, client_id: str, scope: str, ttl_seconds: int = CLIENT_TOKEN_SECONDS) -> str:
        """An access token for a service client (RFC 9068: `sub` and `client_id` the client, `scope`
        its permissions, space-separated), signed like a person's so Envoy checks it the same way.
        No `sid` and no `email`: the client itself is what revocation ends."""
        now = int(self.clock().timestamp())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": client_id,
            "client_id": client_id,
            "scope": scope,
            "role": CLIENT,
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "nbf": now,
            "exp": now + ttl_seconds,
        }
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.kid, "typ": ACCESS_TOKEN_TYPE})


def _is_time(value) -> bool:
    """A NumericDate (RFC 7519): a JSON number, not a string or a boolean, and one Envoy accepts
    (a positive 64-bit integer's range: 1e300 or 2**64 is refused there, so here too)."""
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value < 2 ** 63


class TokenVerifier:
    """Checks a bearer token fully: allow-listed algorithm, signature by kid, time, iss, aud, claims.

    Public keys are parsed once at start (not per call), which keeps verification cheap.
    """

    def __init__(self, jwks: dict, *, issuer: str, audience: str):
        self._keys = {}
        for k in jwks.get("keys", []):
            if k.get("kty") == "EC" and k.get("kid"):
                self._keys[k["kid"]] = jwt.PyJWK(k, algorithm=ALGORITHM).key
        if not self._keys:
            raise ValueError("the JWKS holds no EC signing keys")
        self.issuer, self.audience = issuer, audience
        self._verified: VerifiedTokens[Caller] = VerifiedTokens(VERIFIED_CACHE_SIZE, lambda: time.time())

    @classmethod
    def from_file(cls, path: Path, **kw) -> "TokenVerifier":
        return cls(json.loads(path.read_text()), **kw)

    def verify(self, token: str) -> Caller:
        """The caller a token names, or Unauthenticated/PermissionDenied.

        A token that verified once is remembered (by its exact text, signature included) until
        it expires: the signature check is most of the server's per-call cost, and a client
        sends the same token on every call for its whole lifetime. At most VERIFIED_CACHE_SIZE
        are remembered; a new one beyond that evicts the least recently used one, one at a time
        (a forgotten token costs one more verification, never a refusal).
        """
        hit = self._verified.get(token)
        if hit is not None:
            return hit
        caller, exp = self._verify(token)
        self._verified.put(token, caller, exp + LEEWAY_SECONDS)
        return caller

    def _verify(self, token: str) -> tuple[Caller, float]:
        def bad(why: str) -> Unauthenticated:
            return Unauthenticated(f"invalid token: {why}", reason="INVALID_TOKEN")

        header = signed_header(token, ALGORITHM, bad)
        # Explicit typing (RFC 8725 3.11): only an access token is one, whatever else this key signs.
        if str(header.get("typ", "")).lower() not in (ACCESS_TOKEN_TYPE, "application/" + ACCESS_TOKEN_TYPE):
            raise bad(f"typ must be {ACCESS_TOKEN_TYPE}")
        key = self._keys.get(header.get("kid"))
        if key is None:
            raise bad("unknown signing key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.ImmatureSignatureError:
            raise bad("not yet valid") from None
        except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as e:
            if isinstance(e, jwt.MissingRequiredClaimError) and e.claim != "aud":
                raise bad(f"no {e.claim} claim") from None
            # 403 like Envoy's jwt_authn, a token without an audience too, so a client gets one
            # answer from either layer.
            raise PermissionDenied("token is not for this API (wrong audience)", reason="WRONG_AUDIENCE") from None
        except jwt.InvalidIssuerError:
            raise bad("wrong issuer") from None
        except jwt.PyJWTError:
            raise bad("signature or claims do not verify") from None
        # Times are JSON numbers, as Envoy's jwt_authn insists (PyJWT also takes "1700000000").
        for name in ("exp", "iat", "nbf"):
            if name in claims and not _is_time(claims[name]):
                raise bad(f"{name} must be a number")
        role, email, sub, sid = claims.get("role"), claims.get("email"), claims.get("sub"), claims.get("sid")
        if role == CLIENT:
            return self._client(claims, bad), float(claims["exp"])
        if role not in ROLES or not isinstance(email, str) or not email or not isinstance(sub, str):
            raise bad("missing or unknown role, email or subject")
        if not isinstance(sid, str) or not sid:
            raise bad("no session")
        return Caller(subject=sub, email=email, role=role, session_id=sid), float(claims["exp"])

    @staticmethod
    def _client(claims: dict, bad) -> Caller:
        """A service client's token: `sub` and `client_id` the same client, a non-empty `scope`."""
        sub, client_id, scope = claims.get("sub"), claims.get("client_id"), claims.get("scope")
        if not isinstance(sub, str) or not sub or client_id != sub:
            raise bad("a client's token names its client in sub and client_id")
        if not isinstance(scope, str) or not scope.split():
            raise bad("a client's token carries a scope")
        return Caller(subject=sub, email="", role=CLIENT, permissions=frozenset(scope.split()),
                      issued_at=float(claims["iat"]))
