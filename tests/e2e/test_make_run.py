"""`make run`'s launcher (devstack/__main__.py) on its real fixed ports (50051, 8080, 9901, 8081).

It runs in a network namespace of its own (`unshare -n`, root), so the fixed ports never clash with
a developer's `make run` or with concurrent test runs; checks run inside the namespace (nsenter)
with the real clients a user would use: curl and grpcurl.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

GRPCURL = ROOT / ".tools" / "bin" / "grpcurl"


@pytest.fixture
def stack(tmp_path):
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run as root: this test needs a private network namespace")
        pytest.skip("needs root for a private network namespace (CI runs as root)")
    log = tmp_path / "run.log"
    env = {**os.environ, "PAYMENTS_DATA_DIR": str(tmp_path / "data"), "PAYMENTS_JOBS_ENABLED": "false"}
    env.pop("DATABASE_URL", None)
    proc = subprocess.Popen(
        ["unshare", "-n", "--", "sh", "-c", f"ip link set lo up && exec {sys.executable} -m devstack"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
    )
    deadline = time.monotonic() + 90
    while "Ctrl-C stops everything" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("make run's stack did not become ready:\n" + log.read_text()[-3000:])
        time.sleep(0.2)
    proc.log = log
    yield proc
    if proc.poll() is None:  # as Ctrl-C would (the stack stops its server and Envoy), then for good
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def inside(stack, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(stack.pid), "-n", *cmd], capture_output=True, text=True, timeout=30)


def test_make_run_serves_rest_grpc_and_swagger_ui_and_stops_cleanly(stack):
    printed = stack.log.read_text()
    for url in ("http://127.0.0.1:8080", "127.0.0.1:50051", "http://127.0.0.1:8081/ui/", "http://127.0.0.1:9901"):
        assert url in printed

    ready = inside(stack, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:8080/ready")
    assert ready.stdout == "200"
    ui = inside(stack, "curl", "-sf", "http://127.0.0.1:8081/ui/")
    assert ui.returncode == 0 and "swagger" in ui.stdout.lower()
    doc = inside(stack, "curl", "-sf", "http://127.0.0.1:8081/payments.swagger.json")
    assert json.loads(doc.stdout)["info"]["title"]
    register = inside(stack, "curl", "-s", "-H", "content-type: application/json", "-d",
                      json.dumps({"email": "runner@example.com", "password": "correct horse battery"}),
                      "http://127.0.0.1:8080/v1/auth/register")
    assert json.loads(register.stdout)["role"] == "customer"
    login = inside(stack, "curl", "-s", "-H", "content-type: application/json", "-d",
                   json.dumps({"email": "runner@example.com", "password": "correct horse battery"}),
                   "http://127.0.0.1:8080/v1/auth/login")
    token = json.loads(login.stdout)["access_token"]
    # Reflection through Envoy needs a token; on the server's own port it does not.
    listed = inside(stack, str(GRPCURL), "-plaintext", "-H", f"authorization: Bearer {token}", "127.0.0.1:8080", "list")
    assert "payments.v1.PaymentService" in listed.stdout.split()
    # The local Swagger UI's origin is the one CORS origin make run allows.
    preflight = inside(stack, "curl", "-s", "-i", "-X", "OPTIONS", "-H", "Origin: http://127.0.0.1:8081",
                       "-H", "Access-Control-Request-Method: POST", "http://127.0.0.1:8080/v1/auth/login")
    assert "access-control-allow-origin: http://127.0.0.1:8081" in preflight.stdout.lower()
    direct = inside(stack, str(GRPCURL), "-plaintext", "127.0.0.1:50051", "list")
    assert "payments.v1.AuthService" in direct.stdout.split()

    # The API listens on loopback only: a dev stack (with a dev admin) is not for the LAN.
    listeners = inside(stack, "curl", "-sf", "http://127.0.0.1:9901/listeners?format=json")
    addresses = {s["local_address"]["socket_address"]["address"] for s in json.loads(listeners.stdout)["listener_statuses"]}
    assert addresses == {"127.0.0.1"}

    stack.send_signal(signal.SIGINT)
    assert stack.wait(timeout=40) == 0
    assert "stopped" in stack.log.read_text()


def readme_blocks(title: str) -> list[str]:
    """The shell blocks of a README section, as written."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```sh\n(.*?)^```", section, flags=re.M | re.S)


def quick_start_blocks() -> list[str]:
    """The shell blocks of the README's "Quick start" section, as written."""
    blocks = readme_blocks("Quick start")
    assert len(blocks) >= 2, "the quick start has a REST and a gRPC block"
    return blocks


def test_the_readme_quick_start_runs_as_written(stack, tmp_path):
    """Every command of the quick start, top to bottom in one shell, against a fresh `make run`;
    any failing command (a login without a token, an HTTP error from the helper) stops it."""
    script = tmp_path / "quick-start.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(quick_start_blocks()))
    env = {**os.environ, "PAYMENTS_DATA_DIR": str(tmp_path / "data")}  # the stack's database, as make run's would be
    done = subprocess.run(["nsenter", "-t", str(stack.pid), "-n", "bash", str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert '"role":"customer"' in out.replace(" ", "") and "admin admin@example.com" in out
    assert '"status":"SUCCESS"' in out.replace(" ", "")  # confirmed by the admin
    assert '"refunded_amount":"50000"' in out.replace(" ", "")  # refunded in part, still SUCCESS
    assert '"reason":"REQUESTED_BY_CUSTOMER"' in out.replace(" ", "")  # the refund, listed and read
    assert '"failure_reason":"CANCELLED"' in out.replace(" ", "")  # the second one, cancelled
    assert "payments.v1.PaymentService" in out and '"amount": "150000"' in out  # grpcurl list and Get


def test_the_readme_service_clients_section_runs_as_written(stack, tmp_path):
    """The quick start, then the "Service clients" steps in the same shell: create a client, get a
    token with curl, call over REST and grpcurl, a call outside its permissions refused, rotate,
    revoke."""
    blocks = readme_blocks("Service clients")
    assert len(blocks) == 1
    script = tmp_path / "service-clients.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(quick_start_blocks() + blocks))
    env = {**os.environ, "PAYMENTS_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run(["nsenter", "-t", str(stack.pid), "-n", "bash", str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout.replace(" ", "")
    assert '"amount":"250000"' in out  # grpcurl read the client's payment
    assert '"reason":"PERMISSION_MISSING"' in out and '"permission":"payments.confirm"' in out
    assert '"previous_secret_expires_at"' in out and '"revoked_at"' in out
    assert "pmt_cs_" in out  # the rotated secret, shown once
