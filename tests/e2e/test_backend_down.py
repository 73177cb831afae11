"""When the server goes away, Envoy says so: /ready turns 503, and calls get UNAVAILABLE as the
same JSON error shape (REST) or a gRPC status (native). Uses a stack of its own to stop."""

from __future__ import annotations

import time

import pytest

from tests.support.rest import Client
from tests.support.stack import http_status, running_stack


@pytest.fixture
def doomed_stack(tmp_path, keys_dir):
    with running_stack(tmp_path, keys_dir) as (server, envoy):
        yield server, envoy


def test_ready_follows_backend_health_and_errors_stay_json(doomed_stack):
    server, envoy = doomed_stack
    api = Client(envoy.url)
    assert api.get("/ready").status == 200
    server.stop()

    deadline = time.monotonic() + 30  # health checks run every few seconds
    while http_status(f"{envoy.url}/ready") != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    ready = api.get("/ready")
    assert ready.status == 503
    assert ready.error()[:2] == (14, "BACKEND_UNAVAILABLE")

    r = api.post("/v1/auth/login", {"email": "someone@example.com", "password": "whatever password"})
    assert r.status == 503
    assert r.error()[:2] == (14, "BACKEND_UNAVAILABLE")
