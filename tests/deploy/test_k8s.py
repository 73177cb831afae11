"""k8s/: both GKE overlays render, every object is valid Kubernetes (and valid Gateway API, against
the CRDs' own schemas), every pod meets Pod Security's `restricted` level by the upstream evaluator,
and the manifests agree with the images, the Envoy configs and the server's settings on everything
that would otherwise break only in a cluster: ports, probes, mounts, secrets, drain order, the
public edge, the network policies, the images `kustomize edit` sets."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest

from tests.support import deploy as support
from tests.support.deploy import ROOT

OVERLAYS = ("gke", "gke-http")
CUSTOM_API_VERSIONS = {"gateway.networking.k8s.io/v1", "networking.gke.io/v1", "monitoring.googleapis.com/v1"}
K8SCHECK = ROOT / ".tools" / "bin" / "k8scheck"

# The oldest Kubernetes the manifests need (native sidecars and the preStop sleep action are on
# by default from 1.33, GKE's oldest supported minor) and the newest the validator knows.
K8S_VERSIONS = ["1.33.0", kubernetes_validate.latest_version()]
SECRET_ENV = re.compile(r"(DATABASE_URL|SECRET|PASSWORD|TOKEN|KEY)")


@pytest.fixture(scope="module")
def objects():
    """The default GKE overlay: HTTPS through the Gateway."""
    return support.render_k8s()


@pytest.fixture(scope="module")
def http_objects():
    """The try-out overlay: plain-HTTP load balancers."""
    return support.render_k8s(ROOT / "k8s" / "overlays" / "gke-http")


@pytest.fixture(scope="module", params=OVERLAYS)
def each_overlay(request):
    return support.render_k8s(ROOT / "k8s" / "overlays" / request.param)


@pytest.fixture(scope="module")
def api_pod(objects):
    return support.find(objects, "Deployment", "payments")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def config_data(objects, api_pod):
    name = support.container(api_pod, "server")["envFrom"][0]["configMapRef"]["name"]
    return support.find(objects, "ConfigMap", name)["data"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_kubernetes(each_overlay, version):
    kinds = {o["kind"] for o in each_overlay}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ConfigMap",
            "ServiceAccount", "Namespace", "NetworkPolicy"} <= kinds
    for obj in each_overlay:
        if obj["apiVersion"] in CUSTOM_API_VERSIONS:
            continue  # the Gateway API's kinds: their CRDs' schemas, below; GKE's policies: test_gke_policies_*
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_rejects_what_an_older_cluster_would(objects):
    """Proof that the validation above checks fields: 1.28 had no preStop sleep action."""
    deployment = support.find(objects, "Deployment", "payments")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.28.0", strict=True)


def test_everything_lands_in_one_namespace(each_overlay):
    namespaced = [o for o in each_overlay if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"payments"}
    namespace = support.find(each_overlay, "Namespace", "payments")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    assert namespace["pod-security.kubernetes.io/enforce-version"] == "latest"


def _k8scheck(objects: list[dict]) -> subprocess.CompletedProcess:
    import yaml
    return subprocess.run([str(K8SCHECK)], input=yaml.safe_dump_all(objects), capture_output=True, text=True, timeout=60)


def test_every_pod_meets_pod_security_restricted_by_the_upstream_evaluator(each_overlay):
    """tools/k8scheck runs k8s.io/pod-security-admission's evaluator on each pod template, at the
    level the namespace enforces, so a pod the cluster would refuse fails here first."""
    result = _k8scheck(each_overlay)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok Deployment/payments" in result.stdout and "ok Deployment/swagger-ui" in result.stdout


def test_the_evaluator_refuses_a_pod_that_restricted_does_not_allow(objects):
    """Proof that the check above can fail: the API pod with one container allowed to escalate."""
    import copy
    changed = copy.deepcopy(objects)
    pod = support.find(changed, "Deployment", "payments")["spec"]["template"]["spec"]
    support.container(pod, "envoy")["securityContext"]["allowPrivilegeEscalation"] = True
    result = _k8scheck(changed)
    assert result.returncode == 1
    assert 'FAIL Deployment/payments: violates PodSecurity restricted:latest: allowPrivilegeEscalation != false (container "envoy"' in result.stdout


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
    """The kustomizations' headers list what the Secrets must hold (the base's, and the HTTPS
    component's for Envoy's certificate); docs/deploy.md's commands create exactly those."""
    header = "".join((ROOT / "k8s" / d / "kustomization.yaml").read_text().split("apiVersion")[0]
                     for d in ("base", "components/https-gateway"))
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
    assert set(referenced) == {"payments", "payments-jwt", "payments-envoy-tls"}
    for secret, keys in referenced.items():
        line = next(l for l in header.splitlines() if f"Secret {secret} " in l)
        for key in keys:
            assert key in line, f"{secret}/{key} is not documented in a kustomization.yaml header"
    server = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in support.container(api_pod, "server")["env"]}
    assert server["DATABASE_URL"]["key"] == "database-url"
    assert server["PAYMENTS_PAGE_TOKEN_SECRET"]["key"] == "page-token-secret"
    deploy_md = (ROOT / "docs" / "deploy.md").read_text()
    for secret in referenced:
        assert f"create secret generic {secret} " in deploy_md or f"create secret tls {secret} " in deploy_md, secret


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
    metrics_port = int(config_data["PAYMENTS_METRICS_ADDR"].rsplit(":", 1)[1])
    assert config_data["PAYMENTS_METRICS_ADDR"] == support.final_stage("server").env()["PAYMENTS_METRICS_ADDR"]
    assert [p["containerPort"] for p in server["ports"]] == [port, metrics_port]
    assert support.envoy_backend() == ("127.0.0.1", port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"] == {"port": port}, probe  # service "": the server's overall health


def test_envoy_container_port_and_readiness_match_envoy_yaml(api_pod, http_objects):
    listener = support.envoy_listener_port()
    filters = support.envoy_config()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    health = next(f for f in filters["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.health_check")
    assert health["typed_config"]["pass_through_mode"] is False
    assert {"name": ":path", "string_match": {"exact": "/ready"}} in health["typed_config"]["headers"]
    plain = support.find(http_objects, "Deployment", "payments")["spec"]["template"]["spec"]
    for pod, scheme in ((plain, None), (api_pod, "HTTPS")):  # behind the Gateway, Envoy's listener is TLS
        envoy = support.container(pod, "envoy")
        assert [(p["name"], p["containerPort"]) for p in envoy["ports"]] == [
            ("http", listener), ("metrics", support.envoy_listener_port("metrics"))]
        assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": listener, **({"scheme": scheme} if scheme else {})}


def test_envoy_gets_the_environment_its_config_reads(objects, api_pod):
    """envoy.yaml reads variables at start (os.getenv in its Lua filter): the sidecar must get each."""
    wanted = set(re.findall(r'os\.getenv\("([A-Z_]+)"\)', support.ENVOY_CONFIG.read_text()))
    envoy = support.container(api_pod, "envoy")
    provided = set()
    for source in envoy.get("envFrom", []):
        provided |= set(support.find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    provided |= {e["name"] for e in envoy.get("env", [])}
    assert wanted <= provided, wanted - provided


def test_services_expose_envoy_only(each_overlay):
    api_pod = support.find(each_overlay, "Deployment", "payments")["spec"]["template"]["spec"]
    service = support.find(each_overlay, "Service", "payments")
    assert service["spec"]["selector"] == support.find(each_overlay, "Deployment", "payments")["spec"]["selector"]["matchLabels"]
    ports = {p["name"]: p["containerPort"] for c in api_pod["containers"] for p in c.get("ports", [])}
    assert [ports[p["targetPort"]] for p in service["spec"]["ports"]] == [support.envoy_listener_port()]


def test_the_https_overlay_has_no_public_service(objects):
    """Only the Gateway is public: both Services are cluster-internal, and Envoy's is HTTP/2 over
    TLS to the load balancer (GKE needs TLS for HTTP/2 backends)."""
    for name in ("payments", "swagger-ui"):
        assert support.find(objects, "Service", name)["spec"]["type"] == "ClusterIP", name
    assert support.find(objects, "Service", "payments")["spec"]["ports"][0]["appProtocol"] == "HTTP2"


def test_the_plain_http_overlay_keeps_client_addresses_for_the_login_limits(http_objects):
    """Envoy limits sign-ups and logins per TCP peer there (envoy.yaml, no trusted hops): the load
    balancer must pass the client's address through, and be the backend-service kind GKE recommends."""
    for name in ("payments", "swagger-ui"):
        service = support.find(http_objects, "Service", name)
        assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["externalTrafficPolicy"] == "Local"
        assert service["metadata"]["annotations"] == {"cloud.google.com/l4-rbs": "enabled"}
        assert [p["port"] for p in service["spec"]["ports"]] == [80]




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


def test_images_run_their_own_commands(api_pod, http_objects):
    """No command override: the pods run the images' CMDs, which test_images ties to make run and to
    the Envoy config the end-to-end tests run. Behind the Gateway, Envoy's only change is the config
    file: envoy-gke.yaml, with the image's own flags."""
    plain = support.find(http_objects, "Deployment", "payments")["spec"]["template"]["spec"]
    for pod in (plain, api_pod):
        for name in ("server", "envoy"):
            c = support.container(pod, name)
            assert "command" not in c, name
            assert c["image"].split("/")[-1].split(":")[0] == name, c["image"]
        assert "args" not in support.container(pod, "server")
    assert "args" not in support.container(plain, "envoy")
    image_command = support.image_command("envoy")[1:]
    gke = [a.replace("envoy/envoy.yaml", "envoy/envoy-gke.yaml") for a in image_command]
    assert support.container(api_pod, "envoy")["args"] == gke and gke != image_command
    assert any("envoy/envoy-gke.yaml" in c.args for c in support.final_stage("envoy").all("COPY"))


def test_mounted_files_are_where_the_images_read_them(api_pod):
    from server.infra import config

    volumes = {v["name"]: v for v in api_pod["volumes"]}
    server, envoy = support.container(api_pod, "server"), support.container(api_pod, "envoy")
    keys_dir = support.final_stage("server").workdir / config.Settings().jwt_private_key_file.parent
    server_mount = next(m for m in server["volumeMounts"] if m["mountPath"] == str(keys_dir))
    assert server_mount["readOnly"] is True
    assert volumes[server_mount["name"]]["secret"]["secretName"] == "payments-jwt"
    workdir = support.final_stage("envoy").workdir
    jwks = PurePosixPath(next(p for p in support.envoy_file_paths() if p.endswith("jwks.json")))
    envoy_mount = next(m for m in envoy["volumeMounts"] if m["mountPath"] == str(workdir / jwks.parent))
    secret = volumes[envoy_mount["name"]]["secret"]
    # Envoy gets the public keys and nothing else from the Secret.
    assert secret["secretName"] == "payments-jwt" and secret["items"] == [{"key": "jwks.json", "path": jwks.name}]
    assert envoy_mount["readOnly"] is True
    assert any(m["mountPath"] == "/tmp" for m in server["volumeMounts"])
    # envoy-gke.yaml's certificate: the TLS Secret's two keys, in Envoy alone.
    tls = support.envoy_config(ROOT / "envoy" / "envoy-gke.yaml")["static_resources"]["listeners"][0]["filter_chains"][0]
    files = tls["transport_socket"]["typed_config"]["common_tls_context"]["tls_certificates"][0]
    cert, key = PurePosixPath(files["certificate_chain"]["filename"]), PurePosixPath(files["private_key"]["filename"])
    assert cert.parent == key.parent and (cert.name, key.name) == ("tls.crt", "tls.key")  # a kubernetes.io/tls Secret's keys
    tls_mount = next(m for m in envoy["volumeMounts"] if m["mountPath"] == str(workdir / cert.parent))
    assert tls_mount["readOnly"] is True and volumes[tls_mount["name"]]["secret"]["secretName"] == "payments-envoy-tls"
    assert not any(m["name"] == tls_mount["name"] for m in server["volumeMounts"])


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


def test_autoscaling_owns_the_replica_count_and_disruptions_take_one_pod(objects):
    deployment = support.find(objects, "Deployment", "payments")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    # No replicas beside the HPA: every `kubectl apply -k` would reset a scaled-out Deployment.
    assert "replicas" not in deployment["spec"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    hpa = support.find(objects, "HorizontalPodAutoscaler", "payments")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "payments"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    # The server's CPU, not the pod's average (Envoy's and the proxy's would dilute it).
    assert [m["type"] for m in hpa["metrics"]] == ["ContainerResource"]
    assert hpa["metrics"][0]["containerResource"]["container"] == "server"
    assert hpa["metrics"][0]["containerResource"]["name"] == "cpu"
    pdb = support.find(objects, "PodDisruptionBudget", "payments")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["maxUnavailable"] == 1 and "minAvailable" not in pdb
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # an unready pod never blocks a drain


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
    assert re.fullmatch(r"gcr\.io/cloud-sql-connectors/cloud-sql-proxy:2\.\d+\.\d+", proxy["image"])
    assert int(proxy["image"].split(":")[1].split(".")[1]) >= 28  # a current release (2.28.0, December 2026)
    assert {"--port=5432", "--private-ip", "--health-check", "--exit-zero-on-sigterm", "$(INSTANCE_CONNECTION_NAME)"} <= set(proxy["args"])
    port = int(next(a for a in proxy["args"] if a.startswith("--http-port=")).split("=")[1])
    # Upstream's example (examples/k8s-health-check): a second apart for a minute; 10 s timeouts.
    assert proxy["startupProbe"] == {"httpGet": {"path": "/startup", "port": port}, "periodSeconds": 1,
                                     "timeoutSeconds": 10, "failureThreshold": 60}
    assert proxy["livenessProbe"] == {"httpGet": {"path": "/liveness", "port": port}, "periodSeconds": 10,
                                      "timeoutSeconds": 10, "failureThreshold": 3}
    env = {e["name"]: e for e in proxy["env"]}
    assert env["INSTANCE_CONNECTION_NAME"]["value"] == "PROJECT_ID:REGION:payments-db"  # from the overlay's cloud-sql


def test_swagger_ui_runs_the_projects_image_with_its_api_address_mounted(objects, http_objects):
    pod = support.find(objects, "Deployment", "swagger-ui")["spec"]["template"]["spec"]
    ui = support.container(pod, "swagger-ui")
    assert ui["image"].rsplit("/", 1)[-1].split(":")[0] in ("payments-swagger-ui", "swagger-ui")
    assert "initContainers" not in pod and ui["securityContext"]["readOnlyRootFilesystem"] is True
    mount = next(m for m in ui["volumeMounts"] if m["name"] == "config")
    # Where the image's page looks for it (Dockerfile.swagger-ui copies the page to /srv/ui/).
    assert mount["mountPath"] == "/srv/ui/config" and "subPath" not in mount  # a directory: edits reach it

    def config(objs):
        ui_pod = support.find(objs, "Deployment", "swagger-ui")["spec"]["template"]["spec"]
        name = next(v for v in ui_pod["volumes"] if v["name"] == "config")["configMap"]["name"]
        return json.loads(next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name)["data"]["config.json"])

    def cors(objs):
        return next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("envoy-"))["data"]["PAYMENTS_CORS_ORIGINS"]

    # Behind the Gateway the page and the API share the domain's origin: no CORS origin needed.
    assert config(objects) == {"api": "https://payments.example.com"} and cors(objects) == ""
    # The try-out overlay: until the addresses exist, both fit `kubectl port-forward`.
    assert config(http_objects) == {"api": "http://localhost:8080"} and cors(http_objects) == ""


# --- docs/deploy.md's kustomize edits ---

DIGEST = "sha256:" + "ab" * 32


def _edited(tmp_path, overlay: str, edits: list[list[str]]) -> list[dict]:
    """As docs/deploy.md does it: a copy of the overlay beside it (untracked), edited there."""
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    work = tmp_path / "k8s" / "overlays" / "local"
    shutil.copytree(tmp_path / "k8s" / "overlays" / overlay, work)
    for edit in edits:
        subprocess.run([str(support.KUSTOMIZE), *edit], cwd=work, check=True, capture_output=True)
    return support.render_k8s(work)


def _config_maps(objects) -> dict[str, dict]:
    return {o["metadata"]["name"].rsplit("-", 1)[0]: o for o in objects if o["kind"] == "ConfigMap"}


CLOUD_SQL_EDIT = ["edit", "set", "configmap", "cloud-sql", "--from-literal=INSTANCE_CONNECTION_NAME=acme:europe-west1:payments-db",
                  "--from-literal=SERVICE_ACCOUNT=payments-sql@acme.iam.gserviceaccount.com"]


def test_readme_kustomize_edits_set_digests_instance_and_domain(tmp_path, objects):
    repo = "europe-west1-docker.pkg.dev/acme/payments"
    proxy = "gcr.io/cloud-sql-connectors/cloud-sql-proxy"
    original = support.find(objects, "Deployment", "swagger-ui")["spec"]["template"]["spec"]
    objects = _edited(tmp_path, "gke", [
        ["edit", "set", "image", f"payments-server={repo}/server@{DIGEST}", f"payments-envoy={repo}/envoy@{DIGEST}",
         f"payments-swagger-ui={repo}/swagger-ui@{DIGEST}", f"{proxy}={proxy}@{DIGEST}"],
        CLOUD_SQL_EDIT,
        ["edit", "set", "configmap", "swagger-ui", '--from-literal=config.json={"api": "https://pay.acme.example"}'],
    ])
    api = support.find(objects, "Deployment", "payments")["spec"]["template"]["spec"]
    swagger = support.find(objects, "Deployment", "swagger-ui")["spec"]["template"]["spec"]
    for name in ("server", "envoy"):
        assert support.container(api, name)["image"] == f"{repo}/{name}@{DIGEST}"
    assert support.container(api, "cloud-sql-proxy")["image"] == f"{proxy}@{DIGEST}"
    assert support.container(swagger, "swagger-ui")["image"] == f"{repo}/swagger-ui@{DIGEST}"
    proxy_env = {e["name"]: e["value"] for e in support.container(api, "cloud-sql-proxy")["env"]}
    assert proxy_env["INSTANCE_CONNECTION_NAME"] == "acme:europe-west1:payments-db"
    configs = _config_maps(objects)
    assert "cloud-sql" not in configs  # settings for kustomize only (local-config): never applied
    assert json.loads(configs["swagger-ui"]["data"]["config.json"]) == {"api": "https://pay.acme.example"}
    account = support.find(objects, "ServiceAccount", "payments")["metadata"]["annotations"]
    assert account == {"iam.gke.io/gcp-service-account": "payments-sql@acme.iam.gserviceaccount.com"}
    assert api["serviceAccountName"] == "payments"
    # ConfigMap names carry a content hash, so an edit rolls the pods that use them.
    assert original["volumes"] != swagger["volumes"]


def test_readme_kustomize_edits_for_the_plain_http_overlay(tmp_path):
    objects = _edited(tmp_path, "gke-http", [
        CLOUD_SQL_EDIT,
        ["edit", "set", "configmap", "swagger-ui", '--from-literal=config.json={"api": "http://203.0.113.7"}'],
        ["edit", "set", "configmap", "envoy", "--from-literal=PAYMENTS_CORS_ORIGINS=http://198.51.100.9"],
    ])
    configs = _config_maps(objects)
    assert json.loads(configs["swagger-ui"]["data"]["config.json"]) == {"api": "http://203.0.113.7"}
    assert configs["envoy"]["data"]["PAYMENTS_CORS_ORIGINS"] == "http://198.51.100.9"
    api = support.find(objects, "Deployment", "payments")["spec"]["template"]["spec"]
    assert support.container(api, "envoy")["envFrom"][0]["configMapRef"]["name"] == configs["envoy"]["metadata"]["name"]


def test_the_edits_tested_are_the_ones_docs_deploy_md_runs(api_pod):
    text = (ROOT / "docs" / "deploy.md").read_text()
    for line in ("kustomize edit set image \\", "payments-server=$REPO/server@$(digest $REPO/server:$TAG)",
                 "gcr.io/cloud-sql-connectors/cloud-sql-proxy=gcr.io/cloud-sql-connectors/cloud-sql-proxy@$(digest $PROXY_IMAGE)",
                 "kustomize edit set configmap cloud-sql", '--from-literal=config.json="{\\"api\\": \\"https://$DOMAIN\\"}"',
                 "cp -r k8s/overlays/gke k8s/overlays/local", "cp -r k8s/overlays/gke-http k8s/overlays/local",
                 "kustomize edit set configmap envoy --from-literal=PAYMENTS_CORS_ORIGINS=http://$UI"):
        assert line in text, line
    pinned = support.container(api_pod, "cloud-sql-proxy")["image"]
    assert f"PROXY_IMAGE={pinned}\n" in text  # the digest looked up is the pinned release's


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _policies_for(objects: list[dict], labels: dict) -> list[dict]:
    return [p for p in objects if p["kind"] == "NetworkPolicy" and _selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)]


def _egress(policies: list[dict]) -> set[tuple]:
    """(cidr or None for anywhere, port, protocol) for every egress rule of the policies."""
    allowed = set()
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            targets = [t["ipBlock"]["cidr"] for t in rule.get("to", [])] or [None]
            allowed |= {(cidr, p["port"], p["protocol"]) for cidr in targets for p in rule["ports"]}
    return allowed


DNS = {(None, 53, "UDP"), (None, 53, "TCP")}
# Webhooks (docs/webhooks.md): 443 to public addresses, the excepted private ranges checked below.
WEBHOOKS = {("0.0.0.0/0", 443, "TCP"), ("::/0", 443, "TCP")}
CLOUD_SQL = {(None, 3307, "TCP"), (None, 443, "TCP"), ("169.254.169.254/32", 80, "TCP"), ("169.254.169.252/32", 988, "TCP")}


@pytest.mark.parametrize("directory", ["base", "overlays/gke", "overlays/gke-http"])
def test_network_policies_deny_by_default_and_allow_each_pod_what_it_needs(directory):
    """Default deny, both ways, for every pod of the namespace. In: exactly the ports the pod's
    Services target, from anywhere (load balancers, their health checks), never the server's 50051
    (Envoy reaches it over loopback, the kubelet's probes from the node, which NetworkPolicy always
    allows). Out: DNS; the database (its port, or with the Cloud SQL proxy what the proxy needs); webhooks
    (443 to public addresses); Swagger UI nothing."""
    objects = support.render_k8s(ROOT / "k8s" / directory)
    deny = support.find(objects, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}
    assert set(deployments) == {"payments", "swagger-ui"}
    wanted_egress = {"payments": DNS | WEBHOOKS | ({(None, 5432, "TCP")} if directory == "base" else CLOUD_SQL),
                     "swagger-ui": set()}
    webhooks = support.find(objects, "NetworkPolicy", "payments-webhooks")["spec"]["egress"][0]["to"]
    assert {tuple(t["ipBlock"]["except"]) for t in webhooks} >= {
        ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8"),
        ("fc00::/7", "fe80::/10", "::1/128")}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in _policies_for(objects, labels) if p["metadata"]["name"] != "default-deny"]
        allowed, scraper = set(), set()
        for policy in mine:
            for rule in policy["spec"].get("ingress", []):
                if "from" in rule:  # only GKE's managed Prometheus, only to the metrics ports
                    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gmp-system"}}}]
                    scraper |= {(p["port"], p["protocol"]) for p in rule["ports"]}
                    continue
                allowed |= {(p["port"], p["protocol"]) for p in rule["ports"]}  # public: the load balancer's clients
        assert scraper == ({("metrics", "TCP"), ("server-metrics", "TCP")}
                           if name == "payments" and directory != "base" else set()), scraper
        targets = {(p["targetPort"], "TCP") for s in objects if s["kind"] == "Service"
                   and _selects(s["spec"]["selector"], labels) for p in s["spec"]["ports"]}
        assert targets and allowed == targets, (name, allowed, targets)
        named = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {port for port, _ in allowed} <= named, (name, allowed, named)
        assert _egress(mine) == wanted_egress[name], (name, _egress(mine))
        if name == "payments":
            server = support.container(deployment["spec"]["template"]["spec"], "server")
            assert {(p["name"], "TCP") for p in server["ports"]}.isdisjoint(allowed)


