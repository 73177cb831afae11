"""The images' build and start, replayed here: the RUN steps of the generation stages run as
written (their /build paths mapped to a temp dir), then the server starts from the generated
code the way the runtime image starts it, and the compose health check and the Swagger UI init
command run against that.

Only the pip steps are not replayed: the venv already holds requirements.lock's versions, which
is what those steps install (test_images checks they are constrained by the lock).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
from google.protobuf import descriptor_pb2

from tests.support import deploy as support
from tests.support.deploy import ROOT
from tests.support.stack import listening_port, wait_until

# The first Go build with the image's flags (static, -trimpath) compiles the plugin's dependencies
# once on a fresh machine; later runs take seconds.
pytestmark = pytest.mark.timeout(900)


def _replay(kind: str, stage_name: str, build: Path, cwd: Path, env: dict[str, str]) -> None:
    st = support.stage(kind, stage_name)
    stage_env = {k: v.replace("/build/", f"{build}/") for k, v in st.env().items()}
    for run in st.all("RUN"):
        if "pip install" in run.args:
            continue
        command = run.args.replace("/build/", f"{build}/")
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd,
                                env={**os.environ, **stage_env, **env}, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{stage_name}: {command}\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """/build of the image build: bin/, grpc-gateway/ and out/ (gen/python, gen/payments.pb, openapi/)."""
    build = tmp_path_factory.mktemp("build")
    # go-tools: WORKDIR /build/tools holds exactly what the stage copies there.
    go_tools = support.stage("server", "go-tools")
    (build / "tools").mkdir()
    for source_stage, sources, dest in go_tools.copies():
        assert source_stage is None and dest == PurePosixPath("/build/tools")
        for src in sources:
            shutil.copy(ROOT / src, build / "tools")
    _replay("server", "go-tools", build, build / "tools", {})
    # gen: WORKDIR /build holds scripts/gen.sh and proto/; its PYTHON is a venv of the lock's versions.
    _replay("server", "gen", build, ROOT, {"PYTHON": sys.executable})
    return build


def test_generation_stage_outputs_what_the_images_copy(built):
    out = built / "out"
    for kind in support.DOCKERFILES:
        for source_stage, sources, _ in support.final_stage(kind).copies():
            if source_stage == "gen":
                for src in sources:
                    assert (built / src.removeprefix("/build/")).exists(), f"{kind}: COPY --from=gen {src}"
    descriptors = descriptor_pb2.FileDescriptorSet.FromString((out / "gen" / "payments.pb").read_bytes())
    services = {f"{f.package}.{s.name}" for f in descriptors.file for s in f.service}
    transcoded = support.envoy_config()
    assert {"payments.v1.PaymentService", "payments.v1.AuthService"} <= services
    for f in transcoded["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
        if f["name"] == "envoy.filters.http.grpc_json_transcoder":
            assert set(f["typed_config"]["services"]) <= services


def test_document_in_the_server_image_is_the_committed_one(built):
    """Swagger UI in compose and Kubernetes serves the document built into the server image."""
    generated = json.loads((built / "out" / "openapi" / "payments.swagger.json").read_text())
    assert generated == json.loads((ROOT / "openapi" / "payments.swagger.json").read_text())


@pytest.fixture
def app_dir(built, tmp_path, keys_dir) -> Path:
    """/app of the runtime image: server/, gen/python, openapi/, scripts/, keys/ (mounted), data/,
    swagger-ui/."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "server").symlink_to(ROOT / "server")
    (app / "gen").mkdir()
    (app / "gen" / "python").symlink_to(built / "out" / "gen" / "python")
    (app / "openapi").mkdir()
    shutil.copy(built / "out" / "openapi" / "payments.swagger.json", app / "openapi")
    (app / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "openapi_host.py", app / "scripts")
    shutil.copytree(keys_dir, app / "keys")
    (app / "data").mkdir()
    (app / "swagger-ui").mkdir()
    return app


def _image_env(app: Path) -> dict[str, str]:
    env = {k: v for k, v in support.final_stage("server").env().items() if k != "PATH"}
    env["PAYMENTS_GEN_DIR"] = env["PAYMENTS_GEN_DIR"].replace("/app/", f"{app}/")
    env["PAYMENTS_LISTEN_ADDR"] = "127.0.0.1:0"  # the image's 0.0.0.0:50051, on a free port
    return env


def test_server_starts_like_the_image_and_passes_the_compose_healthcheck(app_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAYMENTS_", "DATABASE_URL"))}
    env.update(_image_env(app_dir), PAYMENTS_JOBS_ENABLED="false", PAYMENTS_GRACE_SECONDS="1")
    log = tmp_path / "server.log"
    command = support.image_command("server")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, *command[1:]], cwd=app_dir, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        port = wait_until("server", lambda: listening_port(log), proc, log)
        healthcheck = support.compose()["services"]["server"]["healthcheck"]["test"]
        assert healthcheck[:2] == ["CMD", "python"]
        script = healthcheck[3]
        assert "127.0.0.1:50051" in script
        check = [sys.executable, "-c", script.replace("127.0.0.1:50051", f"127.0.0.1:{port}")]
        result = subprocess.run(check, cwd=app_dir, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        # Stopped: the same health check now fails.
        result = subprocess.run(check, cwd=app_dir, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_swagger_ui_init_command_writes_the_document_with_the_api_host(app_dir, where):
    if where == "compose":
        service = support.compose()["services"]["openapi"]
        command, env = service["command"], dict(service["environment"])
    else:
        objects = support.render_k8s()
        pod = support.find(objects, "Deployment", "swagger-ui")["spec"]["template"]["spec"]
        init = support.container(pod, "openapi")
        command = init["command"]
        config_map = init["envFrom"][0]["configMapRef"]["name"]
        env = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == config_map)["data"]
    assert command[0] == "python"
    result = subprocess.run([sys.executable, *command[1:]], cwd=app_dir, env={**os.environ, **env},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    document = json.loads((app_dir / command[-1]).read_text())
    assert document["host"] == env["API_HOST"]
    assert document["schemes"] == [env.get("API_SCHEME", "http")]
    assert document["paths"] == json.loads((ROOT / "openapi" / "payments.swagger.json").read_text())["paths"]


def test_openapi_host_rejects_a_bad_host(app_dir, tmp_path):
    result = subprocess.run([sys.executable, "scripts/openapi_host.py", "openapi/payments.swagger.json",
                             str(tmp_path / "out.json")], cwd=app_dir,
                            env={**os.environ, "API_HOST": "evil.example/path"}, capture_output=True, text=True)
    assert result.returncode == 2 and "API_HOST" in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_compose_keys_command_makes_a_key_pair_once(app_dir):
    """The `keys` one-shot fills the empty keys volume on the first `up` and leaves it alone after."""
    shutil.rmtree(app_dir / "keys")
    (app_dir / "keys").mkdir()
    command = support.compose()["services"]["keys"]["command"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYMENTS_")}
    env.update(_image_env(app_dir))
    runs = [subprocess.run([sys.executable, *command[1:]], cwd=app_dir, env=env, capture_output=True, text=True,
                           timeout=60) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    private, jwks = app_dir / "keys" / "jwt-private.pem", app_dir / "keys" / "jwks.json"
    assert private.stat().st_mode & 0o077 == 0, "the signing key must be private to the server's user"
    assert jwks.stat().st_mode & 0o004, "Envoy (another user) reads the JWKS"
    assert json.loads(jwks.read_text())["keys"] and "keys exist" in runs[1].stdout
