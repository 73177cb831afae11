"""The server as it really runs (`python -m server`, the entry point of `make run` and the image):
JSON logs, grpcurl through reflection, graceful SIGTERM."""

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from devstack.stack import free_port
from tests.conftest import ALICE, ROOT, seed_accounts_into

GRPCURL = ROOT / ".tools" / "bin" / "grpcurl"


@pytest.fixture
def server_process(settings, tmp_path):
    proc = start_server_process(settings, tmp_path)
    yield proc
    proc.channel.close()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def start_server_process(settings, tmp_path, **more_env: str) -> subprocess.Popen:
    port = free_port()
    env = {
        **os.environ,
        "PAYMENTS_LISTEN_ADDR": f"127.0.0.1:{port}",
        "DATABASE_URL": settings.database_url,
        "PAYMENTS_DATA_DIR": str(settings.data_dir),
        "PAYMENTS_JWT_PRIVATE_KEY_FILE": str(settings.jwt_private_key_file),
        "PAYMENTS_JWKS_FILE": str(settings.jwks_file),
        "PAYMENTS_JOBS_ENABLED": "false",
        "PAYMENTS_GRACE_SECONDS": "5",
        "PAYMENTS_ADMIN_PASSWORD": "admin password do not log",
        "PAYMENTS_ADMIN_EMAIL": "root@example.com",
        "PAYMENTS_PROCESSES": "1",  # one process here; several: test_processes.py
        "PAYMENTS_METRICS_ADDR": "127.0.0.1:0",
        **more_env,
    }
    log = tmp_path / "server.log"
    proc = subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=open(log, "w"))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=20)
    except grpc.FutureTimeoutError:
        proc.kill()
        pytest.fail("server did not start:\n" + log.read_text())
    seed_accounts_into(settings)  # the sessions behind token_for's tokens
    proc.port, proc.channel, proc.log = port, channel, log
    return proc


def log_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("backend", ["sqlite"])
def test_logs_are_json_lines_with_method_code_duration_and_no_secrets(server_process, token_for):
    stub = pb_stub(server_process.channel)
    stub.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email="alice@example.com", amount=5)),
                       metadata=(("authorization", f"Bearer {token_for(ALICE)}"),))
    with pytest.raises(grpc.RpcError):
        stub.GetPayment(pb.GetPaymentRequest(id="pay_nope"))
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health_pb2_grpc.HealthStub(server_process.channel).Check(health_pb2.HealthCheckRequest())
    server_process.send_signal(signal.SIGTERM)
    assert server_process.wait(timeout=15) == 0
    lines = log_lines(server_process.log)
    rpcs = [line for line in lines if line["message"] == "rpc"]
    assert {"method": "/payments.v1.PaymentService/CreatePayment", "code": "OK"}.items() <= rpcs[0].items()
    assert {"method": "/payments.v1.PaymentService/GetPayment", "code": "UNAUTHENTICATED"}.items() <= rpcs[1].items()
    assert all(isinstance(r["duration_ms"], float) for r in rpcs)
    assert not [r for r in rpcs if "Health" in r["method"]], "health checks are logged only at DEBUG"
    text = server_process.log.read_text()
    assert token_for(ALICE).split(".")[2] not in text and "admin password do not log" not in text


