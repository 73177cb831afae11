"""Fixtures for end-to-end tests through the real Envoy: one server + Envoy per test session
(SQLite in a temp dir, its own keys), a REST client, and fresh users per test.

Tests never share users or payments, so they can run in any order against the one stack.
"""

from __future__ import annotations

import dataclasses
import os
import uuid

import grpc
import pytest

from tests.conftest import own_pg_database
from tests.support.rest import Client, loopback_address
from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD, Envoy, Server, running_stack

PASSWORD = "correct horse battery"
# Origins allowed by configuration (PAYMENTS_CORS_ORIGINS): Envoy allows no other. The last is
# where test_swagger_ui.py serves the page (a loopback port of its own, as `make run` serves it).
UI_PORT = 18000 + os.getpid() % 1000
UI_ORIGIN = f"http://127.0.0.1:{UI_PORT}"
CORS_ORIGINS = ("https://docs.payments.example", "https://swagger.payments.example:8443", UI_ORIGIN)


@dataclasses.dataclass
class Stack:
    server: Server
    envoy: Envoy
    keys: object  # Path of the key pair the server signs with and both layers verify with

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture(scope="session")
def stack(tmp_path_factory, keys_dir):
    work = tmp_path_factory.mktemp("e2e")
    with running_stack(work, keys_dir, {"PAYMENTS_CORS_ORIGINS": ", ".join(CORS_ORIGINS)}) as (server, envoy):
        yield Stack(server, envoy, keys_dir)


@pytest.fixture(scope="session")
def pg_stack(tmp_path_factory, keys_dir):
    """The same stack on PostgreSQL (a database of its own), for the suites that run on both."""
    work = tmp_path_factory.mktemp("e2e-pg")
    with own_pg_database(f"payments_test_{os.getpid()}_e2e") as url, \
            running_stack(work, keys_dir, {"PAYMENTS_CORS_ORIGINS": ", ".join(CORS_ORIGINS)}, url) as (server, envoy):
        yield Stack(server, envoy, keys_dir)


@pytest.fixture(scope="session")
def api(stack) -> Client:
    return Client(stack.url)


@dataclasses.dataclass
class User:
    email: str
    token: str
    user_id: str = ""


def new_email(tag: str = "user") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.com"


def registered(api: Client, tag: str = "user") -> str:
    """A fresh customer's email, signed up over REST from an address of its own."""
    email = new_email(tag)
    assert api.from_address(loopback_address()).post("/v1/auth/register", {"email": email, "password": PASSWORD}).status == 200
    return email


@pytest.fixture
def make_user(api):
    """Register (over REST) and log in a fresh customer, each from an address of its own (Envoy
    limits sign-ups and logins per client address)."""

    def make(tag: str = "user") -> User:
        email = new_email(tag)
        own = api.from_address(loopback_address())
        reg = own.post("/v1/auth/register", {"email": email, "password": PASSWORD})
        assert reg.status == 200, reg.text
        login = own.post("/v1/auth/login", {"email": email, "password": PASSWORD})
        assert login.status == 200, login.text
        return User(email, login.json["access_token"], reg.json["user_id"])

    return make


@pytest.fixture
def admin(api) -> User:
    login = api.from_address(loopback_address()).post("/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert login.status == 200, login.text
    return User(ADMIN_EMAIL, login.json["access_token"])


@pytest.fixture
def direct_channel(stack):
    """A gRPC channel straight to the server, bypassing Envoy."""
    with grpc.insecure_channel(stack.grpc_target) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        yield ch
