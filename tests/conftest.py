"""Shared fixtures: settings, a database on both backends, the rules with a controllable clock,
tokens for test callers, and a real gRPC server on a loopback port.

`database` is parametrized over SQLite and PostgreSQL. PostgreSQL comes from
PAYMENTS_TEST_DATABASE_URL (`make test` starts it); without it the PostgreSQL cases skip locally
and FAIL under CI (CI=true), so CI can never pass while silently skipping them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
from pathlib import Path

import grpc
import peewee
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import PooledPostgresqlDatabase
import pytest

from server.infra import config, storage, tokens
from server.domain.paging import PageTokens
from server.domain.payments import PaymentRules
from server.domain.caller import ADMIN, CUSTOMER, Caller

UTC = dt.timezone.utc
ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("PAYMENTS_TEST_DATABASE_URL", "")


def require_postgres() -> str:
    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("PAYMENTS_TEST_DATABASE_URL is not set: CI must run PostgreSQL (see .ci/run)")
        pytest.skip("PAYMENTS_TEST_DATABASE_URL not set (make test sets it)")
    return PG_URL


def _admin_pg(url: str) -> peewee.PostgresqlDatabase:
    params = parse_db_url(url)
    params.pop("database")
    return peewee.PostgresqlDatabase("postgres", **params)


@contextlib.contextmanager
def own_pg_database(name: str):
    """A PostgreSQL database of this name, created empty and dropped afterwards; yields its URL."""
    base = require_postgres()
    admin = _admin_pg(base)
    admin.connect()
    admin.connection().autocommit = True
    admin.execute_sql(f'DROP DATABASE IF EXISTS "{name}"')
    admin.execute_sql(f'CREATE DATABASE "{name}"')
    admin.close()
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        admin.connect()
        admin.connection().autocommit = True
        admin.execute_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_session_url():
    """A database of this pytest run's own (payments_test_<pid>), so runs never share tables."""
    with own_pg_database(f"payments_test_{os.getpid()}") as url:
        yield url


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, start: dt.datetime | None = None):
        self.now = start or dt.datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, **kw) -> dt.datetime:
        self.now += dt.timedelta(**kw)
        return self.now


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    tokens.create_key_pair(d / "jwt-private.pem", d / "jwks.json")
    return d


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _reset_postgres(url: str) -> None:
    """Drop the tables so each test starts from an empty, freshly migrated schema."""
    params = parse_db_url(url)
    name = params.pop("database")
    pg = peewee.PostgresqlDatabase(name, **params)
    with pg.connection_context():
        for model in storage.MODELS:
            pg.execute_sql(f'DROP TABLE IF EXISTS "{model._meta.table_name}" CASCADE')
    pg.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def settings(request, tmp_path, keys_dir, backend) -> config.Settings:
    url = ""
    if backend == "postgres":
        url = request.getfixturevalue("pg_session_url")
        _reset_postgres(url)
    return dataclasses.replace(
        config.Settings(),
        listen_addr="127.0.0.1:0",
        database_url=url,
        data_dir=tmp_path / "data",
        jwt_private_key_file=keys_dir / "jwt-private.pem",
        jwks_file=keys_dir / "jwks.json",
        jobs_enabled=False,
        page_token_secret=b"test-page-token-secret",
        grace_seconds=1.0,
        revocation_check_seconds=0.5,  # the bound test_sessions.py holds the server to
    )


def session_id_of(caller: Caller) -> str:
    return f"ses_test_{caller.subject}"


def seed_accounts() -> None:
    """Accounts for the callers the tests use (ALICE, BOB, ADMIN_CALLER), with their token
    subjects as ids (a payment an admin makes for alice@example.com belongs to ALICE's account),
    and the live session each token_for token names."""
    long_ago = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    for caller in (ALICE, BOB, ADMIN_CALLER):
        storage.User.insert(id=caller.subject, email=caller.email, password_hash="!", role=caller.role,
                            created_at=long_ago).on_conflict_ignore().execute()
        storage.Session.insert(id=session_id_of(caller), user_id=caller.subject, role=caller.role, created_at=long_ago,
                               expires_at=dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)).on_conflict_ignore().execute()


def seed_accounts_into(settings: config.Settings) -> None:
    """seed_accounts() in the database of a server running in another process (its tables exist)."""
    database = storage.make_database(settings)
    with database.bind_ctx(storage.MODELS), database.connection_context():
        seed_accounts()
    database.close()


@pytest.fixture
def database(settings):
    db = storage.open_database(settings)
    with db.connection_context():
        seed_accounts()
    yield db
    if not db.is_closed():
        db.close()
    if isinstance(db, PooledPostgresqlDatabase):
        db.close_all()


@pytest.fixture
def rules(database, clock) -> PaymentRules:
    return PaymentRules(page_tokens=PageTokens(b"test-page-token-secret"), payment_ttl=dt.timedelta(hours=1),
                        queries=storage.PaymentQueries(), clock=clock)


ALICE = Caller(subject="usr_alice", email="alice@example.com", role=CUSTOMER)
BOB = Caller(subject="usr_bob", email="bob@example.com", role=CUSTOMER)
ADMIN_CALLER = Caller(subject="usr_admin", email="admin@example.com", role=ADMIN)


@pytest.fixture(scope="session")
def issuer(keys_dir) -> tokens.TokenIssuer:
    s = config.Settings()
    return tokens.TokenIssuer(tokens.load_private_key(keys_dir / "jwt-private.pem"), issuer=s.jwt_issuer,
                              audience=s.jwt_audience, ttl_seconds=600)


@pytest.fixture(scope="session")
def token_for(issuer):
    def make(caller: Caller) -> str:
        """A token of the session seed_accounts() makes (the server checks it on every call)."""
        return issuer.issue(subject=caller.subject, email=caller.email, role=caller.role,
                            session_id=session_id_of(caller))

    return make


@pytest.fixture
def running_server(settings):
    """A real server (app.build) on a free loopback port; it binds storage.db to its database."""
    from server.edge import app

    running = app.build(settings)
    with storage.db.connection_context():
        seed_accounts()
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def channel(running_server):
    with grpc.insecure_channel(f"127.0.0.1:{running_server.port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=5)
        yield ch


@pytest.fixture
def stubs(channel):
    from server.edge.pb import payments_pb2_grpc as pb_grpc

    return dataclasses.make_dataclass("Stubs", ["payments", "auth"])(
        pb_grpc.PaymentServiceStub(channel), pb_grpc.AuthServiceStub(channel)
    )


@pytest.fixture
def auth_md(token_for):
    """Call metadata carrying a token for the given caller."""

    def make(caller: Caller = ALICE):
        return (("authorization", f"Bearer {token_for(caller)}"),)

    return make


def rich_status(err: grpc.RpcError):
    """(code, ErrorInfo, BadRequest or None) of a failed call, read from its google.rpc details."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    assert status is not None, f"no google.rpc.Status details on {err.code()}: {err.details()}"
    info, bad = None, None
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
    assert info is not None, "every error carries an ErrorInfo"
    return err.code(), info, bad


def pytest_terminal_summary(terminalreporter):
    """The transitions the model-based tests reached (tests/support/reached.py)."""
    from tests.support.reached import summary

    lines = summary()
    if lines:
        terminalreporter.section("model-based tests: transitions reached")
        for line in lines:
            terminalreporter.write_line(line)
