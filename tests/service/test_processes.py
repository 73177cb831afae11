"""Several server processes (PAYMENTS_PROCESSES; server/edge/processes.py) behind the real Envoy:
the load spreads over them request by request, what one process issued (a page token) is good in
another, a process that dies is replaced while the others serve, and SIGTERM drains them all."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import time
import urllib.request

import pytest

from devstack.stack import free_ports, port_in_use
from tests.support.rest import Client, loopback_address
from tests.support.stack import Envoy, Server, prepare_workdir, server_env

PROCESSES = 2
PASSWORD = "correct horse battery"


@pytest.fixture
def stack(tmp_path, keys_dir):
    prepare_workdir(tmp_path, keys_dir)
    base = free_ports(PROCESSES)
    env = server_env(tmp_path, PAYMENTS_PROCESSES=str(PROCESSES), PAYMENTS_LISTEN_ADDR=f"127.0.0.1:{base}")
    server = Server.start(tmp_path, env)
    try:
        assert server.ports == [base + i for i in range(PROCESSES)]
        envoy = Envoy.start(tmp_path, server.ports)
        try:
            yield server, envoy
        finally:
            envoy.stop()
    finally:
        server.stop()


def signed_in(api: Client) -> tuple[Client, str, str]:
    me = api.from_address(loopback_address())
    email = f"buyer-{os.urandom(4).hex()}@example.com"
    assert me.post("/v1/auth/register", {"email": email, "password": PASSWORD}).status == 200
    return me, me.post("/v1/auth/login", {"email": email, "password": PASSWORD}).json["access_token"], email


def served_by_process(envoy: Envoy) -> dict[int, int]:
    """Envoy's count of successful requests per server port on the payments cluster."""
    with urllib.request.urlopen(f"http://{envoy.admin}/clusters", timeout=5) as r:
        text = r.read().decode()
    return {int(port): int(n) for port, n in re.findall(r"^payments_grpc::127\.0\.0\.1:(\d+)::rq_success::(\d+)$", text, re.M)}


def test_the_load_spreads_over_every_process_request_by_request(stack):
    server, envoy = stack
    me, token, email = signed_in(Client(envoy.url))
    created = me.post("/v1/payments", {"email": email, "amount": "1250"}, token=token).json["id"]
    before = served_by_process(envoy)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # 8 clients, a handful of Envoy's connections
        statuses = list(pool.map(lambda _: me.get(f"/v1/payments/{created}", token=token).status, range(400)))
    assert statuses == [200] * 400
    after = served_by_process(envoy)
    served = {port: after.get(port, 0) - before.get(port, 0) for port in server.ports}
    assert sum(served.values()) >= 400, served
    for port, n in served.items():  # round robin over healthy endpoints: about half each
        assert n >= 400 / PROCESSES * 0.4, served
    print(f"requests per process: {served}")


def test_page_tokens_from_one_process_are_good_in_the_others(stack):
    _, envoy = stack
    me, token, email = signed_in(Client(envoy.url))
    for n in range(6):
        assert me.post("/v1/payments", {"email": email, "amount": str(100 + n)}, token=token).status == 200
    seen, page_token = [], ""
    for _ in range(10):  # six pages of one, each request to whichever process Envoy picks
        page = me.get(f"/v1/payments?page_size=1&page_token={page_token}", token=token)
        assert page.status == 200, page.text
        seen += [p["id"] for p in page.json.get("payments", [])]
        page_token = page.json.get("next_page_token", "")
        if not page_token:
            break
    assert len(seen) == len(set(seen)) == 6


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_a_process_that_dies_is_replaced_while_the_others_serve(stack):
    server, envoy = stack
    me, token, email = signed_in(Client(envoy.url))
    created = me.post("/v1/payments", {"email": email, "amount": "1250"}, token=token).json["id"]
    victims = _children(server.proc.pid)
    assert len(victims) == PROCESSES
    os.kill(victims[-1], signal.SIGKILL)
    # Meanwhile every call is answered.
    deadline = time.monotonic() + 20
    failures = 0
    while time.monotonic() < deadline:
        failures += me.get(f"/v1/payments/{created}", token=token).status != 200
        children = _children(server.proc.pid)
        if len(children) == PROCESSES and victims[-1] not in children and \
                all(port_in_use("127.0.0.1", p) for p in server.ports):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the dead process was not replaced")
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    assert any(line["message"] == "server process exited; starting another" for line in lines)
    # Envoy sends what the dead process refused to another one (retry_policy: connect-failure);
    # only a call already written to the dead process's connection before Envoy saw it close can fail.
    assert failures <= 1, failures
    # The new process serves again.
    deadline = time.monotonic() + 15
    while True:
        before = served_by_process(envoy).get(server.ports[-1], 0)
        for _ in range(20):
            assert me.get(f"/v1/payments/{created}", token=token).status == 200
        if served_by_process(envoy).get(server.ports[-1], 0) > before:
            break
        assert time.monotonic() < deadline, "the replacement never served"
        time.sleep(0.5)


def test_sigterm_drains_every_process_and_exits_zero(stack):
    server, _ = stack
    children = _children(server.proc.pid)
    assert len(children) == PROCESSES
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    for pid in children:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    assert sum(line["message"] == "stopped" for line in lines) == PROCESSES
    assert lines[-1]["message"] == "server processes stopped"