def test_a_debug_log_holds_no_password_hash_token_or_secret(settings, tmp_path):
    """PAYMENTS_LOG_LEVEL=DEBUG, SQL statements logged and all: register, log in, refresh, log in
    as the admin, create a webhook endpoint and let the job deliver to it, create a service client,
    rotate its secret, get tokens with the old and the new secret and a wrong one, log out; no
    password, argon2 hash, refresh token (or its hash), access token, webhook secret, client secret
    (or its hash) is in the log."""
    from server.edge.pb import payments_pb2_grpc
    from devstack.webhook_receiver import FAST_WEBHOOKS, Receiver

    receiver = Receiver()
    proc = start_server_process(settings, tmp_path, PAYMENTS_LOG_LEVEL="DEBUG", **FAST_WEBHOOKS)
    try:
        auth = payments_pb2_grpc.AuthServiceStub(proc.channel)
        password = "a customer's secret password"
        auth.Register(pb.RegisterRequest(email="debug@example.com", password=password))
        login = auth.Login(pb.LoginRequest(email="debug@example.com", password=password))
        with pytest.raises(grpc.RpcError):
            auth.Login(pb.LoginRequest(email="debug@example.com", password="a wrong password guess"))
        refreshed = auth.Refresh(pb.RefreshRequest(refresh_token=login.refresh_token))
        admin = auth.Login(pb.LoginRequest(email="root@example.com", password="admin password do not log"))
        md = (("authorization", f"Bearer {admin.access_token}"),)
        made = payments_pb2_grpc.WebhookServiceStub(proc.channel).CreateWebhookEndpoint(
            pb.CreateWebhookEndpointRequest(endpoint=pb.WebhookEndpoint(url=receiver.url, event_types=["*"],
                                                                         enabled=True)), metadata=md)
        receiver.secret = made.secret
        pb_stub(proc.channel).CreatePayment(
            pb.CreatePaymentRequest(payment=pb.Payment(email="debug@example.com", amount=5)), metadata=md)
        receiver.wait_for(lambda r: r.events, what="the payment's event")
        clients = payments_pb2_grpc.ClientServiceStub(proc.channel)
        tokens = payments_pb2_grpc.TokenServiceStub(proc.channel)
        client = clients.CreateClient(pb.CreateClientRequest(client=pb.Client(name="shop", permissions=[
            "payments.read"])), metadata=md)
        rotated = clients.RotateClientSecret(pb.RotateClientSecretRequest(id=client.client.id), metadata=md)
        grants = [tokens.CreateToken(pb.CreateTokenRequest(grant_type="client_credentials", client_id=client.client.id,
                                                           client_secret=secret)) for secret in (client.secret,
                                                                                                  rotated.secret)]
        with pytest.raises(grpc.RpcError):
            tokens.CreateToken(pb.CreateTokenRequest(grant_type="client_credentials", client_id=client.client.id,
                                                     client_secret="pmt_cs_a wrong guess do not log"))
        pb_stub(proc.channel).ListPayments(pb.ListPaymentsRequest(),
                                           metadata=(("authorization", f"Bearer {grants[1].access_token}"),))
        auth.Logout(pb.LogoutRequest(), metadata=(("authorization", f"Bearer {refreshed.access_token}"),))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        receiver.stop()
        proc.channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = proc.log.read_text()
    lines = log_lines(proc.log)
    statements = [line["message"] for line in lines if line.get("logger") == "peewee"]
    assert any('"users"' in sql for sql in statements), "no SQL at DEBUG: the test would prove nothing"
    secrets = {
        "customer password": password, "admin password": "admin password do not log",
        "wrong password": "a wrong password guess", "argon2 hash": "$argon2",
        "refresh token": login.refresh_token, "refreshed refresh token": refreshed.refresh_token,
        "refresh token hash": hashlib.sha256(login.refresh_token.encode()).hexdigest(),
        "access token": login.access_token.split(".")[2], "admin access token": admin.access_token.split(".")[2],
        "webhook secret": made.secret,
        "client secret": client.secret, "rotated client secret": rotated.secret,
        "client secret's random part": client.secret[len("pmt_cs_"):],
        "wrong client secret": "pmt_cs_a wrong guess do not log",
        "client secret hash": hmac.new(client.client.id.encode(), client.secret.encode(), hashlib.sha256).hexdigest(),
        "client access token": grants[0].access_token.split(".")[2],
    }
    assert not [name for name, secret in secrets.items() if secret in text], text[-3000:]


def pb_stub(channel):
    from server.edge.pb import payments_pb2_grpc

    return payments_pb2_grpc.PaymentServiceStub(channel)


