"""The Envoy sidecar's preStop hook, run as the manifest has it against the real Envoy with
envoy/envoy.yaml in front of a real server: afterwards Envoy reports not ready (so the pod leaves
the load balancer) and tells keep-alive clients to go (`Connection: close`), while still serving."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import time

import pytest

from tests.support import deploy as support
from tests.support.stack import Envoy, http_status, running_stack


@pytest.fixture
def stack(tmp_path, keys_dir):
    with running_stack(tmp_path, keys_dir) as (_, envoy):
        yield envoy


def _prestop_command(admin: str) -> list[str]:
    pod = support.find(support.render_k8s(), "Deployment", "payments")["spec"]["template"]["spec"]
    command = support.container(pod, "envoy")["lifecycle"]["preStop"]["exec"]["command"]
    host, port = admin.rsplit(":", 1)
    needle = f"/dev/tcp/127.0.0.1/{support.envoy_admin_port()}"
    assert needle in command[-1]
    return [*command[:-1], command[-1].replace(needle, f"/dev/tcp/{host}/{port}")]


def _get(envoy: Envoy, path: str) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=5)
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_prestop_hook_drains_envoy(stack):
    before = _get(stack, "/v1/payments")
    assert before.status == 401 and before.getheader("connection") != "close"
    assert http_status(f"{stack.url}/ready") == 200

    hook = subprocess.Popen(_prestop_command(stack.admin), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while http_status(f"{stack.url}/ready") != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http_status(f"{stack.url}/ready") == 503
        # Still serving during the drain, but every response now closes its connection.
        after = _get(stack, "/v1/payments")
        assert after.status == 401 and after.getheader("connection") == "close"
        # The hook keeps running (its sleep) so that Kubernetes waits before stopping Envoy.
        assert hook.poll() is None, hook.stderr.read()
    finally:
        if hook.poll() is None:
            os.killpg(hook.pid, signal.SIGKILL)
        hook.wait()
