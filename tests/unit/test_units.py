"""Small modules' units: error mapping, bearer parsing, JSON logging, the operator CLI."""

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time

import pytest
from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from server.domain import errors
from server.edge import auth, servicers, status
from server.infra import logs
from tests.conftest import ROOT


def _decode(grpc_status):
    (key, value), = grpc_status.trailing_metadata
    assert key == "grpc-status-details-bin"
    return status_pb2.Status.FromString(value)


@pytest.mark.parametrize("error, code", [
    (errors.InvalidArgument([("f", "bad")], reason="R"), code_pb2.INVALID_ARGUMENT),
    (errors.NotFound("x"), code_pb2.NOT_FOUND),
    (errors.FailedPrecondition("x"), code_pb2.FAILED_PRECONDITION),
    (errors.AlreadyExists("x"), code_pb2.ALREADY_EXISTS),
    (errors.Unauthenticated("x"), code_pb2.UNAUTHENTICATED),
    (errors.PermissionDenied("x"), code_pb2.PERMISSION_DENIED),
    (errors.Unavailable("x"), code_pb2.UNAVAILABLE),
    (errors.Internal("x"), code_pb2.INTERNAL),
])
def test_every_domain_error_has_its_code_and_an_error_info(error, code):
    s = _decode(status.to_status(error))
    assert s.code == code and s.message == error.message
    info = error_details_pb2.ErrorInfo()
    assert s.details[0].Unpack(info) and info.domain == "payments.v1" and info.reason == error.reason


def test_invalid_argument_carries_one_violation_per_field():
    s = _decode(status.to_status(errors.InvalidArgument([("a", "is bad"), ("b", "is worse")], reason="R")))
    bad = error_details_pb2.BadRequest()
    assert s.details[1].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [("a", "is bad"), ("b", "is worse")]


@pytest.mark.parametrize("metadata, ok", [
    ((("authorization", "Bearer abc.def.ghi"),), True),
    ((("authorization", "bearer abc.def.ghi"),), True),
    ((), False),
    ((("authorization", "Basic dXNlcjpwYXNz"),), False),
    ((("authorization", "Bearer "),), False),
    ((("authorization", "Bearer a"), ("authorization", "Bearer b")), False),
])
def test_bearer_token_parsing(metadata, ok):
    if ok:
        assert auth.bearer_token(metadata) == "abc.def.ghi"
    else:
        with pytest.raises(errors.Unauthenticated):
            auth.bearer_token(metadata)


