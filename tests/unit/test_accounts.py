import concurrent.futures
import threading
import time

import jwt
import pytest

from server.domain import login_throttle
from server.infra import passwords, storage
from server.domain.accounts import Accounts
from server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ResourceExhausted, Unauthenticated
from server.domain.sessions import Sessions
from server.infra.storage import Session, User


@pytest.fixture
def accounts(database, issuer, clock):
    return Accounts(issuer, clock=clock, sessions=Sessions(3600, clock))


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


def test_ensure_admin_is_idempotent_and_a_new_password_ends_the_admins_sessions(accounts):
    admin = accounts.ensure_admin("boss@example.com", "admin password!!")
    session = accounts.login("boss@example.com", "admin password!!")
    again = accounts.ensure_admin("boss@example.com", "admin password!!")
    assert admin.id == again.id and again.role == "admin"
    assert User.select().where(User.email == "boss@example.com").count() == 1
    assert accounts.refresh(session.refresh_token)  # the same password again changes nothing
    accounts.ensure_admin("boss@example.com", "a new admin password")
    with pytest.raises(Unauthenticated):  # a password reset ends every session
        accounts.refresh(session.refresh_token)
    with pytest.raises(Unauthenticated):
        accounts.login("boss@example.com", "admin password!!")
    assert accounts.login("boss@example.com", "a new admin password")


def test_ensure_admin_refuses_an_email_a_customer_registered_first(accounts):
    """Sign-up is open and emails are unverified: whoever registered ops@ first must not become admin."""
    accounts.register("ops@example.com", "squatters password")
    squatter = accounts.login("ops@example.com", "squatters password")
    with pytest.raises(FailedPrecondition) as e:
        accounts.ensure_admin("ops@example.com", "the operators password")
    assert e.value.reason == "EXISTING_CUSTOMER"
    user = User.get(User.email == "ops@example.com")
    assert user.role == "customer" and passwords.verify_password(user.password_hash, "squatters password")
    refreshed = accounts.refresh(squatter.refresh_token)  # the customer's session is untouched
    assert jwt.decode(refreshed.access_token, options={"verify_signature": False})["role"] == "customer"


def test_promoting_an_existing_customer_is_explicit_and_ends_its_sessions(accounts):
    accounts.register("ops@example.com", "squatters password")
    squatter = accounts.login("ops@example.com", "squatters password")
    admin = accounts.ensure_admin("ops@example.com", "the operators password", promote_existing=True)
    assert admin.role == "admin"
    for token in (squatter.refresh_token, squatter.refresh_token):  # never an admin token from the old session
        with pytest.raises(Unauthenticated):
            accounts.refresh(token)
    with pytest.raises(Unauthenticated):
        accounts.login("ops@example.com", "squatters password")
    login = accounts.login("ops@example.com", "the operators password")
    assert jwt.decode(login.access_token, options={"verify_signature": False})["role"] == "admin"


@pytest.mark.parametrize("change", ["promote", "demote", "reset_password", "disable"])
def test_every_privilege_change_ends_every_session_of_the_account(accounts, change):
    accounts.register("x@example.com", "first password!")
    if change == "demote":
        accounts.change_role("x@example.com", "admin", promote_existing=True)
    sessions = [accounts.login("x@example.com", "first password!") for _ in range(2)]
    other = accounts.register("y@example.com", "first password!") and accounts.login("y@example.com", "first password!")
    {"promote": lambda: accounts.change_role("x@example.com", "admin", promote_existing=True),
     "demote": lambda: accounts.change_role("x@example.com", "customer"),
     "reset_password": lambda: accounts.reset_password("x@example.com", "second password!"),
     "disable": lambda: accounts.disable("x@example.com")}[change]()
    user = User.get(User.email == "x@example.com")
    assert Session.select().where((Session.user_id == user.id) & Session.revoked_at.is_null()).count() == 0
    for login in sessions:
        with pytest.raises(Unauthenticated) as e:
            accounts.refresh(login.refresh_token)
        assert e.value.reason == "INVALID_REFRESH_TOKEN"
    assert accounts.refresh(other.refresh_token)  # another account's session is not touched


def test_a_role_change_that_changes_nothing_ends_nothing(accounts):
    accounts.register("x@example.com", "first password!")
    login = accounts.login("x@example.com", "first password!")
    accounts.change_role("x@example.com", "customer")
    assert accounts.refresh(login.refresh_token)
    with pytest.raises(InvalidArgument):
        accounts.change_role("x@example.com", "root")
    with pytest.raises(FailedPrecondition) as e:  # a customer made admin: only when said explicitly
        accounts.change_role("x@example.com", "admin")
    assert e.value.reason == "EXISTING_CUSTOMER" and User.get(User.email == "x@example.com").role == "customer"


def test_a_role_changed_behind_the_rules_back_ends_the_session_at_its_next_refresh(accounts):
    """SQL by hand: no revocation ran, yet the refresh never mints an admin token from a customer's login."""
    accounts.register("x@example.com", "first password!")
    login = accounts.login("x@example.com", "first password!")
    User.update(role="admin").where(User.email == "x@example.com").execute()
    with pytest.raises(Unauthenticated) as e:
        accounts.refresh(login.refresh_token)
    assert e.value.reason == "INVALID_REFRESH_TOKEN"
    User.update(role="customer").where(User.email == "x@example.com").execute()
    with pytest.raises(Unauthenticated):  # and it stays over, whatever the role does next
        accounts.refresh(login.refresh_token)
    assert Session.get(Session.user_id == login_subject(login)).revoke_reason == "the account's role changed"


def login_subject(login) -> str:
    return jwt.decode(login.access_token, options={"verify_signature": False})["sub"]


