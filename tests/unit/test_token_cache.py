"""The verifier remembers tokens it has verified: that must never outlive the token's expiry
or let a different token (same claims, other signature) through."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

import jwt.api_jwt
import pytest

from server.infra import tokens
from server.domain.errors import Unauthenticated
from tests.conftest import ALICE

TTL = 60


@pytest.fixture
def pair(keys_dir):
    issuer = tokens.TokenIssuer(tokens.load_private_key(keys_dir / "jwt-private.pem"), issuer="payments",
                                audience="payments-api", ttl_seconds=TTL)
    verifier = tokens.TokenVerifier.from_file(keys_dir / "jwks.json", issuer="payments", audience="payments-api")
    return issuer, verifier


def later(monkeypatch, seconds: float) -> None:
    """Move both clocks (the cache's and PyJWT's) forward."""
    real_time = time.time
    monkeypatch.setattr(tokens.time, "time", lambda: real_time() + seconds)

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.now(tz) + dt.timedelta(seconds=seconds)

    monkeypatch.setattr(jwt.api_jwt, "datetime", Later)


def test_a_remembered_token_still_expires(pair, monkeypatch):
    issuer, verifier = pair
    token = issuer.issue(subject=ALICE.subject, email=ALICE.email, role=ALICE.role, session_id="ses_1")
    assert verifier.verify(token) == verifier.verify(token) == dataclasses.replace(ALICE, session_id="ses_1")
    later(monkeypatch, TTL + tokens.LEEWAY_SECONDS - 5)
    assert verifier.verify(token) == dataclasses.replace(ALICE, session_id="ses_1")  # within the leeway, as without the cache
    later(monkeypatch, TTL + tokens.LEEWAY_SECONDS + 5)
    with pytest.raises(Unauthenticated) as e:
        verifier.verify(token)
    assert e.value.reason == "TOKEN_EXPIRED"


def test_a_remembered_token_does_not_vouch_for_a_tampered_copy(pair):
    issuer, verifier = pair
    token = issuer.issue(subject=ALICE.subject, email=ALICE.email, role=ALICE.role, session_id="ses_1")
    assert verifier.verify(token) == dataclasses.replace(ALICE, session_id="ses_1")
    head, body, sig = token.split(".")
    forged = f"{head}.{body}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}"
    with pytest.raises(Unauthenticated):
        verifier.verify(forged)


def test_the_cache_evicts_the_least_recently_used_token_one_at_a_time(pair, monkeypatch):
    issuer, verifier = pair
    monkeypatch.setattr(verifier._verified, "size", 3)
    made = [issuer.issue(subject=ALICE.subject, email=ALICE.email, role=ALICE.role, session_id=f"ses_{i}")
            for i in range(5)]
    for token in made[:3]:
        verifier.verify(token)
    verifier.verify(made[0])  # used again: made[1] is now the least recently used
    verifier.verify(made[3])
    assert list(verifier._verified) == [made[2], made[0], made[3]]
    verified = []
    real = verifier._verify
    monkeypatch.setattr(verifier, "_verify", lambda t: verified.append(t) or real(t))
    for token in (made[0], made[2], made[3]):
        verifier.verify(token)
    assert verified == []
    verifier.verify(made[1])  # forgotten: verified again, not refused
    assert verified == [made[1]] and len(verifier._verified) == 3
