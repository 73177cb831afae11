"""Google service-account ID tokens (server/infra/google_tokens.py) against a local stand-in for
Google's keys and claim shapes (devstack/google_standin.py): only a pinned `sub` with this
deployment's audience, signed by a key Google publishes, is a caller; the keys are fetched once,
kept for the max-age Google gives, fetched again early for a new key id, at most once every ten seconds."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server.domain.errors import PermissionDenied, Unauthenticated, Unavailable
from server.infra import google_tokens
from server.infra.google_tokens import GoogleKeys, GoogleTokenVerifier
from devstack.google_standin import GoogleStandIn, ServiceAccount

AUDIENCE = "https://payments.example.com"


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def google():
    standin = GoogleStandIn(max_age=600)
    yield standin
    standin.stop()


@pytest.fixture
def shop():
    return ServiceAccount("shopping")


@pytest.fixture
def setup(google, shop):
    clock = Clock()
    keys = GoogleKeys(google.certs_url, clock=clock)
    return GoogleTokenVerifier(keys, audience=AUDIENCE, accounts={shop.sub: "cli_shop"}), keys, clock


def refused(verifier, token, error, reason):
    with pytest.raises(error) as caught:
        verifier.verify(token)
    assert caught.value.reason == reason, caught.value.message
    return caught.value


def test_a_pinned_service_account_with_our_audience_is_its_client(setup, google, shop):
    verifier, _, _ = setup
    identity = verifier.verify(google.mint(shop, AUDIENCE))
    assert (identity.subject, identity.client_id, identity.email) == (shop.sub, "cli_shop", shop.email)
    assert identity.expires_at > time.time() + 3000
    bare = google.mint(shop, AUDIENCE, email=None, email_verified=None)  # the metadata server without format=full
    assert verifier.verify(bare).client_id == "cli_shop"


def test_any_other_google_principal_is_refused_even_with_our_audience(setup, google, shop):
    verifier, _, _ = setup
    stranger = ServiceAccount("attacker", project="elsewhere")
    refused(verifier, google.mint(stranger, AUDIENCE), PermissionDenied, "SERVICE_ACCOUNT_NOT_ALLOWED")
    # The same email with another unique id (the account deleted and made again by someone else).
    refused(verifier, google.mint(shop, AUDIENCE, sub="999", azp="999"), PermissionDenied, "SERVICE_ACCOUNT_NOT_ALLOWED")


def test_a_token_for_another_audience_is_wrong_audience(setup, google, shop):
    verifier, _, _ = setup
    refused(verifier, google.mint(shop, "https://other.example.com"), PermissionDenied, "WRONG_AUDIENCE")
    refused(verifier, google.mint(shop, [AUDIENCE + "x"]), PermissionDenied, "WRONG_AUDIENCE")


@pytest.mark.parametrize("change, reason", [
    ({"iss": "accounts.google.com"}, "INVALID_TOKEN"),  # only the configured issuer
    ({"iss": "https://evil.example.com"}, "INVALID_TOKEN"),
    ({"email_verified": False}, "INVALID_TOKEN"),
    ({"email_verified": "true"}, "INVALID_TOKEN"),
    ({"iat": "1700000000"}, "INVALID_TOKEN"),
    ({"sub": None}, "INVALID_TOKEN"),
    ({"exp": None}, "INVALID_TOKEN"),
    ({"iat": None}, "INVALID_TOKEN"),
])
def test_claims_out_of_google_shape_are_invalid(setup, google, shop, change, reason):
    verifier, _, _ = setup
    refused(verifier, google.mint(shop, AUDIENCE, **change), Unauthenticated, reason)


def test_expiry_has_the_same_thirty_seconds_of_leeway_as_our_own_tokens(setup, google, shop):
    verifier, _, _ = setup
    assert verifier.verify(google.mint(shop, AUDIENCE, issued=time.time() - 3600 - 20)).client_id == "cli_shop"
    refused(verifier, google.mint(shop, AUDIENCE, issued=time.time() - 3600 - 40), Unauthenticated, "TOKEN_EXPIRED")


def test_only_googles_published_keys_sign(setup, google, shop):
    verifier, _, _ = setup
    forged = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused(verifier, google.mint(shop, AUDIENCE, key=forged), Unauthenticated, "INVALID_TOKEN")  # its kid, not its key
    refused(verifier, google.mint(shop, AUDIENCE, key=forged, kid="made-up"), Unauthenticated, "INVALID_TOKEN")
    import jwt

    hs = jwt.encode({"iss": google_tokens.ISSUER, "aud": AUDIENCE, "sub": shop.sub, "iat": int(time.time()),
                     "exp": int(time.time()) + 60}, "s" * 32, algorithm="HS256", headers={"kid": google.keys[0][0]})
    refused(verifier, hs, Unauthenticated, "INVALID_TOKEN")
    refused(verifier, "not.a.token", Unauthenticated, "INVALID_TOKEN")


def test_keys_are_fetched_once_kept_for_max_age_and_refetched_for_a_new_kid_at_most_every_ten_seconds(setup, google, shop):
    verifier, keys, clock = setup
    for _ in range(3):
        verifier.verify(google.mint(shop, AUDIENCE))
    assert google.cert_fetches == 1
    google.rotate()  # a token signed with a key we have not seen, within ten seconds of the last fetch
    refused(verifier, google.mint(shop, AUDIENCE), Unauthenticated, "INVALID_TOKEN")
    assert google.cert_fetches == 1
    clock.now += 10  # ten seconds later, the same token makes us fetch, and it verifies
    verifier.verify(google.mint(shop, AUDIENCE))
    assert google.cert_fetches == 2
    for n in range(5):  # ...but made-up key ids do not make us fetch again within ten seconds
        refused(verifier, google.mint(shop, AUDIENCE, kid=f"made-up-{n}"), Unauthenticated, "INVALID_TOKEN")
    assert google.cert_fetches == 2
    clock.now += 601  # max-age over: fetched again before use (a token not verified before)
    verifier.verify(google.mint(shop, AUDIENCE, issued=time.time() - 5))
    assert google.cert_fetches == 3


def test_unreachable_keys_are_unavailable_before_the_first_fetch_and_kept_after(shop):
    google = GoogleStandIn()
    url = google.certs_url
    clock = Clock()
    keys = GoogleKeys(url, clock=clock, timeout=1)
    verifier = GoogleTokenVerifier(keys, audience=AUDIENCE, accounts={shop.sub: "cli_shop"})
    token = google.mint(shop, AUDIENCE)
    verifier.verify(token)
    google.stop()  # Google is unreachable: the keys we hold keep working past their max-age
    clock.now += 7200
    assert verifier.verify(token).client_id == "cli_shop"
    cold = GoogleTokenVerifier(GoogleKeys(url, clock=clock, timeout=1), audience=AUDIENCE, accounts={shop.sub: "c"})
    refused(cold, token, Unavailable, "GOOGLE_KEYS_UNAVAILABLE")


def test_a_verifier_needs_an_audience_and_pinned_accounts(google):
    keys = GoogleKeys(google.certs_url)
    with pytest.raises(ValueError, match="audience"):
        GoogleTokenVerifier(keys, audience="", accounts={"1": "c"})
    with pytest.raises(ValueError, match="service account"):
        GoogleTokenVerifier(keys, audience=AUDIENCE, accounts={})


def test_a_verified_token_is_remembered_until_it_expires_and_then_refused(google, shop):
    wall = [time.time()]
    verifier = GoogleTokenVerifier(GoogleKeys(google.certs_url), audience=AUDIENCE, accounts={shop.sub: "cli_shop"},
                                   wall_clock=lambda: wall[0])
    token = google.mint(shop, AUDIENCE, lifetime=100)
    assert verifier.verify(token) is verifier.verify(token)  # the second from memory
    assert verifier.remembered(token) is not None
    wall[0] += 100 + 30 + 1  # past exp and the leeway: forgotten, and PyJWT (real time) is asked again
    assert verifier.remembered(token) is None


def test_either_issuer_sends_each_token_to_its_verifier_and_answers_with_its_reasons(keys_dir, google, shop):
    from server.domain.caller import CLIENT
    from server.infra import tokens

    issuer = tokens.TokenIssuer(tokens.load_private_key(keys_dir / "jwt-private.pem"), issuer="payments",
                                audience="payments-api", ttl_seconds=300)
    own = tokens.TokenVerifier.from_file(keys_dir / "jwks.json", issuer="payments", audience="payments-api")
    google_verifier = GoogleTokenVerifier(GoogleKeys(google.certs_url), audience=AUDIENCE, accounts={shop.sub: "cli_shop"})
    either = google_tokens.EitherIssuer(own, google_verifier)
    ours = issuer.issue_client("cli_other", "payments.read")
    assert either.verify(ours).subject == "cli_other" and either.verify(ours).permissions == frozenset({"payments.read"})
    theirs = either.verify(google.mint(shop, AUDIENCE))
    # The pinned client with no scope of its own: the client check gives it what the client holds.
    assert (theirs.subject, theirs.role, theirs.permissions, theirs.email) == ("cli_shop", CLIENT, frozenset(), "")
    refused(either, google.mint(shop, "https://elsewhere.example.com"), PermissionDenied, "WRONG_AUDIENCE")
    refused(either, google.mint(ServiceAccount("x"), AUDIENCE), PermissionDenied, "SERVICE_ACCOUNT_NOT_ALLOWED")
    refused(either, "junk", Unauthenticated, "INVALID_TOKEN")
    # Without Google configured, a Google token is just a token we did not sign.
    alone = google_tokens.EitherIssuer(own, None)
    refused(alone, google.mint(shop, AUDIENCE), Unauthenticated, "INVALID_TOKEN")
    assert alone.verify(ours).subject == "cli_other"
