"""k8s/: it renders, every object is valid Kubernetes, and the manifests agree with the images,
envoy.yaml and the server's settings on everything that would otherwise break only in a cluster:
ports, probes, mounts, secrets, drain order, the images `kustomize edit` sets."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import PurePosixPath

import kubernetes_validate
import pytest

from tests.support import deploy as support
from tests.support.deploy import ROOT

# The oldest Kubernetes the manifests need (native sidecars and the preStop sleep action are on
# by default from 1.33, GKE's oldest supported minor) and the newest the validator knows.
K8S_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]
SECRET_ENV = re.compile(r"(DATABASE_URL|SECRET|PASSWORD|TOKEN|KEY)")


@pytest.fixture(scope="module")
def objects():
    return support.render_k8s()


@pytest.fixture(scope="module")
def api_pod(objects):
    return support.find(objects, "Deployment", "payments")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def config_data(objects, api_pod):
    name = support.container(api_pod, "server")["envFrom"][0]["configMapRef"]["name"]
    return support.find(objects, "ConfigMap", name)["data"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_kubernetes(objects, version):
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap",
            "ServiceAccount", "Namespace"} <= kinds
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_rejects_what_an_older_cluster_would(objects):
    """Proof that the validation above checks fields: 1.28 had no preStop sleep action."""
    deployment = support.find(objects, "Deployment", "payments")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.28.0", strict=True)


def test_everything_lands_in_one_namespace(objects):
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"payments"}


# --- secrets ---

def test_no_secret_is_inlined(objects):
    assert not [o for o in objects if o["kind"] == "Secret"], "Secrets are created by docs/deploy.md's commands"
    for obj in objects:
        if obj["kind"] == "ConfigMap":
            for key in obj["data"]:
                assert not SECRET_ENV.search(key), f"{obj['metadata']['name']}: {key} belongs in a Secret"
        pod = obj.get("spec", {}).get("template", {}).get("spec")
        for c in support.pod_containers(pod) if pod else []:
            for env in c.get("env", []):
                if SECRET_ENV.search(env["name"]):
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{c['name']}: {env['name']} is not from a Secret"


def test_secrets_referenced_are_the_ones_documented(api_pod):
    """The base's header lists what the Secrets must hold; docs/deploy.md's commands create exactly those."""
    header = (ROOT / "k8s" / "base" / "kustomization.yaml").read_text().split("apiVersion")[0]
    referenced: dict[str, set[str]] = {}
    for c in support.pod_containers(api_pod):
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                referenced.setdefault(ref["name"], set()).add(ref["key"])
    for volume in api_pod["volumes"]:
        if "secret" in volume:
            keys = {i["key"] for i in volume["secret"].get("items", [])}
            referenced.setdefault(volume["secret"]["secretName"], set()).update(keys)
    assert set(referenced) == {"payments", "payments-jwt"}
    for secret, keys in referenced.items():
        line = next(l for l in header.splitlines() if f"Secret {secret} " in l)
        for key in keys:
            assert key in line, f"{secret}/{key} is not documented in k8s/base/kustomization.yaml"
    server = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in support.container(api_pod, "server")["env"]}
    assert server["DATABASE_URL"]["key"] == "database-url"
    assert server["PAYMENTS_PAGE_TOKEN_SECRET"]["key"] == "page-token-secret"


def test_no_private_key_is_in_the_repository():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    found = []
    for name in files:
        path = ROOT / name
        if path.is_file() and path.stat().st_size < 5_000_000:
            if re.search(rb"-----BEGIN ([A-Z]+ )?PRIVATE KEY-----", path.read_bytes()):
                found.append(name)
    assert not found, found


# --- ports, probes, commands ---

def test_server_container_listens_where_probes_and_envoy_look(api_pod, config_data):
    server = support.container(api_pod, "server")
    port = int(config_data["PAYMENTS_LISTEN_ADDR"].rsplit(":", 1)[1])
    assert config_data["PAYMENTS_LISTEN_ADDR"] == support.final_stage("server").env()["PAYMENTS_LISTEN_ADDR"]
    assert [p["containerPort"] for p in server["ports"]] == [port]
    assert support.envoy_backend() == ("127.0.0.1", port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": port}, probe  # service "": the server's overall health


def test_envoy_container_port_and_readiness_match_envoy_yaml(api_pod):
    envoy = support.container(api_pod, "envoy")
    listener = support.envoy_listener_port()
    assert [p["containerPort"] for p in envoy["ports"]] == [listener]
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": listener}
    filters = support.envoy_config()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    health = next(f for f in filters["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.health_check")
    assert health["typed_config"]["pass_through_mode"] is False
    assert {"name": ":path", "string_match": {"exact": "/ready"}} in health["typed_config"]["headers"]


def test_envoy_gets_the_environment_its_config_reads(objects, api_pod):
    """envoy.yaml reads variables at start (os.getenv in its Lua filter): the sidecar must get each."""
    wanted = set(re.findall(r'os\.getenv\("([A-Z_]+)"\)', support.ENVOY_CONFIG.read_text()))
    envoy = support.container(api_pod, "envoy")
    provided = set()
    for source in envoy.get("envFrom", []):
        provided |= set(support.find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    provided |= {e["name"] for e in envoy.get("env", [])}
    assert wanted <= provided, wanted - provided


def test_service_exposes_envoy_only(objects, api_pod):
    service = support.find(objects, "Service", "payments")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["selector"] == support.find(objects, "Deployment", "payments")["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: p["containerPort"] for c in api_pod["containers"] for p in c.get("ports", [])}
    assert [(p["port"], ports[p["targetPort"]]) for p in service["spec"]["ports"]] == [(80, support.envoy_listener_port())]


def test_the_service_keeps_client_addresses_for_the_login_limits(objects):
    """Envoy limits sign-ups and logins per TCP peer: the load balancer must not hide the client."""
    assert support.find(objects, "Service", "payments")["spec"]["externalTrafficPolicy"] == "Local"


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


def test_envoys_heap_limit_fits_the_sidecars_memory_limit(api_pod):
    """The overload manager acts before the kubelet's OOM kill: the heap it watches is at most 80%
    of the container's memory limit (the rest is Envoy's code, stacks and the allocator's slack)."""
    monitors = {m["name"]: m["typed_config"] for m in support.envoy_config()["overload_manager"]["resource_monitors"]}
    heap = int(monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"])
    limit = _quantity_bytes(support.container(api_pod, "envoy")["resources"]["limits"]["memory"])
    assert 0.5 * limit <= heap <= 0.8 * limit, (heap, limit)
    actions = {a["name"] for a in support.envoy_config()["overload_manager"]["actions"]}
    assert {"envoy.overload_actions.shrink_heap", "envoy.overload_actions.stop_accepting_requests",
            "envoy.overload_actions.reset_high_memory_stream"} <= actions


def test_images_run_their_own_commands(api_pod):
    """No command/args override: the pods run the images' CMDs, which test_images ties to make run
    and to the Envoy config the end-to-end tests run."""
    for name in ("server", "envoy"):
        c = support.container(api_pod, name)
        assert "command" not in c and "args" not in c, name
        assert c["image"].split("/")[-1].split(":")[0] == name, c["image"]


def test_mounted_files_are_where_the_images_read_them(api_pod):
    from server.infra import config

    volumes = {v["name"]: v for v in api_pod["volumes"]}
    server, envoy = support.container(api_pod, "server"), support.container(api_pod, "envoy")
    keys_dir = support.final_stage("server").workdir / config.Settings().jwt_private_key_file.parent
    server_mount = next(m for m in server["volumeMounts"] if m["mountPath"] == str(keys_dir))
    assert server_mount["readOnly"] is True
    assert volumes[server_mount["name"]]["secret"]["secretName"] == "payments-jwt"
    jwks = PurePosixPath(next(p for p in support.envoy_file_paths() if p.endswith("jwks.json")))
    envoy_mount = next(m for m in envoy["volumeMounts"] if m["mountPath"] == str(support.final_stage("envoy").workdir / jwks.parent))
    secret = volumes[envoy_mount["name"]]["secret"]
    # Envoy gets the public keys and nothing else from the Secret.
    assert secret["secretName"] == "payments-jwt" and secret["items"] == [{"key": "jwks.json", "path": jwks.name}]
    assert envoy_mount["readOnly"] is True
    assert any(m["mountPath"] == "/tmp" for m in server["volumeMounts"])


# --- termination and availability ---

def test_envoy_drains_before_the_server_stops(api_pod, config_data):
    envoy, server = support.container(api_pod, "envoy"), support.container(api_pod, "server")
    hook = envoy["lifecycle"]["preStop"]["exec"]["command"]
    script = hook[-1]
    assert f"--post-data= http://127.0.0.1:{support.envoy_admin_port()}/healthcheck/fail" in script
    envoy_wait = int(re.search(r"sleep (\d+)\s*$", script)[1])
    server_wait = server["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(config_data["PAYMENTS_GRACE_SECONDS"])
    assert server_wait > envoy_wait, "the server must outlive Envoy's drain"
    assert api_pod["terminationGracePeriodSeconds"] >= server_wait + grace + 5


def test_replicas_autoscaling_and_disruption_budget(objects):
    deployment = support.find(objects, "Deployment", "payments")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = support.find(objects, "HorizontalPodAutoscaler", "payments")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "payments"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    pdb = support.find(objects, "PodDisruptionBudget", "payments")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["minAvailable"] < hpa["minReplicas"]


def test_pool_sizes_fit_the_database_at_full_scale(objects, config_data):
    """Every pod holds up to PAYMENTS_DB_POOL_SIZE connections; docs/deploy.md's Cloud SQL tier
    (db-custom-1-3840) allows 100, a few of which Cloud SQL keeps for itself."""
    hpa = support.find(objects, "HorizontalPodAutoscaler", "payments")["spec"]
    assert hpa["maxReplicas"] * int(config_data["PAYMENTS_DB_POOL_SIZE"]) <= 80


# --- security and resources ---

def test_pods_and_containers_are_locked_down(objects):
    image_users = {"server": "10001", "envoy": "101", "swagger-ui": "10001"}
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        # Only the API pods need their service account (Workload Identity); it has no RBAC grants.
        if obj["metadata"]["name"] != "payments":
            assert pod.get("automountServiceAccountToken") is False
        else:
            assert not any(o["kind"] in ("RoleBinding", "ClusterRoleBinding") for o in objects)
        for c in support.pod_containers(pod):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            if c["name"] in image_users:
                assert str(sc["runAsUser"]) == image_users[c["name"]], c["name"]
            resources = c["resources"]
            assert resources["requests"].keys() >= {"cpu", "memory"}, c["name"]
            assert resources["limits"]["memory"] == resources["requests"]["memory"], c["name"]
    for kind, user in (("server", "10001"), ("envoy", "101"), ("swagger-ui", "10001")):
        assert support.final_stage(kind).last("USER").args.split(":")[0] == user


def test_cloud_sql_proxy_starts_before_and_stops_after_the_server(api_pod):
    proxy = support.container(api_pod, "cloud-sql-proxy")
    assert proxy in api_pod["initContainers"] and proxy["restartPolicy"] == "Always"
    assert proxy["startupProbe"]["httpGet"]["path"] == "/startup"
    assert "--port=5432" in proxy["args"] and "$(INSTANCE_CONNECTION_NAME)" in proxy["args"]
    assert any(e["name"] == "INSTANCE_CONNECTION_NAME" and "configMapKeyRef" in e["valueFrom"] for e in proxy["env"])


def test_swagger_ui_runs_the_projects_image_with_its_api_address_mounted(objects):
    pod = support.find(objects, "Deployment", "swagger-ui")["spec"]["template"]["spec"]
    ui = support.container(pod, "swagger-ui")
    assert ui["image"].rsplit("/", 1)[-1].split(":")[0] in ("payments-swagger-ui", "swagger-ui")
    assert "initContainers" not in pod and ui["securityContext"]["readOnlyRootFilesystem"] is True
    mount = next(m for m in ui["volumeMounts"] if m["name"] == "config")
    # Where the image's page looks for it (Dockerfile.swagger-ui copies the page to /srv/ui/).
    assert mount["mountPath"] == "/srv/ui/config" and "subPath" not in mount  # a directory: edits reach it
    config_map = next(v for v in pod["volumes"] if v["name"] == "config")["configMap"]["name"]
    data = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == config_map)["data"]
    assert json.loads(data["config.json"]) == {"api": "http://localhost:8080"}
    service = support.find(objects, "Service", "swagger-ui")
    assert service["spec"]["type"] == "LoadBalancer"


# --- docs/deploy.md's kustomize edits ---

def test_readme_kustomize_edits_set_images_instance_and_api_host(tmp_path):
    # As docs/deploy.md does it: a copy of the overlay beside it (untracked), edited there.
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    work = tmp_path / "k8s" / "overlays" / "local"
    shutil.copytree(tmp_path / "k8s" / "overlays" / "gke", work)
    edits = [
        ["edit", "set", "image", "payments-server=europe-west1-docker.pkg.dev/acme/payments/server:abc123",
         "payments-envoy=europe-west1-docker.pkg.dev/acme/payments/envoy:abc123",
         "payments-swagger-ui=europe-west1-docker.pkg.dev/acme/payments/swagger-ui:abc123"],
        ["edit", "set", "configmap", "cloud-sql", "--from-literal=INSTANCE_CONNECTION_NAME=acme:europe-west1:payments-db",
         "--from-literal=SERVICE_ACCOUNT=payments-sql@acme.iam.gserviceaccount.com"],
        ["edit", "set", "configmap", "swagger-ui", '--from-literal=config.json={"api": "http://203.0.113.7"}'],
        ["edit", "set", "configmap", "envoy", "--from-literal=PAYMENTS_CORS_ORIGINS=http://198.51.100.9"],
    ]
    for edit in edits:
        subprocess.run([str(support.KUSTOMIZE), *edit], cwd=work, check=True, capture_output=True)
    objects = support.render_k8s(work)
    api = support.find(objects, "Deployment", "payments")["spec"]["template"]["spec"]
    swagger = support.find(objects, "Deployment", "swagger-ui")["spec"]["template"]["spec"]
    assert support.container(api, "server")["image"] == "europe-west1-docker.pkg.dev/acme/payments/server:abc123"
    assert support.container(api, "envoy")["image"] == "europe-west1-docker.pkg.dev/acme/payments/envoy:abc123"
    assert support.container(swagger, "swagger-ui")["image"] == "europe-west1-docker.pkg.dev/acme/payments/swagger-ui:abc123"
    by_name = {o["metadata"]["name"].rsplit("-", 1)[0]: o for o in objects if o["kind"] == "ConfigMap"}
    assert by_name["cloud-sql"]["data"]["INSTANCE_CONNECTION_NAME"] == "acme:europe-west1:payments-db"
    assert json.loads(by_name["swagger-ui"]["data"]["config.json"]) == {"api": "http://203.0.113.7"}
    assert by_name["envoy"]["data"]["PAYMENTS_CORS_ORIGINS"] == "http://198.51.100.9"
    envoy_config = support.container(api, "envoy")["envFrom"][0]["configMapRef"]["name"]
    assert envoy_config == by_name["envoy"]["metadata"]["name"]  # hash changed: Envoy restarts with it
    account = support.find(objects, "ServiceAccount", "payments")["metadata"]["annotations"]
    assert account == {"iam.gke.io/gcp-service-account": "payments-sql@acme.iam.gserviceaccount.com"}
    assert api["serviceAccountName"] == "payments"
    # ConfigMap names carry a content hash, so an edit rolls the pods that use them.
    original = support.find(support.render_k8s(), "Deployment", "swagger-ui")["spec"]["template"]["spec"]
    assert original["volumes"] != swagger["volumes"]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_pods_take_connections_only_on_the_ports_their_services_send_to(objects):
    """Every pod is isolated by a NetworkPolicy that allows, from anywhere, exactly the ports its
    Services target: the server's own port is not among them (Envoy reaches it over loopback, the
    kubelet's probes from the node, which NetworkPolicy always allows)."""
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert set(deployments) == {"payments", "swagger-ui"}
    allowed_by = {}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in policies if _selects(p["spec"]["podSelector"]["matchLabels"], labels)]
        assert mine, f"no NetworkPolicy selects the {name} pods"
        allowed = allowed_by[name] = set()
        for policy in mine:
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            for rule in policy["spec"]["ingress"]:
                assert "from" not in rule  # public: the load balancer's clients
                allowed |= {(p["port"], p["protocol"]) for p in rule["ports"]}
        targets = {(p["targetPort"], "TCP") for s in objects if s["kind"] == "Service"
                   and _selects(s["spec"]["selector"], labels) for p in s["spec"]["ports"]}
        assert targets and allowed == targets, (name, allowed, targets)
        named = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {port for port, _ in allowed} <= named, (name, allowed, named)
    server = support.container(deployments["payments"]["spec"]["template"]["spec"], "server")
    assert {(p["name"], "TCP") for p in server["ports"]}.isdisjoint(allowed_by["payments"])
