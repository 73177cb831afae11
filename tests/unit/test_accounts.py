import pytest

from server.infra import passwords
from server.domain.accounts import Accounts
from server.domain.errors import AlreadyExists, InvalidArgument, Unauthenticated
from server.infra.storage import User


@pytest.fixture
def accounts(database, issuer):
    return Accounts(issuer)


def test_password_hash_is_argon2id_and_verifies():
    h = passwords.hash_password("correct horse battery")
    assert h.startswith("$argon2id$") and "correct horse" not in h
    assert passwords.verify_password(h, "correct horse battery")
    assert not passwords.verify_password(h, "wrong horse battery")
    assert not passwords.verify_password(None, "anything at all")
    assert not passwords.verify_password("not-a-hash", "anything at all")


def test_register_then_login(accounts):
    user = accounts.register("New@Example.com", "correct horse battery")
    assert (user.email, user.role) == ("new@example.com", "customer")
    login = accounts.login("new@example.com", "correct horse battery")
    assert login.access_token.count(".") == 2 and login.expires_in == accounts.issuer.ttl_seconds


def test_register_validates_and_refuses_duplicates(accounts):
    with pytest.raises(InvalidArgument) as e:
        accounts.register("nope", "short")
    assert {f for f, _ in e.value.violations} == {"email", "password"}
    accounts.register("a@example.com", "correct horse battery")
    with pytest.raises(AlreadyExists) as e:
        accounts.register("A@example.com", "another long password")
    assert e.value.reason == "EMAIL_TAKEN"


def test_login_failures_look_the_same(accounts):
    accounts.register("a@example.com", "correct horse battery")
    with pytest.raises(Unauthenticated) as wrong_password:
        accounts.login("a@example.com", "wrong password here")
    with pytest.raises(Unauthenticated) as no_user:
        accounts.login("nobody@example.com", "wrong password here")
    assert wrong_password.value.message == no_user.value.message
    assert wrong_password.value.reason == no_user.value.reason == "BAD_CREDENTIALS"


def test_unknown_email_still_costs_a_password_verification(accounts, monkeypatch):
    calls = []

    class Spy:
        def verify(self, h, p):
            calls.append(h)
            return real.verify(h, p)

    real = passwords._hasher
    monkeypatch.setattr(passwords, "_hasher", Spy())
    with pytest.raises(Unauthenticated):
        accounts.login("nobody@example.com", "some password!")
    assert calls == [passwords._DUMMY_HASH]


def test_ensure_admin_is_idempotent_and_promotes(accounts):
    accounts.register("boss@example.com", "customer password")
    admin = accounts.ensure_admin("boss@example.com", "admin password!!")
    again = accounts.ensure_admin("boss@example.com", "admin password!!")
    assert admin.id == again.id and again.role == "admin"
    assert User.select().where(User.email == "boss@example.com").count() == 1
    assert accounts.login("boss@example.com", "admin password!!")
    with pytest.raises(Unauthenticated):
        accounts.login("boss@example.com", "customer password")