# --- the HTTPS edge: GKE's Gateway (components/https-gateway) ---

GATEWAY_API = "sigs.k8s.io/gateway-api"


def _crd_schemas() -> dict[str, dict]:
    """kind -> the served v1 schema, from the Gateway API CRDs of the module tools/go.mod pins (its
    standard channel: what GKE installs)."""
    import yaml
    directory = subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", GATEWAY_API], cwd=ROOT / "tools", check=True,
                               capture_output=True, text=True, timeout=120).stdout.strip()
    schemas = {}
    for plural in ("gateways", "httproutes"):
        path = Path(directory) / "config" / "crd" / "standard" / f"gateway.networking.k8s.io_{plural}.yaml"
        crd = next(d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "CustomResourceDefinition")
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
        schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


@pytest.fixture(scope="module")
def crd_schemas():
    return _crd_schemas()


def _schema_errors(schema: dict, obj: dict) -> list[str]:
    import jsonschema
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]


def test_gateway_api_objects_validate_against_the_crds_schemas(objects, crd_schemas):
    gateway_objects = [o for o in objects if o["apiVersion"] == "gateway.networking.k8s.io/v1"]
    assert sorted(o["kind"] for o in gateway_objects) == ["Gateway", "HTTPRoute", "HTTPRoute"]
    for obj in gateway_objects:
        assert _schema_errors(crd_schemas[obj["kind"]], obj) == [], obj["metadata"]["name"]


