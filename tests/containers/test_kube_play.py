"""`podman kube play` of what kustomize renders for the API Deployment (k8s/base): the manifest's
containers, environment, ConfigMaps, Secret references, securityContexts and resources, with only
what a test cluster would change: the images are the local builds, the Secrets are a test's own, one
replica, and the pod's ports published on loopback (a cluster's Service does that part)."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest
import yaml

from server.infra import tokens
from tests.containers.conftest import ADMIN_EMAIL, ADMIN_PASSWORD
from tests.support import deploy
from devstack.containers import IMAGES, free_port, grpc_health, wait_ready
from tests.support.rest import Client

ROOT = Path(__file__).resolve().parents[2]


def played_objects(api_port: int, grpc_port: int) -> list[dict]:
    objects = deploy.render_k8s(ROOT / "k8s" / "base")
    deployment = deploy.find(objects, "Deployment", "payments")
    deployment["spec"]["replicas"] = 1
    spec = deployment["spec"]["template"]["spec"]
    for c in spec["containers"]:
        c["image"] = IMAGES[c["name"]]
        for port in c["ports"]:
            published = {8080: api_port, 50051: grpc_port}  # the metrics port stays unpublished
            if port["containerPort"] in published:
                port.update(hostIP="127.0.0.1", hostPort=published[port["containerPort"]])
    for volume in spec["volumes"]:
        if "secret" in volume:
            # podman 4.3 dereferences `optional` without a default (containers/podman#16636); false
            # is what Kubernetes assumes when it is left out.
            volume["secret"].setdefault("optional", False)
    configs = [o for o in objects if o["kind"] == "ConfigMap"
               and any(o["metadata"]["name"] == ref["configMapRef"]["name"]
                       for c in spec["containers"] for ref in c.get("envFrom", []))]
    return [*configs, deployment]


def create_secrets(podman, keys: Path) -> dict[str, str]:
    """The two Secrets k8s/base expects, as podman secrets in the forms podman 4.3's kube play reads:
    a Secret used as a volume as a Secret object whose data it writes out as given (so: not base64);
    a Secret read by secretKeyRef as a flat JSON map of base64 values."""
    jwt = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "payments-jwt"},
           "data": {name: (keys / name).read_text() for name in ("jwt-private.pem", "jwks.json")}}
    env = {"database-url": "sqlite:///data/payments.db", "page-token-secret": uuid.uuid4().hex,
           "admin-email": ADMIN_EMAIL, "admin-password": ADMIN_PASSWORD}
    flat = {k: base64.b64encode(v.encode()).decode() for k, v in env.items()}
    for name, content in (("payments-jwt", jwt), ("payments", flat)):
        podman("secret", "rm", name, check=False)
        podman("secret", "create", name, "-", input=json.dumps(content))
    return env


@pytest.fixture
def played(podman, images, tmp_path):
    tokens.create_key_pair(tmp_path / "jwt-private.pem", tmp_path / "jwks.json")
    create_secrets(podman, tmp_path)
    api_port, grpc_port = free_port(), free_port()
    manifest = tmp_path / "played.yaml"
    manifest.write_text(yaml.safe_dump_all(played_objects(api_port, grpc_port)))
    podman("kube", "play", str(manifest), timeout=180)
    try:
        wait_ready(f"http://127.0.0.1:{api_port}/ready", timeout=90)
        yield api_port, grpc_port
    finally:
        podman("kube", "down", str(manifest), check=False, timeout=120)
        podman("secret", "rm", "payments-jwt", "payments", check=False)
        podman("volume", "rm", "-f", "payments-jwt", check=False)


def test_the_rendered_deployment_plays_healthy_and_serves(podman, played):
    api_port, grpc_port = played
    assert grpc_health(f"127.0.0.1:{grpc_port}") == "SERVING"

    api = Client(f"http://127.0.0.1:{api_port}")
    login = api.post("/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert login.status == 200, login.text  # the admin from the Secret, through secretKeyRef
    token = login.json["access_token"]  # signed with the key from the Secret volume
    email = f"kube-{uuid.uuid4().hex[:8]}@example.com"
    assert api.post("/v1/auth/register", {"email": email, "password": "correct horse battery"}).status == 200
    created = api.post("/v1/payments", {"email": email, "amount": "42", "currency": "CHF"}, token=token)
    assert created.status == 200, created.text
    assert api.get(f"/v1/payments/{created.json['id']}", token=token).json["amount"] == "42"

    # The pod's containers run as the manifest's securityContexts have them.
    pod = next(p for p in json.loads(podman("pod", "ps", "--format", "json").stdout) if p["Name"].startswith("payments-pod"))
    for name, uid in (("server", 10001), ("envoy", 101)):
        info = podman.inspect(f"{pod['Name']}-{name}")
        assert info["Config"]["User"].split(":")[0] == str(uid)
        assert info["HostConfig"]["ReadonlyRootfs"] is True
        assert info["EffectiveCaps"] in (None, [])
