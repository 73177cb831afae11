"""cloudrun/payments.yaml, read as the Knative Service Cloud Run takes, and every invariant
docs/cloudrun.md relies on. tests/containers/test_cloudrun_pod.py runs its containers as a pod."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from server.infra import config
from tests.support import deploy as support
from tests.support.deploy import ROOT

SERVICE = ROOT / "cloudrun" / "payments.yaml"


@pytest.fixture(scope="module")
def service() -> dict:
    documents = list(yaml.safe_load_all(SERVICE.read_text()))
    assert len(documents) == 1
    return documents[0]


@pytest.fixture(scope="module")
def template(service) -> dict:
    return service["spec"]["template"]


def containers(template) -> dict[str, dict]:
    return {c["name"]: c for c in template["spec"]["containers"]}


def test_a_knative_serving_v1_service(service, template):
    assert (service["apiVersion"], service["kind"]) == ("serving.knative.dev/v1", "Service")
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", service["metadata"]["name"])
    assert set(service["spec"]) == {"template"}
    assert set(template) == {"metadata", "spec"}
    allowed = {"containers", "volumes", "serviceAccountName", "containerConcurrency", "timeoutSeconds"}
    assert set(template["spec"]) <= allowed
    for c in template["spec"]["containers"]:
        assert set(c) <= {"name", "image", "args", "ports", "env", "volumeMounts", "startupProbe", "livenessProbe",
                          "resources"}


def test_envoy_is_the_one_ingress_container_with_http2_end_to_end(template):
    with_ports = [c for c in template["spec"]["containers"] if c.get("ports")]
    assert [c["name"] for c in with_ports] == ["envoy"]
    (port,) = with_ports[0]["ports"]
    # h2c: Cloud Run speaks HTTP/2 cleartext to the container, so native gRPC works end to end.
    assert port == {"name": "h2c", "containerPort": support.envoy_listener_port()}
    assert with_ports[0]["image"].endswith("/payments/envoy:v1")


def test_envoy_runs_the_variant_that_reads_the_client_from_the_front_end(template):
    """Cloud Run's front end is Envoy's TCP peer: envoy-cloudrun.yaml trusts its X-Forwarded-For
    (tests/e2e/test_proxied_edge.py); otherwise the image's own command, with the same flags."""
    envoy = containers(template)["envoy"]
    image_command = support.image_command("envoy")[1:]
    assert envoy["args"] == [a.replace("envoy/envoy.yaml", "envoy/envoy-cloudrun.yaml") for a in image_command]
    assert (ROOT / "envoy" / "envoy-cloudrun.yaml").exists()


def test_envoy_waits_for_the_servers_startup_probe(template):
    annotations = template["metadata"]["annotations"]
    assert json.loads(annotations["run.googleapis.com/container-dependencies"]) == {"envoy": ["server"]}
    server, envoy = containers(template)["server"], containers(template)["envoy"]
    port = int(support.final_stage("server").env()["PAYMENTS_LISTEN_ADDR"].rsplit(":", 1)[1])
    assert server["startupProbe"]["grpc"] == {"port": port}
    assert server["livenessProbe"]["grpc"] == {"port": port}
    assert envoy["startupProbe"]["httpGet"] == {"path": "/ready", "port": support.envoy_listener_port()}


def test_the_scheduler_gets_cpu_outside_requests_and_an_instance(template):
    annotations = template["metadata"]["annotations"]
    assert annotations["run.googleapis.com/cpu-throttling"] == "false"
    assert int(annotations["autoscaling.knative.dev/minScale"]) >= 1
    # More than one instance is safe: each tick is claimed once in the database.
    assert int(annotations["autoscaling.knative.dev/maxScale"]) >= 1


def test_postgres_through_the_built_in_cloud_sql_connection(template):
    annotations = template["metadata"]["annotations"]
    instance = annotations["run.googleapis.com/cloudsql-instances"]
    assert instance == "PROJECT_ID:REGION:payments-db"
    server = containers(template)["server"]
    url = next(e for e in server["env"] if e["name"] == "DATABASE_URL")
    assert "value" not in url and url["valueFrom"]["secretKeyRef"]["name"] == "payments-database-url"
    # The URL the walk-through stores: a Unix socket under /cloudsql/, which the server accepts.
    documented = re.search(r"(postgresql://payments:\$DB_PASSWORD@/payments\?host=/cloudsql/\S+?)['\"]",
                           (ROOT / "docs" / "cloudrun.md").read_text())
    assert documented, "docs/cloudrun.md stores DATABASE_URL with the Cloud SQL socket"
    url = documented[1].replace("$DB_PASSWORD", "pw").replace("$PROJECT_ID:$REGION", "PROJECT_ID:REGION")
    assert url.endswith(f"host=/cloudsql/{instance}")
    assert config.load({"DATABASE_URL": url}).database_url == url
    from playhouse.db_url import parse

    assert parse(url)["host"] == f"/cloudsql/{instance}"


def test_no_secret_value_is_in_the_file(template):
    sensitive = re.compile(r"PASSWORD|SECRET|DATABASE_URL|KEY$")
    for c in template["spec"]["containers"]:
        for e in c.get("env", []):
            if sensitive.search(e["name"]) and not e["name"].endswith("_FILE"):
                assert "value" not in e, f"{c['name']}: {e['name']} must come from Secret Manager"
                assert e["valueFrom"]["secretKeyRef"]["key"] == "latest"
    text = SERVICE.read_text()
    assert "PRIVATE KEY" not in text and not re.search(r"postgres(ql)?://\w+:\w+@", text)


def test_keys_are_mounted_where_the_images_read_them(template):
    volumes = {v["name"]: v["secret"] for v in template["spec"]["volumes"]}
    envoy, server = containers(template)["envoy"], containers(template)["server"]

    def files(container) -> set[str]:
        out = set()
        for m in container["volumeMounts"]:
            for item in volumes[m["name"]]["items"]:
                out.add(f"{m['mountPath']}/{item['path']}")
        return out

    workdir = support.final_stage("envoy").workdir
    jwks = next(p for p in support.envoy_file_paths() if p.endswith("jwks.json"))
    assert str(workdir / jwks) in files(envoy)
    assert files(envoy) == {str(workdir / jwks)}  # Envoy never sees the private key
    env = {e["name"]: e.get("value") for e in server["env"]}
    defaults = config.Settings()
    server_dir = support.final_stage("server").workdir
    assert env["PAYMENTS_JWT_PRIVATE_KEY_FILE"] in files(server)
    assert str(server_dir / defaults.jwks_file) in files(server)
    # One secret per directory: Secret Manager volumes cannot share a mount path.
    mounts = [m["mountPath"] for c in template["spec"]["containers"] for m in c["volumeMounts"]
              if m["name"] == "jwt-private"]
    assert mounts == ["/app/signing"]
