"""Google-signed ID tokens of service accounts (a Shopping service on Cloud Run or GKE), the second
kind of bearer token the server accepts.

Any Google principal can mint an ID token with any audience, so a valid signature proves only that
Google issued it. What makes one a caller here is configured per deployment
(PAYMENTS_GOOGLE_AUDIENCE, PAYMENTS_GOOGLE_SERVICE_ACCOUNTS): the audience must be this
deployment's, and the token's `sub`, the service account's unique id, must be one of those pinned,
each mapped to a service client whose permissions it gets. `sub` and not `email`: an email is a
name that can be deleted and created again by someone else; the unique id is never reused.

Google's keys (RS256, a JWKS at PAYMENTS_GOOGLE_JWKS_URL) rotate every few days: they are fetched
when first needed, kept for the max-age Google's answer gives (an hour if none), and fetched again
early when a token names a key we do not hold, at most once every ten seconds, so tokens with made-up key ids
cannot make the server hammer Google.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import urllib.request
from typing import Callable, Mapping

import jwt

from server.domain.caller import CLIENT, Caller
from server.domain.errors import PermissionDenied, Unauthenticated, Unavailable
from server.infra.verified_tokens import VerifiedTokens, signed_header

ALGORITHM = "RS256"
ISSUER = "https://accounts.google.com"
JWKS_URL = "https://www.googleapis.com/oauth2/v3/certs"
LEEWAY_SECONDS = 30
REFETCH_SECONDS = 10.0  # the least time between two fetches of the keys
DEFAULT_MAX_AGE = 3600.0
FETCH_TIMEOUT = 5.0
VERIFIED_CACHE_SIZE = 10_000


@dataclasses.dataclass(frozen=True)
class GoogleIdentity:
    """A verified service account: its pinned `sub`, the service client it acts as, its email
    (for logs; empty when the token had none) and when the token expires."""

    subject: str
    client_id: str
    email: str
    expires_at: float


def issuer_of(token: str) -> str:
    """The `iss` a token claims, unverified: only to choose which verifier checks it."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return ""
    iss = claims.get("iss")
    return iss if isinstance(iss, str) else ""


class GoogleKeys:
    """Google's public keys by kid, fetched from `url` (see the module's docstring for when)."""

    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic, timeout: float = FETCH_TIMEOUT):
        self.url, self.clock, self.timeout = url, clock, timeout
        self._keys: dict[str, object] = {}
        self._fresh_until = 0.0
        self._fetched_at = -REFETCH_SECONDS
        self._lock = threading.Lock()
        self.fetches = 0

    def key(self, kid: str):
        """The key with this id, or None if Google does not (or no longer) publish it."""
        now = self.clock()
        if kid in self._keys and now < self._fresh_until:
            return self._keys[kid]
        with self._lock:
            now = self.clock()
            stale = now >= self._fresh_until
            if (stale or kid not in self._keys) and now - self._fetched_at >= REFETCH_SECONDS:
                self._fetch(now)
            elif stale and not self._keys:
                raise Unavailable("Google's signing keys could not be fetched; try again shortly",
                                  reason="GOOGLE_KEYS_UNAVAILABLE")
        return self._keys.get(kid)

    def _fetch(self, now: float) -> None:
        self._fetched_at = now
        self.fetches += 1
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout) as answer:
                document = json.loads(answer.read())
                max_age = re.search(r"max-age=(\d+)", answer.headers.get("Cache-Control", ""))
        except (OSError, ValueError):
            if not self._keys:
                raise Unavailable("Google's signing keys could not be fetched; try again shortly",
                                  reason="GOOGLE_KEYS_UNAVAILABLE") from None
            return  # keep the keys we have until the next try
        keys = {}
        for jwk in document.get("keys", []) if isinstance(document, dict) else []:
            if isinstance(jwk, dict) and jwk.get("kty") == "RSA" and jwk.get("kid"):
                try:
                    keys[jwk["kid"]] = jwt.PyJWK(jwk, algorithm=ALGORITHM).key
                except jwt.PyJWTError:
                    continue
        if keys:
            self._keys = keys
            self._fresh_until = now + (float(max_age.group(1)) if max_age else DEFAULT_MAX_AGE)


