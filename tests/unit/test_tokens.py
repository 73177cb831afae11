import datetime as dt
import json

import pytest

from server.infra import tokens
from server.domain.errors import PermissionDenied, Unauthenticated
from tests.support import jwt_attacks

UTC = dt.timezone.utc


@pytest.fixture
def verifier(keys_dir):
    return tokens.TokenVerifier.from_file(keys_dir / "jwks.json", issuer="payments", audience="payments-api")


def test_issued_token_verifies_to_its_caller(issuer, verifier):
    caller = verifier.verify(issuer.issue(subject="usr_1", email="a@example.com", role="admin", session_id="ses_1"))
    assert (caller.subject, caller.email, caller.role, caller.is_admin) == ("usr_1", "a@example.com", "admin", True)


def test_token_has_the_promised_claims_and_kid(issuer, keys_dir):
    import jwt

    token = issuer.issue(subject="usr_1", email="a@example.com", role="customer", session_id="ses_1")
    header = jwt.get_unverified_header(token)
    body = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "ES256" and header["kid"] == json.loads((keys_dir / "jwks.json").read_text())["keys"][0]["kid"]
    assert header["typ"] == "at+jwt"  # RFC 9068
    assert {"iss", "aud", "sub", "client_id", "email", "role", "sid", "jti", "iat", "exp"} <= set(body)
    assert body["exp"] - body["iat"] == issuer.ttl_seconds


@pytest.mark.parametrize("name", ["expired", "not_yet_valid", "wrong_signature", "unknown_kid", "alg_none",
                                  "hs256_with_public_key", "wrong_iss", "tampered_payload", "garbage"])
def test_attacks_are_unauthenticated(keys_dir, verifier, name):
    token = jwt_attacks.attacks((keys_dir / "jwt-private.pem").read_bytes(), json.loads((keys_dir / "jwks.json").read_text()))[name]
    with pytest.raises(Unauthenticated):
        verifier.verify(token)


def test_wrong_audience_is_permission_denied_like_envoy(keys_dir, verifier):
    token = jwt_attacks.attacks((keys_dir / "jwt-private.pem").read_bytes(), json.loads((keys_dir / "jwks.json").read_text()))["wrong_aud"]
    with pytest.raises(PermissionDenied):
        verifier.verify(token)


def test_small_clock_skew_is_tolerated(keys_dir, verifier):
    import time

    pem = (keys_dir / "jwt-private.pem").read_bytes()
    now = int(time.time())
    assert verifier.verify(jwt_attacks.sign(pem, jwt_attacks.claims(nbf=now + 10, iat=now + 10)))
    assert verifier.verify(jwt_attacks.sign(pem, jwt_attacks.claims(exp=now - 10)))


def test_unknown_role_or_missing_email_is_refused(keys_dir, verifier):
    pem = (keys_dir / "jwt-private.pem").read_bytes()
    for bad in (jwt_attacks.claims(role="root"), jwt_attacks.claims(email=None), jwt_attacks.claims(sub=None)):
        with pytest.raises(Unauthenticated):
            verifier.verify(jwt_attacks.sign(pem, bad))


def test_rotation_keeps_old_tokens_valid(tmp_path):
    priv, jwks = tmp_path / "k.pem", tmp_path / "jwks.json"
    tokens.create_key_pair(priv, jwks)
    old = tokens.TokenIssuer(tokens.load_private_key(priv), issuer="i", audience="a", ttl_seconds=60)
    old_token = old.issue(subject="s", email="e@example.com", role="customer", session_id="ses_1")
    tokens.create_key_pair(tmp_path / "k2.pem", jwks)  # add the new key
    new = tokens.TokenIssuer(tokens.load_private_key(tmp_path / "k2.pem"), issuer="i", audience="a", ttl_seconds=60)
    verifier = tokens.TokenVerifier.from_file(jwks, issuer="i", audience="a")
    assert len(json.loads(jwks.read_text())["keys"]) == 2 and old.kid != new.kid
    assert verifier.verify(old_token).subject == "s"
    assert verifier.verify(new.issue(subject="t", email="e@example.com", role="customer", session_id="ses_1")).subject == "t"


def test_private_key_file_is_owner_only(tmp_path):
    tokens.create_key_pair(tmp_path / "k.pem", tmp_path / "jwks.json")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    assert "d" not in json.loads((tmp_path / "jwks.json").read_text())["keys"][0]  # no private part published


def test_empty_jwks_is_refused():
    with pytest.raises(ValueError):
        tokens.TokenVerifier({"keys": []}, issuer="i", audience="a")


@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
@pytest.mark.parametrize("value", ["as a numeric string", "as a boolean", "negative", "beyond 64 bits", "1e300"])
def test_times_must_be_json_numbers_as_envoy_insists(keys_dir, verifier, claim, value):
    import time

    pem = (keys_dir / "jwt-private.pem").read_bytes()
    now = int(time.time())
    good = {"exp": now + 600, "iat": now, "nbf": now}[claim]
    bad = {"as a numeric string": str(good), "as a boolean": True, "negative": -1, "beyond 64 bits": 2 ** 64,
           "1e300": 1e300}[value]
    with pytest.raises(Unauthenticated) as e:
        verifier.verify(jwt_attacks.sign(pem, jwt_attacks.claims(**{claim: bad})))
    assert e.value.reason in ("INVALID_TOKEN", "TOKEN_EXPIRED")
    assert verifier.verify(jwt_attacks.sign(pem, jwt_attacks.claims(**{claim: float(good)})))  # a number is fine


def test_a_token_without_an_audience_is_permission_denied_like_a_wrong_one(keys_dir, verifier):
    pem = (keys_dir / "jwt-private.pem").read_bytes()
    with pytest.raises(PermissionDenied) as e:
        verifier.verify(jwt_attacks.sign(pem, jwt_attacks.claims(aud=None)))
    assert e.value.reason == "WRONG_AUDIENCE"
    with pytest.raises(Unauthenticated):  # any other missing claim stays a 401
        verifier.verify(jwt_attacks.sign(pem, jwt_attacks.claims(exp=None)))
