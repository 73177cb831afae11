"""A service client's access token (server/infra/tokens.py issue_client) and its secrets
(server/domain/clients.py): the token verifies to the client with its scope and nothing else, and
the checks refuse every token that names a client in some other way."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from server.domain import clients
from server.domain.errors import Unauthenticated
from server.infra import tokens
from tests.support import jwt_attacks


@pytest.fixture
def verifier(keys_dir):
    return tokens.TokenVerifier.from_file(keys_dir / "jwks.json", issuer="payments", audience="payments-api")


def test_a_client_token_verifies_to_the_client_with_its_scope(issuer, verifier):
    caller = verifier.verify(issuer.issue_client("cli_abc", "payments.read payments.create"))
    assert (caller.subject, caller.role, caller.email, caller.session_id) == ("cli_abc", "client", "", "")
    assert caller.permissions == {"payments.read", "payments.create"}
    assert caller.is_client and caller.reaches_all and not caller.is_admin
    assert caller.may("payments.read") and not caller.may("payments.confirm")


@pytest.mark.parametrize("over", [
    {"scope": ""}, {"scope": None}, {"scope": ["payments.read"]}, {"client_id": None}, {"client_id": "cli_other"},
    {"sub": None},
])
def test_client_tokens_naming_the_client_otherwise_are_refused(keys_dir, verifier, over):
    claims = jwt_attacks.claims(role="client", sub="cli_abc", client_id="cli_abc", scope="payments.read",
                                email=None, sid=None)
    claims.update(over)
    claims = {k: v for k, v in claims.items() if v is not None}
    with pytest.raises(Unauthenticated) as e:
        verifier.verify(jwt_attacks.sign((keys_dir / "jwt-private.pem").read_bytes(), claims))
    assert e.value.reason == "INVALID_TOKEN"


def test_a_person_cannot_be_a_client_nor_a_client_an_admin(keys_dir, verifier):
    pem = (keys_dir / "jwt-private.pem").read_bytes()
    # A person's token with a scope claim stays a person's: the scope means nothing for it.
    person = verifier.verify(jwt_attacks.sign(pem, jwt_attacks.claims(scope="webhooks.manage")))
    assert person.role == "customer" and not person.permissions and not person.may("webhooks.manage")


def test_secrets_carry_the_prefix_256_random_bits_and_are_stored_as_a_keyed_hash():
    secret = clients.new_secret()
    assert secret.startswith("pmt_cs_") and len(secret) == len("pmt_cs_") + 52
    assert len({clients.new_secret() for _ in range(100)}) == 100
    digest = clients.secret_hash("cli_a", secret)
    assert digest == hmac.new(b"cli_a", secret.encode(), hashlib.sha256).hexdigest()
    assert digest != clients.secret_hash("cli_b", secret)  # a hash is bound to its client's row