class CountingHasher:
    """passwords._hasher, counting the verifications (each one is an argon2 hash)."""

    def __init__(self, real):
        self.real, self.verified, self.lock = real, 0, threading.Lock()

    def verify(self, h, p):
        with self.lock:
            self.verified += 1
        return self.real.verify(h, p)

    def hash(self, p):
        return self.real.hash(p)


def test_concurrent_guesses_get_exactly_the_free_password_checks(accounts, monkeypatch):
    """The count is taken before the hash, atomically: 20 guesses at once, 5 password checks."""
    accounts.register("victim@example.com", "the right password")
    spy = CountingHasher(passwords._hasher)
    monkeypatch.setattr(passwords, "_hasher", spy)
    start = threading.Barrier(20)

    def guess(i):
        start.wait()
        try:
            accounts.login("victim@example.com", f"guess number {i}", client="203.0.113.9")
        except (Unauthenticated, ResourceExhausted) as e:
            return e.reason
        finally:
            storage.end_call()

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        reasons = list(pool.map(guess, range(20)))
    assert spy.verified == login_throttle.FREE_FAILURES, reasons
    assert reasons.count("BAD_CREDENTIALS") == login_throttle.FREE_FAILURES
    assert reasons.count("LOGIN_THROTTLED") == 20 - login_throttle.FREE_FAILURES
    # The owner, from another address, is not held up at all.
    assert accounts.login("victim@example.com", "the right password", client="198.51.100.7")


def test_a_guesser_never_keeps_the_owner_out_from_another_address(accounts, clock):
    """Guessing at every opening for as long as it likes: the owner elsewhere logs in at once, every time."""
    accounts.register("victim@example.com", "the right password")
    now = [0.0]
    accounts.throttle.clock = lambda: now[0]
    for second in range(0, 600, 1):  # four wrong passwords a second from one address, for ten minutes
        now[0] = float(second)
        for i in range(4):
            try:
                accounts.login("victim@example.com", f"guess {second}.{i}", client="203.0.113.9")
            except (Unauthenticated, ResourceExhausted):
                pass
        if second % 60 == 0:
            assert accounts.login("victim@example.com", "the right password", client="198.51.100.7")
    with pytest.raises(ResourceExhausted):  # the guesser itself is still slowed down
        accounts.login("victim@example.com", "the right password", client="203.0.113.9")


def test_a_wall_clock_stepped_back_locks_nobody_out(accounts, clock):
    accounts.register("victim@example.com", "the right password")
    for i in range(login_throttle.FREE_FAILURES):
        with pytest.raises(Unauthenticated):
            accounts.login("victim@example.com", f"guess {i}", client="203.0.113.9")
    clock.advance(hours=-6)  # the wall clock jumps back; the throttle measures waits on a monotonic one
    time.sleep(1.05)
    assert accounts.login("victim@example.com", "the right password", client="203.0.113.9")


def test_start_up_never_makes_a_customer_admin(accounts, caplog):
    """PAYMENTS_ADMIN_EMAIL naming an email a customer registered first: an ERROR, and it stays a customer."""
    import logging

    from server.edge import app

    accounts.register("ops@example.com", "squatters password")
    with caplog.at_level(logging.INFO, logger="server"):
        app.ensure_admin(accounts, "ops@example.com", "the operators password")
    user = User.get(User.email == "ops@example.com")
    assert user.role == "customer" and passwords.verify_password(user.password_hash, "squatters password")
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "existing customer account" in error.getMessage() and error.email == "ops@example.com"
    assert not [r for r in caplog.records if r.getMessage() == "admin account ensured"]
    app.ensure_admin(accounts, "boss@example.com", "the operators password")  # a new email: created
    assert User.get(User.email == "boss@example.com").role == "admin"


def test_a_disabled_accounts_password_is_verified_as_an_unknown_emails_never_remembered(database, issuer, clock):
    """With right passwords remembered (server/infra/passwords.py), a disabled account's right
    password answered in 1 ms after the first try and a wrong one in 26 ms, though both say
    'wrong email or password': two tries told whether a password was right (the attack run).
    A disabled account now costs the dummy verification every time, as an unknown email does."""
    from server.domain.errors import Unauthenticated
    from server.infra import passwords
    from tests.support.hashers import CountingHasher

    counting = CountingHasher()
    accounts = Accounts(issuer, clock=clock, sessions=Sessions(3600, clock),
                        passwords=passwords.RememberingPasswords(counting))
    accounts.register("off@example.com", "the right password")
    accounts.login("off@example.com", "the right password", "198.51.100.7")
    accounts.login("off@example.com", "the right password", "198.51.100.7")
    assert counting.verified == 1  # a live account's right password is remembered
    accounts.disable("off@example.com")
    for _ in range(3):
        with pytest.raises(Unauthenticated) as refused:
            accounts.login("off@example.com", "the right password", "198.51.100.7")
        assert refused.value.reason == "BAD_CREDENTIALS"
    assert counting.verified == 4  # each one a full verification, never a remembered answer


def test_sign_ups_count_against_their_client_in_the_auth_lane(accounts):
    """A flood of sign-ups (each a hash) from addresses that never fail a login outranked a person
    who mistyped once: the lane sheds the client with the most failures first (the attack run)."""
    for n in range(3):
        accounts.register(f"new-{n}@example.com", "a long enough password", client="203.0.113.9")
    from server.domain.errors import AlreadyExists

    with pytest.raises(AlreadyExists):  # refused, after its hash: it counts too
        accounts.register("new-0@example.com", "a long enough password", client="203.0.113.9")
    assert accounts.throttle.failures("203.0.113.9") == 4
    assert accounts.throttle.failures("198.51.100.7") == 0
