"""Sessions across two real server processes (PAYMENTS_PROCESSES=2), each with its own session
cache, called directly on their own ports, on both databases: a role change, a password reset or
a revocation is refused by both within the bound and stays refused (no call alternates between
401 and 200); a session that is current is accepted by both; a role changed by hand in the
database is refused alike by both, whatever the role does next. And the children's access lines
reach the log without waiting for another line (the flush thread is restarted after the fork)."""

from __future__ import annotations

import contextlib
import json
import time

import grpc
import jwt
import pytest

from devstack.stack import free_ports
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from server.infra import storage
from tests.conftest import rich_status
from tests.support.stack import Server, prepare_workdir, server_env

PASSWORD = "correct horse battery"
BOUND = 0.5  # PAYMENTS_REVOCATION_CHECK_SECONDS of these servers


@pytest.fixture
def two_processes(settings, tmp_path, keys_dir):
    prepare_workdir(tmp_path, keys_dir)
    base = free_ports(2)
    env = server_env(tmp_path, PAYMENTS_PROCESSES="2", PAYMENTS_LISTEN_ADDR=f"127.0.0.1:{base}",
                     PAYMENTS_DATA_DIR=str(settings.data_dir), PAYMENTS_REVOCATION_CHECK_SECONDS=str(BOUND),
                     **({"DATABASE_URL": settings.database_url} if settings.database_url else {}))
    server = Server.start(tmp_path, env, test_accounts=False)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in server.ports]
    try:
        assert len(channels) == 2
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        yield server, [Stubs(channel) for channel in channels]
    finally:
        for channel in channels:
            channel.close()
        server.stop()


class Stubs:
    def __init__(self, channel):
        self.auth = pb_grpc.AuthServiceStub(channel)
        self.payments = pb_grpc.PaymentServiceStub(channel)


@contextlib.contextmanager
def operator(settings):
    """The operator's rules (server/domain/accounts.py) on the servers' database, as the CLI runs them."""
    from server.domain.accounts import Accounts
    from server.domain.sessions import Sessions

    with servers_database(settings):
        yield Accounts(None, sessions=Sessions(settings.refresh_ttl_seconds))


@contextlib.contextmanager
def servers_database(settings):
    """storage.db pointed at the servers' database for a while."""
    database, previous = storage.make_database(settings), storage.db.obj
    storage.db.initialize(database)
    try:
        with database.connection_context():
            yield
    finally:
        storage.db.initialize(previous)
        database.close()


def code_of(stubs: Stubs, token: str) -> str:
    try:
        stubs.payments.ListPayments(pb.ListPaymentsRequest(), metadata=(("authorization", f"Bearer {token}"),))
        return "OK"
    except grpc.RpcError as e:
        return rich_status(e)[1].reason


def codes_over(processes: list[Stubs], token: str, seconds: float) -> list[str]:
    """Calls to both processes in turn for `seconds`."""
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.extend(code_of(p, token) for p in processes)
        time.sleep(0.02)
    return seen


def role_of(token: str) -> str:
    return jwt.decode(token, options={"verify_signature": False})["role"]


