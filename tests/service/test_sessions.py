"""Sessions over a real channel, on both databases: refresh tokens rotate and a reused one
revokes the session, a retried one or several at once get the same answer; logout, a disabled or
deleted account and a role change end access within the revocation bound
(PAYMENTS_REVOCATION_CHECK_SECONDS, 0.5 s in the tests' settings); failed logins slow the guesser's
address, not the owner's. Several processes: test_session_processes.py."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import grpc
import jwt
import pytest

from server.infra import storage
from server.edge.pb import payments_pb2 as pb
from tests.conftest import rich_status

PASSWORD = "correct horse battery"


def login(stubs, email: str) -> pb.LoginResponse:
    try:
        stubs.auth.Register(pb.RegisterRequest(email=email, password=PASSWORD))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    return stubs.auth.Login(pb.LoginRequest(email=email, password=PASSWORD))


def md(token: str):
    return (("authorization", f"Bearer {token}"),)


def list_code(stubs, token: str):
    try:
        stubs.payments.ListPayments(pb.ListPaymentsRequest(), metadata=md(token))
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), rich_status(e)[1].reason


def refused_within_the_bound(stubs, token: str, settings) -> str:
    deadline = time.monotonic() + settings.revocation_check_seconds + 2
    while (answer := list_code(stubs, token))[0] == grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "still accepted past the revocation bound"
        time.sleep(0.05)
    assert answer[0] == grpc.StatusCode.UNAUTHENTICATED
    return answer[1]


def test_access_tokens_are_typed_short_and_name_their_session(stubs, settings):
    got = login(stubs, "typed@example.com")
    header = jwt.get_unverified_header(got.access_token)
    claims = jwt.decode(got.access_token, options={"verify_signature": False})
    assert header["typ"] == "at+jwt"
    assert claims["jti"] and claims["sid"].startswith("ses_") and claims["client_id"]
    assert got.expires_in == settings.jwt_ttl_seconds and got.refresh_token.startswith("rt_")
    assert got.refresh_expires_in == settings.refresh_ttl_seconds
    stored = [t.hash for t in storage.RefreshToken.select()]
    assert got.refresh_token not in stored and len(stored[0]) == 64  # kept hashed only


def test_refresh_rotates_and_a_reused_refresh_token_revokes_the_session(stubs, settings):
    first = login(stubs, "rotate@example.com")
    second = stubs.auth.Refresh(pb.RefreshRequest(refresh_token=first.refresh_token))
    assert second.refresh_token != first.refresh_token and second.access_token != first.access_token
    assert list_code(stubs, second.access_token)[0] == grpc.StatusCode.OK
    # The first one again at once (its answer was lost): the same successor, the session lives.
    retried = stubs.auth.Refresh(pb.RefreshRequest(refresh_token=first.refresh_token))
    assert retried.refresh_token == second.refresh_token and list_code(stubs, retried.access_token)[0] == grpc.StatusCode.OK
    third = stubs.auth.Refresh(pb.RefreshRequest(refresh_token=second.refresh_token))
    with pytest.raises(grpc.RpcError) as e:  # once its successor was used, the first one again: stolen or replayed
        stubs.auth.Refresh(pb.RefreshRequest(refresh_token=first.refresh_token))
    assert rich_status(e.value)[1].reason == "REFRESH_TOKEN_REUSED"
    with pytest.raises(grpc.RpcError) as e:  # and the whole session is gone, the newest token too
        stubs.auth.Refresh(pb.RefreshRequest(refresh_token=third.refresh_token))
    assert rich_status(e.value)[1].reason == "INVALID_REFRESH_TOKEN"
    assert refused_within_the_bound(stubs, third.access_token, settings) == "TOKEN_REVOKED"
    for junk in ("", "rt_nonsense", "x" * 100):
        with pytest.raises(grpc.RpcError) as e:
            stubs.auth.Refresh(pb.RefreshRequest(refresh_token=junk))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_logout_ends_the_session_within_the_bound(stubs, settings):
    got = login(stubs, "leaving@example.com")
    other = login(stubs, "leaving@example.com")  # another device: a session of its own
    assert list_code(stubs, got.access_token)[0] == grpc.StatusCode.OK
    stubs.auth.Logout(pb.LogoutRequest(), metadata=md(got.access_token))
    assert refused_within_the_bound(stubs, got.access_token, settings) == "TOKEN_REVOKED"
    with pytest.raises(grpc.RpcError):
        stubs.auth.Refresh(pb.RefreshRequest(refresh_token=got.refresh_token))
    assert list_code(stubs, other.access_token)[0] == grpc.StatusCode.OK
    with pytest.raises(grpc.RpcError) as e:
        stubs.auth.Logout(pb.LogoutRequest())  # logout needs a token
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_disabled_deleted_or_re_roled_account_loses_access_within_the_bound(stubs, settings, running_server):
    from server.domain.accounts import Accounts
    from server.domain.sessions import Sessions

    disabled = login(stubs, "disabled@example.com")
    Accounts(None, sessions=Sessions(settings.refresh_ttl_seconds)).disable("disabled@example.com")
    assert refused_within_the_bound(stubs, disabled.access_token, settings) == "TOKEN_REVOKED"
    with pytest.raises(grpc.RpcError) as e:
        stubs.auth.Login(pb.LoginRequest(email="disabled@example.com", password=PASSWORD))
    assert rich_status(e.value)[1].reason == "BAD_CREDENTIALS"

    deleted = login(stubs, "deleted@example.com")
    storage.User.delete().where(storage.User.email == "deleted@example.com").execute()
    assert refused_within_the_bound(stubs, deleted.access_token, settings) == "TOKEN_REVOKED"

    # A role change ends the session: no refresh of it carries the new role (or any), and the
    # tokens it had are refused within the bound; the next login carries the new role.
    promoted = login(stubs, "promoted@example.com")
    accounts = Accounts(None, sessions=Sessions(settings.refresh_ttl_seconds))
    accounts.change_role("promoted@example.com", "admin", promote_existing=True)
    with pytest.raises(grpc.RpcError) as e:
        stubs.auth.Refresh(pb.RefreshRequest(refresh_token=promoted.refresh_token))
    assert rich_status(e.value)[1].reason == "INVALID_REFRESH_TOKEN"
    assert refused_within_the_bound(stubs, promoted.access_token, settings) == "TOKEN_REVOKED"
    admin = stubs.auth.Login(pb.LoginRequest(email="promoted@example.com", password=PASSWORD))
    assert jwt.decode(admin.access_token, options={"verify_signature": False})["role"] == "admin"
    assert list_code(stubs, admin.access_token)[0] == grpc.StatusCode.OK
    accounts.change_role("promoted@example.com", "customer")
    assert refused_within_the_bound(stubs, admin.access_token, settings) == "TOKEN_REVOKED"
    storage.end_call()


def test_refreshes_of_one_token_at_once_get_the_same_answer_and_never_a_busy_database(stubs, settings):
    """Twelve races of eight refreshes of one token: all answered OK with the same successor, on
    SQLite too (the spend takes the write lock first), and the session lives on."""
    for n in range(12):
        got = login(stubs, f"racer{n}@example.com")
        start = threading.Barrier(8)

        def refresh(_):
            start.wait()
            try:
                return stubs.auth.Refresh(pb.RefreshRequest(refresh_token=got.refresh_token)).refresh_token
            except grpc.RpcError as e:
                return f"{e.code().name} {rich_status(e)[1].reason}"

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = set(pool.map(refresh, range(8)))
        assert len(answers) == 1 and next(iter(answers)).startswith("rt_"), answers
        assert stubs.auth.Refresh(pb.RefreshRequest(refresh_token=answers.pop())).refresh_token


def test_a_guesser_slows_itself_down_not_the_owner_at_another_address(stubs):
    """The throttle counts per email and client address (Envoy's x-payments-client-address)."""
    login(stubs, "guessed@example.com")
    guesser = (("x-payments-client-address", "203.0.113.9"),)
    owner = (("x-payments-client-address", "198.51.100.7"),)
    reasons = []
    for i in range(12):
        try:
            stubs.auth.Login(pb.LoginRequest(email="guessed@example.com", password=f"guess number {i}"),
                             metadata=guesser)
        except grpc.RpcError as e:
            reasons.append(rich_status(e)[1].reason)
    assert reasons[:5] == ["BAD_CREDENTIALS"] * 5 and set(reasons[5:]) == {"LOGIN_THROTTLED"}
    assert stubs.auth.Login(pb.LoginRequest(email="guessed@example.com", password=PASSWORD), metadata=owner)


def test_a_token_without_a_session_or_of_another_type_is_refused(stubs, issuer, keys_dir):
    from server.infra import tokens

    key = tokens.load_private_key(keys_dir / "jwt-private.pem")
    now = int(time.time())
    claims = {"iss": issuer.issuer, "aud": issuer.audience, "sub": "usr_alice", "email": "alice@example.com",
              "role": "customer", "iat": now, "nbf": now, "exp": now + 60, "jti": "j"}
    for headers, extra in (({"typ": "at+jwt"}, {}),  # no sid
                           ({"typ": "JWT"}, {"sid": "ses_test_usr_alice"}),  # not an access token
                           ({"typ": "at+jwt"}, {"sid": "ses_never_started"})):  # no such session
        token = jwt.encode({**claims, **extra}, key, algorithm="ES256", headers={"kid": issuer.kid, **headers})
        assert list_code(stubs, token)[0] == grpc.StatusCode.UNAUTHENTICATED