def test_public_methods_are_exactly_sign_up_login_refresh_client_tokens_health_and_reflection():
    """Every method the server serves, from the descriptors: only these need no token (Logout does)."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2 as reflection_v1alpha

    from server.edge.pb import payments_pb2

    methods = {f"/{service.full_name}/{m.name}"
               for module in (payments_pb2, health_pb2, reflection_v1alpha)
               for service in module.DESCRIPTOR.services_by_name.values() for m in service.methods}
    assert {m for m in methods if auth.is_public(m)} == {
        "/payments.v1.AuthService/Register", "/payments.v1.AuthService/Login", "/payments.v1.AuthService/Refresh",
        "/payments.v1.TokenService/CreateToken",
        "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List", "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}
    assert "/payments.v1.AuthService/Logout" in methods and len(methods) > 8
    # grpcio-reflection serves only v1alpha; its v1 successor is admitted too, for clients that ask for it.
    assert auth.is_public("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert not auth.is_public("/payments.v1.AuthService/Unknown")


def test_json_formatter_puts_extra_fields_at_the_top_level():
    record = logging.makeLogRecord({"name": "server", "levelname": "INFO", "msg": "rpc %s", "args": ("x",),
                                    "method": "/a/B", "code": "OK"})
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "rpc x" and line["method"] == "/a/B" and line["code"] == "OK"
    assert line["severity"] == "INFO" and line["time"].endswith("+00:00")


def test_cli_creates_keys_once(tmp_path):
    env = {**os.environ, "PAYMENTS_JWT_PRIVATE_KEY_FILE": str(tmp_path / "k.pem"), "PAYMENTS_JWKS_FILE": str(tmp_path / "jwks.json")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "server.cli", *a], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert "created signing key" in run("keys", "--if-missing").stdout
    first = (tmp_path / "k.pem").read_bytes()
    assert "keys exist" in run("keys", "--if-missing").stdout
    assert (tmp_path / "k.pem").read_bytes() == first


@pytest.mark.parametrize("backend", ["sqlite"])
def test_cli_create_admin_reads_the_password_from_the_environment(settings, tmp_path):
    env = {**os.environ, "PAYMENTS_JWT_PRIVATE_KEY_FILE": str(settings.jwt_private_key_file),
           "PAYMENTS_JWKS_FILE": str(settings.jwks_file), "PAYMENTS_DATA_DIR": str(settings.data_dir),
           "PAYMENTS_ADMIN_PASSWORD": "a long admin password"}
    out = subprocess.run([sys.executable, "-m", "server.cli", "create-admin", "Boss@Example.com"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "admin boss@example.com" in out.stdout and "a long admin password" not in out.stdout + out.stderr


def test_cli_create_admin_with_a_short_password_says_so_in_one_line(settings):
    env = {**os.environ, "PAYMENTS_JWT_PRIVATE_KEY_FILE": str(settings.jwt_private_key_file),
           "PAYMENTS_JWKS_FILE": str(settings.jwks_file), "PAYMENTS_DATA_DIR": str(settings.data_dir),
           "PAYMENTS_ADMIN_PASSWORD": "short"}
    out = subprocess.run([sys.executable, "-m", "server.cli", "create-admin", "boss@example.com"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: password") and len(out.stderr.strip().splitlines()) == 1, out.stderr


def cli(settings, *args: str, password: str = "a long admin password") -> subprocess.CompletedProcess:
    env = {**os.environ, "PAYMENTS_JWT_PRIVATE_KEY_FILE": str(settings.jwt_private_key_file),
           "PAYMENTS_JWKS_FILE": str(settings.jwks_file), "PAYMENTS_DATA_DIR": str(settings.data_dir),
           "DATABASE_URL": settings.database_url, "PAYMENTS_ADMIN_PASSWORD": password}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def test_cli_create_admin_refuses_an_email_a_customer_holds_unless_told_to_promote(settings, database, issuer):
    """Anyone can register ops@ before the operator: create-admin says so, and needs a flag to proceed."""
    from server.domain.accounts import Accounts
    from server.domain.sessions import Sessions
    from server.infra.storage import Session, User

    accounts = Accounts(issuer, sessions=Sessions(3600))
    accounts.register("ops@example.com", "squatters password")
    squatter = accounts.login("ops@example.com", "squatters password")
    refused = cli(settings, "create-admin", "Ops@Example.com")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "ops@example.com is an existing customer account" in refused.stderr
    assert "--promote-existing" in refused.stderr and "a long admin password" not in refused.stderr
    user = User.get(User.email == "ops@example.com")
    assert user.role == "customer" and Session.get(Session.user_id == user.id).revoked_at is None

    promoted = cli(settings, "create-admin", "ops@example.com", "--promote-existing")
    assert promoted.returncode == 0, promoted.stderr
    assert "admin ops@example.com" in promoted.stdout
    assert User.get(User.email == "ops@example.com").role == "admin"
    with pytest.raises(errors.Unauthenticated):  # the squatter's session ended with the promotion
        accounts.refresh(squatter.refresh_token)
    with pytest.raises(errors.Unauthenticated):
        accounts.login("ops@example.com", "squatters password")
    assert accounts.login("ops@example.com", "a long admin password")


def test_cli_set_role_ends_the_sessions_and_promotes_a_customer_only_when_told(settings, database, issuer):
    from server.domain.accounts import Accounts
    from server.domain.sessions import Sessions
    from server.infra.storage import User

    accounts = Accounts(issuer, sessions=Sessions(3600))
    accounts.register("someone@example.com", "a customers password")
    login = accounts.login("someone@example.com", "a customers password")
    refused = cli(settings, "set-role", "someone@example.com", "admin")
    assert refused.returncode == 1 and "existing customer account" in refused.stderr
    assert User.get(User.email == "someone@example.com").role == "customer"
    assert accounts.refresh(login.refresh_token)
    done = cli(settings, "set-role", "someone@example.com", "admin", "--promote-existing")
    assert done.returncode == 0 and "is an admin; its sessions are revoked" in done.stdout, done.stderr
    demoted = cli(settings, "set-role", "someone@example.com", "customer")
    assert demoted.returncode == 0 and "is a customer" in demoted.stdout, demoted.stderr
    nobody = cli(settings, "set-role", "nobody@example.com", "customer")
    assert nobody.returncode == 1 and "no account has this email" in nobody.stderr


@pytest.mark.parametrize("value", [
    dt.datetime(2026, 3, 1, 8, 0, 0, 5, tzinfo=dt.timezone.utc),
    dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.timezone.utc),  # before the epoch: nanos stay positive
    dt.datetime(2026, 11, 25, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=7))),  # not UTC
])
def test_payment_timestamps_are_what_protobuf_makes(value):
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(value)
    assert timestamp_pb2.Timestamp(**servicers.timestamp(value)) == expected
    assert servicers.timestamp(None) is None


ACCESS_RECORD = {"name": logs.ACCESS, "levelname": "INFO", "levelno": logging.INFO, "msg": "rpc",
                 "method": "/payments.v1.PaymentService/GetPayment", "code": "OK", "duration_ms": 1.25}


def _batching_handler(path, monkeypatch, caplog):
    handler = logs.BatchingHandler(open(path, "w", buffering=1 << 16, encoding="utf-8"))
    handler.setFormatter(logs.JsonFormatter())
    monkeypatch.setattr(logs, "_batching", handler)
    caplog.set_level(logging.INFO, logger=logs.ACCESS)
    return handler


def test_access_lines_wait_for_the_next_line_of_any_other_kind_and_keep_their_order(tmp_path, monkeypatch, caplog):
    path = tmp_path / "server.log"
    handler = _batching_handler(path, monkeypatch, caplog)
    logs.access(logging.INFO, ACCESS_RECORD["method"], "OK", 1.25)
    assert path.read_text() == "", "an access line is written with the next batch"
    handler.handle(logging.makeLogRecord({"name": "server", "levelname": "WARNING", "levelno": logging.WARNING,
                                          "msg": "database unavailable"}))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["message"] for line in lines] == ["rpc", "database unavailable"]
    # The hand-made access line is what the JSON formatter makes of the same record.
    expected = json.loads(logs.JsonFormatter().format(logging.makeLogRecord(ACCESS_RECORD)))
    assert {k: v for k, v in lines[0].items() if k != "time"} == {k: v for k, v in expected.items() if k != "time"}
    assert lines[0]["time"].endswith("+00:00")


def test_access_lines_are_flushed_in_the_background(tmp_path, monkeypatch, caplog):
    path = tmp_path / "server.log"
    handler = _batching_handler(path, monkeypatch, caplog)
    handler.start_flushing(interval=0.05)
    logs.access(logging.INFO, ACCESS_RECORD["method"], "NOT_FOUND", 0.5)
    deadline = time.monotonic() + 10
    while not path.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert json.loads(path.read_text())["code"] == "NOT_FOUND"


def test_access_lines_use_logging_when_it_was_set_up_elsewhere(monkeypatch, caplog):
    monkeypatch.setattr(logs, "_batching", None)
    caplog.set_level(logging.INFO, logger=logs.ACCESS)
    logs.access(logging.INFO, ACCESS_RECORD["method"], "OK", 2.5)
    logs.access(logging.DEBUG, "/grpc.health.v1.Health/Check", "OK", 0.1)  # below the level: not logged
    (record,) = caplog.records
    assert (record.name, record.message, record.method, record.code, record.duration_ms) == (
        logs.ACCESS, "rpc", ACCESS_RECORD["method"], "OK", 2.5)