class GoogleTokenVerifier:
    """Checks a Google ID token: RS256 by one of Google's keys, `iss`, `aud` this deployment's,
    `exp` and `iat` (30 s leeway, like the server's own tokens), and `sub` one of `accounts`
    (sub -> client id). A wrong audience or a service account not pinned is PERMISSION_DENIED (a
    genuine Google identity, not one of ours); everything else UNAUTHENTICATED."""

    def __init__(self, keys: GoogleKeys, *, audience: str, accounts: Mapping[str, str], issuer: str = ISSUER,
                 wall_clock: Callable[[], float] = time.time):
        if not audience or not accounts:
            raise ValueError("a Google token verifier needs an audience and at least one service account")
        self.keys, self.audience, self.accounts, self.issuer = keys, audience, dict(accounts), issuer
        self.wall_clock = wall_clock
        # A caller sends the same ID token for up to an hour, and the RS256 check is most of
        # what a call costs (bench/google_tokens.py).
        self._verified: VerifiedTokens[GoogleIdentity] = VerifiedTokens(VERIFIED_CACHE_SIZE, lambda: self.wall_clock())

    def verify(self, token: str) -> GoogleIdentity:
        """As _verify, remembered by the token's exact text until it expires (with the leeway),
        at most VERIFIED_CACHE_SIZE at a time, as the server's own TokenVerifier does."""
        hit = self.remembered(token)
        if hit is not None:
            return hit
        identity = self._verify(token)
        self._verified.put(token, identity, identity.expires_at + LEEWAY_SECONDS)
        return identity

    def remembered(self, token: str) -> GoogleIdentity | None:
        """The identity of a token verified before and not yet expired, else None."""
        return self._verified.get(token)

    def _verify(self, token: str) -> GoogleIdentity:
        def bad(why: str) -> Unauthenticated:
            return Unauthenticated(f"invalid Google ID token: {why}", reason="INVALID_TOKEN")

        kid = signed_header(token, ALGORITHM, bad).get("kid")
        key = self.keys.key(kid) if isinstance(kid, str) and kid else None
        if key is None:
            raise bad("not signed by a key Google publishes")
        try:
            claims = jwt.decode(token, key, algorithms=[ALGORITHM], audience=self.audience, issuer=self.issuer,
                                leeway=LEEWAY_SECONDS, options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidAudienceError:
            raise PermissionDenied("token is not for this API (wrong audience)", reason="WRONG_AUDIENCE") from None
        except jwt.InvalidIssuerError:
            raise bad("wrong issuer") from None
        except jwt.PyJWTError:
            raise bad("signature or claims do not verify") from None
        for name in ("exp", "iat"):
            if type(claims[name]) not in (int, float) or not 0 <= claims[name] < 2 ** 63:
                raise bad(f"{name} must be a number")
        sub, email = claims["sub"], claims.get("email", "")
        client_id = self.accounts.get(sub) if isinstance(sub, str) else None
        if client_id is None:
            raise PermissionDenied("this Google service account may not call this API",
                                   reason="SERVICE_ACCOUNT_NOT_ALLOWED")
        if "email" in claims and (not isinstance(email, str) or claims.get("email_verified") is not True):
            raise bad("an email claim must be verified")
        return GoogleIdentity(subject=sub, client_id=client_id, email=email if isinstance(email, str) else "",
                              expires_at=float(claims["exp"]))


class EitherIssuer:
    """The server's own tokens, and Google's when the deployment configured them: a token ours
    refuses that claims Google's issuer (unverified, only to choose) goes to Google's verifier,
    which verifies everything. A Google token's caller is its pinned service client with no scope of its own,
    so the client check (server/domain/clients.py ClientCheck) gives it all the client holds and
    refuses it as soon as the client is revoked or expired."""

    def __init__(self, own, google: GoogleTokenVerifier | None):
        self.own, self.google = own, google

    @classmethod
    def from_settings(cls, own, settings) -> "EitherIssuer":
        if not settings.google_audience:
            return cls(own, None)
        keys = GoogleKeys(settings.google_jwks_url)
        return cls(own, GoogleTokenVerifier(keys, audience=settings.google_audience,
                                            accounts=dict(settings.google_service_accounts),
                                            issuer=settings.google_issuer))

    def verify(self, token: str) -> Caller:
        """A Google token verified before from memory; then our own verifier (its cache answers our
        tokens at once); a token it refuses that claims Google's issuer is Google's verifier's to
        judge, and gets that verifier's answer."""
        identity = self.google.remembered(token) if self.google is not None else None
        if identity is None:
            try:
                return self.own.verify(token)
            except (Unauthenticated, PermissionDenied):
                if self.google is None or issuer_of(token) != self.google.issuer:
                    raise
            identity = self.google.verify(token)
        return Caller(subject=identity.client_id, email="", role=CLIENT)
