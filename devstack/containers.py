"""The images run for real with podman: the engine set up for this machine, the images built by
`make images`' own script, and the API pod (server + Envoy sharing one network namespace, the
Kubernetes sidecar shape) started with the security settings k8s/ gives each container.

Podman's storage keeps the base image and the build cache between runs on one machine, so only the
first run builds from nothing (about two minutes here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from devstack import manifests
from devstack.stack import free_port, http_status  # noqa: F401 (free_port: for the container tests)

ROOT = Path(__file__).resolve().parent.parent
GRPCURL = str(ROOT / ".tools" / "bin" / "grpcurl")
IMAGES = {name: f"localhost/payments-{name}:local" for name in ("server", "envoy", "swagger-ui")}
SERVER_UID = 10001


class Podman:
    """The podman CLI with this project's containers.conf (runc, cgroupfs, ulimits this machine allows)."""

    def __init__(self, work: Path):
        if shutil.which("podman") is None:
            raise RuntimeError("podman is missing: scripts/system-deps.sh test installs it")
        conf = work / "containers.conf"
        conf.write_text(subprocess.run([str(ROOT / "scripts" / "containers-conf.sh")], check=True,
                                       capture_output=True, text=True).stdout)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf), "ENGINE": "podman"}

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 input: str | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def build_images(self) -> str:
        """scripts/images.sh, the script behind `make images`; returns its report (sizes, times)."""
        r = subprocess.run([str(ROOT / "scripts" / "images.sh")], env=self.env, cwd=ROOT,
                           capture_output=True, text=True, timeout=1500)
        if r.returncode != 0:
            raise AssertionError(f"scripts/images.sh failed:\n{r.stdout}\n{r.stderr[-4000:]}")
        return r.stdout

    def inspect(self, what: str) -> dict:
        return json.loads(self("inspect", what).stdout)[0]


def security_flags(container: dict) -> list[str]:
    """podman run flags for a k8s container's securityContext (what the kubelet would apply)."""
    sc = container["securityContext"]
    flags = [f"--user={sc['runAsUser']}:{sc['runAsGroup']}"]
    if sc.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        flags.append("--security-opt=no-new-privileges")
    for cap in sc.get("capabilities", {}).get("drop", []):
        flags.append(f"--cap-drop={cap}")
    return flags


def api_pod_spec() -> dict:
    return manifests.find(manifests.render_k8s(), "Deployment", "payments")["spec"]["template"]["spec"]


def grpc_health(addr: str) -> str | None:
    """The server's grpc.health.v1 status at addr, asked as a kubelet probe asks it (None: no answer)."""
    r = subprocess.run([GRPCURL, "-plaintext", addr, "grpc.health.v1.Health/Check"], capture_output=True,
                       text=True, timeout=30)
    return json.loads(r.stdout).get("status") if r.returncode == 0 else None


def wait_ready(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_status(url) == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready within {timeout} s")


@dataclasses.dataclass
class ApiPod:
    """server + Envoy in one podman pod; Envoy's 8080 and the server's 50051 published on loopback
    (50051 only for the health checks a kubelet would make from outside the pod)."""

    podman: Podman
    name: str
    work: Path
    api_port: int
    grpc_port: int
    env: dict[str, str]
    envoy_env: dict[str, str]
    # The rendered Deployment's pod spec, read once (kustomize takes a moment; not while timed).
    spec: dict = dataclasses.field(default_factory=api_pod_spec)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def prepare(self) -> None:
        """Keys made by the server image's own CLI (as compose's `keys` service does), data dir
        owned by the server's user (as an fsGroup volume would be)."""
        for d in ("keys", "data"):
            (self.work / d).mkdir(exist_ok=True)
            os.chown(self.work / d, SERVER_UID, SERVER_UID)
        self.podman("run", "--rm", "--read-only", "--cap-drop=ALL", "-v", f"{self.work / 'keys'}:/app/keys",
                    IMAGES["server"], "python", "-m", "server.cli", "keys", "--if-missing")

    def start(self) -> None:
        self.create()
        self.run_containers()
        wait_ready(f"{self.url}/ready")

    def create(self) -> None:
        """The pod alone: its network namespace and published ports."""
        self.podman("pod", "create", "--name", self.name, "-p", f"127.0.0.1:{self.api_port}:8080",
                    "-p", f"127.0.0.1:{self.grpc_port}:50051")

    def run_containers(self) -> None:
        """Both containers started in the pod, without waiting for them to be ready."""
        server = manifests.container(self.spec, "server")
        envs = [f"--env={k}={v}" for k, v in self.env.items()]
        self.podman("run", "-d", "--pod", self.name, "--name", f"{self.name}-server", *security_flags(server),
                    "--tmpfs=/tmp:size=16m", *envs,
                    "-v", f"{self.work / 'keys'}:/app/keys:ro", "-v", f"{self.work / 'data'}:/app/data",
                    IMAGES["server"])
        envoy = manifests.container(self.spec, "envoy")
        envoy_envs = [f"--env={k}={v}" for k, v in self.envoy_env.items()]
        # Envoy gets the public keys only, as in k8s/ (the jwks item of the Secret).
        self.podman("run", "-d", "--pod", self.name, "--name", f"{self.name}-envoy", *security_flags(envoy),
                    *envoy_envs, "-v", f"{self.work / 'keys' / 'jwks.json'}:/app/keys/jwks.json:ro",
                    IMAGES["envoy"])

    def restart(self) -> None:
        self.podman("pod", "start", self.name)
        wait_ready(f"{self.url}/ready")

    def logs(self, container: str) -> str:
        r = self.podman("logs", f"{self.name}-{container}", check=False)
        return r.stdout + r.stderr

    def remove(self) -> None:
        self.podman("pod", "rm", "-f", "-t", "2", self.name, check=False)


@contextlib.contextmanager
def api_pod(podman: Podman, work: Path, *, cors_origins: str = "", env: dict[str, str] | None = None):
    pod = ApiPod(podman, f"payments-test-{uuid.uuid4().hex[:8]}", work, free_port(), free_port(),
                 env={"PAYMENTS_PAGE_TOKEN_SECRET": uuid.uuid4().hex, **(env or {})},
                 envoy_env={"PAYMENTS_CORS_ORIGINS": cors_origins})
    pod.prepare()
    try:
        pod.start()
        yield pod
    finally:
        pod.remove()
