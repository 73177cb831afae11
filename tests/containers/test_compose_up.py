"""docker-compose.yml brought up for real with podman-compose (from the lock): the default profile
(SQLite in its volume) and the PostgreSQL profile, on the ports the file publishes.

The file names postgres:16-alpine, which Docker Hub would serve; here the profile runs against
tests/support/postgres-standin (Debian's PostgreSQL with the official image's interface), given as
POSTGRES_IMAGE. podman 4.3 cannot wait for `service_healthy` (podman-compose says so and goes on),
so the test starts the database first and waits on its own healthcheck, as compose would."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from devstack.containers import wait_ready
from tests.support.rest import Client
from devstack.stack import port_in_use

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = str(ROOT / ".venv" / "bin" / "podman-compose")
API = "http://127.0.0.1:8080"
UI = "http://127.0.0.1:8081"
STANDIN = "localhost/payments-test-postgres-standin:15"
PG_URL = "postgresql://payments:payments@postgres:5432/payments"


@contextlib.contextmanager
def compose_up(podman, project: str, *, postgres: bool):
    assert not port_in_use("127.0.0.1", 8080) and not port_in_use("127.0.0.1", 8081), "the compose file publishes 8080 and 8081"
    env = {**podman.env, "DATABASE_URL": PG_URL if postgres else "", "POSTGRES_IMAGE": STANDIN,
           "PAYMENTS_ADMIN_EMAIL": "", "PAYMENTS_ADMIN_PASSWORD": ""}
    base = [COMPOSE, "-p", project, *(["--profile", "postgres"] if postgres else [])]

    def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run([*base, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"podman-compose {' '.join(args)}: {r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}")
        return r

    try:
        if postgres:
            run("up", "-d", "postgres")
            healthy(podman, f"{project}_postgres_1")
        run("up", "-d")
        wait_ready(f"{API}/ready", timeout=90)
        yield project
    finally:
        run("down", "-v", "-t", "5", check=False)


def healthy(podman, container: str, timeout: float = 60) -> None:
    """The service's own compose healthcheck, run the way the engine runs it."""
    deadline = time.monotonic() + timeout
    while podman("healthcheck", "run", container, check=False).returncode != 0:
        assert time.monotonic() < deadline, f"{container}: healthcheck did not pass within {timeout} s"
        time.sleep(1)


@pytest.fixture(scope="module")
def standin(podman, images):
    podman("build", "-q", "-t", STANDIN, str(ROOT / "tests" / "support" / "postgres-standin"), timeout=600)


def journey(api: Client) -> str:
    email = f"compose-{uuid.uuid4().hex[:8]}@example.com"
    assert api.post("/v1/auth/register", {"email": email, "password": "correct horse battery"}).status == 200
    login = api.post("/v1/auth/login", {"email": email, "password": "correct horse battery"})
    assert login.status == 200, login.text
    token = login.json["access_token"]
    created = api.post("/v1/payments", {"email": email, "amount": "1250", "currency": "GBP"}, token=token)
    assert created.status == 200, created.text
    got = api.get(f"/v1/payments/{created.json['id']}", token=token)
    assert got.status == 200 and got.json["amount"] == "1250"
    return created.json["id"]


def test_default_profile_serves_the_api_and_swagger_ui_on_sqlite(podman, images):
    project = f"ptest{uuid.uuid4().hex[:6]}"
    with compose_up(podman, project, postgres=False):
        healthy(podman, f"{project}_server_1")  # the compose file's gRPC healthcheck, for real
        journey(Client(API))
        files = podman("exec", f"{project}_server_1", "python", "-c",
                       "import os; print(sorted(os.listdir('/app/data')))").stdout
        assert "payments.db" in files

        assert subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", f"{UI}/ui/"],
                              capture_output=True, text=True, timeout=20).stdout == "200"
        # The page's default API address is its host on 8080, and Envoy lets that origin call it.
        preflight = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-D", "-", "-X", "OPTIONS", f"{API}/v1/payments",
             "-H", "Origin: http://localhost:8081", "-H", "Access-Control-Request-Method: POST",
             "-H", "Access-Control-Request-Headers: authorization,content-type"],
            capture_output=True, text=True, timeout=20).stdout.lower()
        assert "access-control-allow-origin: http://localhost:8081" in preflight, preflight


def test_postgres_profile_stores_payments_in_postgres(podman, images, standin):
    project = f"ptest{uuid.uuid4().hex[:6]}"
    with compose_up(podman, project, postgres=True):
        started = json.loads(next(line for line in podman("logs", f"{project}_server_1").stdout.splitlines()
                                  + podman("logs", f"{project}_server_1").stderr.splitlines()
                                  if '"listening"' in line))
        assert started["database"] == "postgresql"
        payment_id = journey(Client(API))
        rows = podman("exec", "-e", "PGPASSWORD=payments", f"{project}_postgres_1", "psql", "-h", "127.0.0.1",
                      "-U", "payments", "-d", "payments", "-tAc",
                      f"SELECT amount, currency FROM payments WHERE id = '{payment_id}'").stdout.split()
        assert rows == ["1250|GBP"]
