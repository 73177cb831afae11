"""cloudrun/payments.yaml's containers run as one podman pod, as Cloud Run runs them: the images
built here, each container's environment and mounts from the file (Secret Manager secrets replaced
by a test's files and values), the server started first and Envoy once the server's startup probe
passes (container-dependencies), and clients speaking to the ingress port as Cloud Run's front end
does: HTTP/2 cleartext. The database is SQLite here, the one thing that differs (no Cloud SQL)."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from server.infra import tokens
from devstack.containers import GRPCURL, IMAGES, free_port, grpc_health, wait_ready

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"


def secret_values() -> dict[str, str]:
    return {"payments-database-url": "sqlite:///data/payments.db", "payments-page-token-secret": uuid.uuid4().hex,
            "payments-admin-password": "a long admin password"}


@pytest.fixture(scope="module")
def cloudrun_pod(podman, images, tmp_path_factory):
    work = tmp_path_factory.mktemp("cloudrun")
    service = yaml.safe_load((ROOT / "cloudrun" / "payments.yaml").read_text())
    template = service["spec"]["template"]
    spec = template["spec"]
    # The secret volumes as files: a key pair made for the test.
    tokens.create_key_pair(work / "jwt-private.pem", work / "jwks.json")
    for volume in spec["volumes"]:
        directory = work / volume["name"]
        directory.mkdir()
        for item in volume["secret"]["items"]:
            (directory / item["path"]).write_bytes((work / item["path"]).read_bytes())
            (directory / item["path"]).chmod(0o444)
    values = secret_values()
    containers = {c["name"]: c for c in spec["containers"]}
    ports = {"ingress": free_port(), "server": free_port()}
    name = f"payments-run-{uuid.uuid4().hex[:8]}"
    ingress_port = containers["envoy"]["ports"][0]["containerPort"]
    server_port = containers["server"]["startupProbe"]["grpc"]["port"]
    podman("pod", "create", "--name", name, "-p", f"127.0.0.1:{ports['ingress']}:{ingress_port}",
           "-p", f"127.0.0.1:{ports['server']}:{server_port}")

    def run(container: dict) -> None:
        args = []
        for e in container.get("env", []):
            value = e["value"] if "value" in e else values[e["valueFrom"]["secretKeyRef"]["name"]]
            args.append(f"--env={e['name']}={value}")
        for m in container.get("volumeMounts", []):
            args += ["-v", f"{work / m['name']}:{m['mountPath']}:ro"]
        podman("run", "-d", "--pod", name, "--name", f"{name}-{container['name']}", *args,
               IMAGES[container["name"]], *container.get("args", []))

    order = json.loads(template["metadata"]["annotations"]["run.googleapis.com/container-dependencies"])
    assert order == {"envoy": ["server"]}
    try:
        run(containers["server"])
        deadline = time.monotonic() + 30
        while grpc_health(f"127.0.0.1:{ports['server']}") is None:
            assert time.monotonic() < deadline, podman("logs", f"{name}-server").stderr[-2000:]
            time.sleep(0.3)
        run(containers["envoy"])
        wait_ready(f"http://127.0.0.1:{ports['ingress']}/ready", timeout=30)
        yield f"127.0.0.1:{ports['ingress']}", values
    finally:
        podman("pod", "rm", "-f", "-t", "2", name, check=False)


def h2c(*args: str) -> tuple[int, dict, str]:
    out = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-o", "-", "-w", "\n%{http_code} %{http_version}", *args],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    body, _, tail = out.rpartition("\n")
    status, version = tail.split()
    return int(status), json.loads(body) if body.strip() else {}, version


def test_rest_over_h2c_through_the_ingress_container(cloudrun_pod):
    addr, values = cloudrun_pod
    email = f"run-{uuid.uuid4().hex[:8]}@example.com"
    body = json.dumps({"email": email, "password": PASSWORD})
    status, _, version = h2c("-H", "content-type: application/json", "-d", body, f"http://{addr}/v1/auth/register")
    assert (status, version) == (200, "2")
    status, login, _ = h2c("-H", "content-type: application/json", "-d", body, f"http://{addr}/v1/auth/login")
    assert status == 200, login
    token = login["access_token"]  # signed with the key mounted at PAYMENTS_JWT_PRIVATE_KEY_FILE
    status, payment, _ = h2c("-H", f"authorization: Bearer {token}", "-H", "content-type: application/json",
                             "-d", json.dumps({"email": email, "amount": "2500", "currency": "EUR"}),
                             f"http://{addr}/v1/payments")
    assert status == 200 and payment["status"] == "PENDING", payment
    # The admin from the file's PAYMENTS_ADMIN_EMAIL, with the password from its secret.
    status, admin, _ = h2c("-H", "content-type: application/json", "-d",
                           json.dumps({"email": "ops@example.com", "password": values["payments-admin-password"]}),
                           f"http://{addr}/v1/auth/login")
    assert status == 200, admin
    status, confirmed, _ = h2c("-X", "POST", "-H", f"authorization: Bearer {admin['access_token']}",
                               "-H", "content-type: application/json", "-d", "{}",
                               f"http://{addr}/v1/payments/{payment['id']}:confirm")
    assert status == 200 and confirmed["status"] == "SUCCESS", confirmed


def test_native_grpc_with_reflection_through_the_ingress_container(cloudrun_pod):
    addr, _ = cloudrun_pod
    email = f"run-{uuid.uuid4().hex[:8]}@example.com"
    body = json.dumps({"email": email, "password": PASSWORD})
    # Signing up needs no token, but reflection at the edge does: the first calls name their schema.
    schema = ["-protoset", str(ROOT / "gen" / "payments.pb")]
    subprocess.run([GRPCURL, "-plaintext", *schema, "-d", body, addr, "payments.v1.AuthService/Register"],
                   check=True, capture_output=True, timeout=30)
    login = subprocess.run([GRPCURL, "-plaintext", *schema, "-d", body, addr, "payments.v1.AuthService/Login"],
                           check=True, capture_output=True, text=True, timeout=30)
    token = json.loads(login.stdout)["accessToken"]
    listed = subprocess.run([GRPCURL, "-plaintext", "-H", f"authorization: Bearer {token}", addr, "list"],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert "payments.v1.PaymentService" in listed.stdout.split()