def test_the_schemas_refuse_what_the_api_server_would(objects, crd_schemas):
    """Proof that the validation above checks fields: a redirect status the API forbids, a listener
    protocol without a port."""
    import copy
    redirect = copy.deepcopy(support.find(objects, "HTTPRoute", "payments-http-redirect"))
    redirect["spec"]["rules"][0]["filters"][0]["requestRedirect"]["statusCode"] = 399
    assert _schema_errors(crd_schemas["HTTPRoute"], redirect)
    gateway = copy.deepcopy(support.find(objects, "Gateway", "payments"))
    del gateway["spec"]["listeners"][0]["port"]
    assert _schema_errors(crd_schemas["Gateway"], gateway)


def test_the_gateway_is_https_with_a_managed_certificate_and_http_only_redirects(objects):
    gateway = support.find(objects, "Gateway", "payments")
    assert gateway["spec"]["gatewayClassName"] == "gke-l7-global-external-managed"
    assert gateway["metadata"]["annotations"] == {"networking.gke.io/certmap": "payments"}
    assert gateway["spec"]["addresses"] == [{"type": "NamedAddress", "value": "payments"}]
    listeners = {l["name"]: l for l in gateway["spec"]["listeners"]}
    assert (listeners["https"]["protocol"], listeners["https"]["port"]) == ("HTTPS", 443)
    assert (listeners["http"]["protocol"], listeners["http"]["port"]) == ("HTTP", 80)
    routes = [o for o in objects if o["kind"] == "HTTPRoute"]
    by_listener = {}
    for route in routes:
        for parent in route["spec"]["parentRefs"]:
            assert parent["name"] == "payments"
            by_listener.setdefault(parent["sectionName"], []).append(route)
    # Plain HTTP: one route, every rule a permanent redirect to https and no backend at all.
    [redirect] = by_listener["http"]
    for rule in redirect["spec"]["rules"]:
        assert "backendRefs" not in rule
        assert rule["filters"] == [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https", "statusCode": 301}}]
    # HTTPS: the docs' paths to Swagger UI, the rest to Envoy.
    [api] = by_listener["https"]
    rules = api["spec"]["rules"]
    assert rules[-1] == {"backendRefs": [{"name": "payments", "port": 8080}]}  # no match: every path
    docs = {m["path"]["value"] for m in rules[0]["matches"]}
    assert rules[0]["backendRefs"] == [{"name": "swagger-ui", "port": 8080}]
    # What the page loads: ui/ and the document it fetches (swagger-initializer.js: ../payments.swagger.json).
    initializer = (ROOT / "openapi" / "ui" / "swagger-initializer.js").read_text()
    assert 'var DOCUMENT = "../payments.swagger.json";' in initializer
    assert {"/ui/", "/payments.swagger.json", "/payments.openapi.json"} <= docs and not any(d.startswith("/v1") for d in docs)
    for ref in (rules[0]["backendRefs"][0], rules[-1]["backendRefs"][0]):
        service = support.find(objects, "Service", ref["name"])
        assert ref["port"] in [p["port"] for p in service["spec"]["ports"]]


def test_envoy_behind_the_gateway_speaks_tls_trusts_the_load_balancers_hops_and_sends_hsts():
    config = support.envoy_config(ROOT / "envoy" / "envoy-gke.yaml")
    chain = config["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = chain["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["alpn_protocols"] == ["h2", "http/1.1"] and tls["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    manager = chain["filters"][0]["typed_config"]
    # "<client>, <load balancer>" appended by Google's front end: the client is two hops from the right.
    assert manager["use_remote_address"] is True and manager["xff_num_trusted_hops"] == 2
    headers = {h["header"]["key"]: h["header"]["value"] for h in manager["route_config"]["response_headers_to_add"]}
    assert headers["strict-transport-security"].startswith("max-age=31536000")


def _policy(objects, kind, name):
    policy = support.find(objects, kind, name)
    target = policy["spec"]["targetRef"]
    support.find(objects, target["kind"], target["name"])  # it exists
    return policy["spec"]["default"], target


def test_gke_policies_health_check_envoys_ready_and_outlast_envoys_timeouts(objects):
    """GKE publishes no schema for its policy kinds, so each field used is checked against the
    values GKE documents, and against what Envoy does."""
    health, target = _policy(objects, "HealthCheckPolicy", "payments")
    assert target == {"group": "", "kind": "Service", "name": "payments"}
    assert health["config"]["type"] == "HTTP2"  # HTTP/2 over TLS, as the load balancer sends requests
    assert health["config"]["http2HealthCheck"] == {"portSpecification": "USE_SERVING_PORT", "requestPath": "/ready"}
    assert health["timeoutSec"] <= health["checkIntervalSec"] and health["unhealthyThreshold"] >= 2
    ui_health, _ = _policy(objects, "HealthCheckPolicy", "swagger-ui")
    ui = support.container(support.find(objects, "Deployment", "swagger-ui")["spec"]["template"]["spec"], "swagger-ui")
    assert ui_health["config"]["httpHealthCheck"]["requestPath"] == ui["readinessProbe"]["httpGet"]["path"]
    backend, target = _policy(objects, "GCPBackendPolicy", "payments")
    routes = support.envoy_config()["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    text = (ROOT / "envoy" / "envoy.yaml").read_text()
    longest = max(int(m) for m in re.findall(r"max_stream_duration: (\d+)s", text) + re.findall(r"request_timeout: (\d+)s", text))
    assert backend["timeoutSec"] > longest, (backend["timeoutSec"], longest)
    assert routes["request_timeout"] == "5s"  # the whole request within 5 s (envoy/README.md); answers take up to 60 s
    drain = int(re.search(r"sleep (\d+)\s*$", support.container(support.find(objects, "Deployment", "payments")["spec"]["template"]["spec"], "envoy")["lifecycle"]["preStop"]["exec"]["command"][-1])[1])
    assert backend["connectionDraining"]["drainingTimeoutSec"] == drain
    gateway_policy, target = _policy(objects, "GCPGatewayPolicy", "payments")
    assert target["kind"] == "Gateway" and gateway_policy == {"sslPolicy": "payments-tls"}
    assert "ssl-policies create payments-tls --profile=MODERN --min-tls-version=1.2" in (ROOT / "docs" / "deploy.md").read_text()


def test_probes_tolerate_a_busy_pod(api_pod):
    """A login flood at the CPU limit slows health answers to 0.2 s at most (tests/faults/test_cpu_limit.py):
    every probe waits 3 s, readiness needs two failures in a row, liveness 30 s of them."""
    for c in support.pod_containers(api_pod):
        if c["name"] == "cloud-sql-proxy":
            continue  # upstream's numbers, test_cloud_sql_proxy_*
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe:
                assert probe["timeoutSeconds"] >= 3, (c["name"], kind)
                assert probe["failureThreshold"] >= 2, (c["name"], kind)
        liveness = c["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30, c["name"]


def test_the_walk_through_uses_least_privilege_identities_and_a_private_database(api_pod):
    """docs/deploy.md: builds and nodes run as accounts of their own with only the roles they need
    (not the Compute Engine default account), and the database has no public address."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "-compute@developer.gserviceaccount.com" not in text and "roles/editor" not in text
    assert "--service-account=projects/$PROJECT_ID/serviceAccounts/$BUILD_SA" in text
    assert "gcloud container clusters create-auto payments --region=$REGION --service-account=$NODE_SA" in text
    granted = re.findall(r"--role=(roles/[A-Za-z.]+)", text)
    assert set(granted) <= {"roles/artifactregistry.writer", "roles/artifactregistry.reader", "roles/logging.logWriter",
                            "roles/container.defaultNodeServiceAccount", "roles/storage.objectViewer",
                            "roles/cloudsql.client", "roles/iam.workloadIdentityUser"}, set(granted)
    assert "--network=default --no-assign-ip" in text
    assert "--private-ip" in support.container(api_pod, "cloud-sql-proxy")["args"]


def test_managed_prometheus_scrapes_envoys_and_the_servers_metrics_on_every_api_pod(each_overlay):
    monitoring = support.find(each_overlay, "PodMonitoring", "payments-envoy")["spec"]
    pod = support.find(each_overlay, "Deployment", "payments")["spec"]["template"]
    assert monitoring["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    envoys, servers = monitoring["endpoints"]
    envoy = support.container(pod["spec"], "envoy")
    assert {"name": "metrics", "containerPort": support.envoy_listener_port("metrics")} in envoy["ports"]
    assert (envoys["port"], envoys["path"]) == ("metrics", "/stats/prometheus")
    # The server's endpoint listens on the pod's address, at the port the container names.
    server = support.container(pod["spec"], "server")
    assert {"name": "server-metrics", "containerPort": 9464} in server["ports"]
    assert (servers["port"], servers["path"]) == ("server-metrics", "/metrics")
    [source] = [e["configMapRef"]["name"] for e in server["envFrom"] if "configMapRef" in e]
    config = support.find(each_overlay, "ConfigMap", source)["data"]
    assert config["PAYMENTS_METRICS_ADDR"] == "0.0.0.0:9464"
    endpoint = envoys
    # What the metrics listener passes on (everything else is a 404 there: tests/e2e/test_metrics_port.py).
    metrics = next(l for l in support.envoy_config()["static_resources"]["listeners"] if l["name"] == "metrics")
    routes = metrics["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert routes[0]["match"]["path"] == endpoint["path"] and routes[0]["route"]["cluster"] == "envoy_admin"
    assert routes[1] == {"match": {"prefix": "/"}, "direct_response": {"status": 404}}