def test_sigterm_drains_in_flight_calls_and_exits_zero(server_process, settings, token_for):
    """SIGTERM under load: the process exits 0, callers see only retryable codes, and every create
    that was acknowledged is in the database.

    grpc core answers calls it had received but not yet handed to the application with CANCELLED
    once shutdown starts, so CANCELLED is retryable here too (an idempotent retry with the same
    request_id is always safe)."""
    stub = pb_stub(server_process.channel)
    md = (("authorization", f"Bearer {token_for(ALICE)}"),)
    results, errors = [], []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                results.append(stub.CreatePayment(pb.CreatePaymentRequest(
                    payment=pb.Payment(email="alice@example.com", amount=5)), metadata=md, timeout=10))
            except grpc.RpcError as e:
                errors.append(e.code())
                return

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    server_process.send_signal(signal.SIGTERM)
    assert server_process.wait(timeout=20) == 0
    stop.set()
    for w in workers:
        w.join(10)
    assert results, "calls completed before the drain"
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, errors
    assert any(line["message"] == "shutting down" for line in log_lines(server_process.log))
    from server.infra import storage
    from server.infra.storage import Payment

    storage.open_database(settings)
    stored = {row.id for row in Payment.select(Payment.id)}
    assert {r.id for r in results} <= stored


@pytest.mark.parametrize("backend", ["sqlite"])
def test_one_connection_carries_more_calls_than_its_stream_limit(server_process, token_for):
    """A client's connection (and each of Envoy's to the server) lives for hours, and grpc counts a
    call's stream against the connection's limit (app.HTTP2_FLOOD_LIMITS) until the server lets go
    of the call: calls held a few seconds too long once refused every call after the 4,096th."""
    import collections
    from concurrent import futures

    from server.edge.app import HTTP2_FLOOD_LIMITS
    from server.edge.pb import payments_pb2_grpc as pb_grpc

    calls = dict(HTTP2_FLOOD_LIMITS)["grpc.max_concurrent_streams"] + 1000
    stub = pb_grpc.PaymentServiceStub(server_process.channel)
    md = (("authorization", f"Bearer {token_for(ALICE)}"),)

    def call(_) -> str:
        try:
            stub.GetPayment(pb.GetPaymentRequest(id="pay_nothing_here"), metadata=md, timeout=10)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name

    with futures.ThreadPoolExecutor(8) as pool:
        codes = collections.Counter(pool.map(call, range(calls)))
    assert codes == {"NOT_FOUND": calls}, codes


def test_grpcurl_lists_describes_and_calls_through_reflection(server_process, token_for):
    addr = f"127.0.0.1:{server_process.port}"

    def grpcurl(*args):
        out = subprocess.run([str(GRPCURL), "-plaintext", *args], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout

    services = grpcurl(addr, "list").split()
    assert {"payments.v1.PaymentService", "payments.v1.AuthService", "payments.v1.WebhookService", "grpc.health.v1.Health"} <= set(services)
    described = grpcurl(addr, "describe", "payments.v1.PaymentService")
    assert "rpc CreatePayment" in described and "rpc ConfirmPayment" in described
    # The REST mapping stays; the OpenAPI annotations (pages of examples) are not served.
    assert "google.api.http" in described and "openapiv2" not in described and len(described) < 6000, described[:2000]
    message = grpcurl(addr, "describe", "payments.v1.Payment")
    assert "int64 amount" in message and "openapiv2" not in message
    auth = f"authorization: Bearer {token_for(ALICE)}"
    created = json.loads(grpcurl("-H", auth, "-d", json.dumps({"payment": {"email": "alice@example.com", "amount": "2500"}}),
                                 addr, "payments.v1.PaymentService/CreatePayment"))
    assert created["status"] == "PENDING" and created["amount"] == "2500"
    got = json.loads(grpcurl("-H", auth, "-d", json.dumps({"id": created["id"]}), addr, "payments.v1.PaymentService/GetPayment"))
    assert got["id"] == created["id"]
    denied = subprocess.run([str(GRPCURL), "-plaintext", "-d", json.dumps({"id": created["id"]}), addr,
                             "payments.v1.PaymentService/GetPayment"], capture_output=True, text=True, timeout=30)
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr


def test_bad_configuration_stops_start_up_with_a_message():
    out = subprocess.run([sys.executable, "-m", "server"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PAYMENTS_WORKER_THREADS": "zero"})
    assert out.returncode == 2 and "PAYMENTS_WORKER_THREADS must be an integer" in out.stderr