@pytest.mark.parametrize("change", ["promote", "demote", "reset_password", "revoke"])
def test_a_privilege_change_is_refused_by_every_process_within_the_bound_and_stays_refused(
        two_processes, settings, change):
    _, processes = two_processes
    email = f"{change}@example.com"
    processes[0].auth.Register(pb.RegisterRequest(email=email, password=PASSWORD))
    if change == "demote":
        with operator(settings) as accounts:
            accounts.change_role(email, "admin", promote_existing=True)
    old = processes[0].auth.Login(pb.LoginRequest(email=email, password=PASSWORD))
    assert [code_of(p, old.access_token) for p in processes] == ["OK", "OK"]  # both have it cached
    refreshed = processes[1].auth.Refresh(pb.RefreshRequest(refresh_token=old.refresh_token))
    with operator(settings) as accounts:
        {"promote": lambda: accounts.change_role(email, "admin", promote_existing=True),
         "demote": lambda: accounts.change_role(email, "customer"),
         "reset_password": lambda: accounts.reset_password(email, "another long password"),
         "revoke": lambda: accounts.revoke_sessions(email)}[change]()
    changed_at = time.monotonic()
    time.sleep(BOUND)
    for token in (old.access_token, refreshed.access_token):
        assert set(codes_over(processes, token, 1.0)) == {"TOKEN_REVOKED"}, (change, token)
    assert time.monotonic() - changed_at < BOUND + 2.5
    for p in processes:  # no refresh of the session mints anything, on either process
        with pytest.raises(grpc.RpcError) as e:
            p.auth.Refresh(pb.RefreshRequest(refresh_token=refreshed.refresh_token))
        assert rich_status(e.value)[1].reason == "INVALID_REFRESH_TOKEN"
    # A new login carries the account's role now, and both processes accept it, every time.
    password = "another long password" if change == "reset_password" else PASSWORD
    new = processes[1].auth.Login(pb.LoginRequest(email=email, password=password))
    assert role_of(new.access_token) == {"promote": "admin", "demote": "customer"}.get(change, "customer")
    assert set(codes_over(processes, new.access_token, 1.0)) == {"OK"}


def test_a_role_changed_by_hand_is_refused_alike_by_both_processes_whatever_it_does_next(two_processes, settings):
    _, processes = two_processes
    processes[0].auth.Register(pb.RegisterRequest(email="hand@example.com", password=PASSWORD))
    login = processes[0].auth.Login(pb.LoginRequest(email="hand@example.com", password=PASSWORD))
    assert code_of(processes[0], login.access_token) == "OK"
    with servers_database(settings):
        storage.User.update(role="admin").where(storage.User.email == "hand@example.com").execute()
        time.sleep(BOUND + 0.1)
        assert code_of(processes[0], login.access_token) == "TOKEN_REVOKED"  # the first to look ends it ...
        storage.User.update(role="customer").where(storage.User.email == "hand@example.com").execute()
    assert set(codes_over(processes, login.access_token, 1.0)) == {"TOKEN_REVOKED"}  # ... for both
    with pytest.raises(grpc.RpcError) as e:
        processes[1].auth.Refresh(pb.RefreshRequest(refresh_token=login.refresh_token))
    assert rich_status(e.value)[1].reason == "INVALID_REFRESH_TOKEN"


def test_a_refresh_retried_on_the_other_process_gets_the_same_answer(two_processes):
    _, processes = two_processes
    processes[0].auth.Register(pb.RegisterRequest(email="retry@example.com", password=PASSWORD))
    login = processes[0].auth.Login(pb.LoginRequest(email="retry@example.com", password=PASSWORD))
    first = processes[0].auth.Refresh(pb.RefreshRequest(refresh_token=login.refresh_token))
    again = processes[1].auth.Refresh(pb.RefreshRequest(refresh_token=login.refresh_token))  # the answer was lost
    assert again.refresh_token == first.refresh_token
    assert set(codes_over(processes, again.access_token, 0.3)) == {"OK"}
    assert processes[1].auth.Refresh(pb.RefreshRequest(refresh_token=again.refresh_token)).refresh_token


def test_the_childrens_access_lines_reach_the_log_without_waiting_for_another_line(two_processes):
    server, processes = two_processes
    for p in processes:
        with pytest.raises(grpc.RpcError):
            p.payments.ListPayments(pb.ListPaymentsRequest())  # no token: one access line, nothing else
    deadline = time.monotonic() + 3
    while True:
        lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
        rpcs = [line for line in lines if line.get("message") == "rpc" and line.get("code") == "UNAUTHENTICATED"]
        if len(rpcs) == 2:
            break
        assert time.monotonic() < deadline, f"access lines still buffered after 3 s: {rpcs}"
        time.sleep(0.05)
