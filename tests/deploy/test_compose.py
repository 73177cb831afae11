"""docker-compose.yml: valid against the Compose specification, loaded the way `docker compose`
loads it (compose-go: interpolation, profiles, references), and wired to what the images and
envoy.yaml actually do (ports, network namespace, mounts, the PostgreSQL profile)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

from tests.support import deploy as support
from tests.support.deploy import ROOT

COMPOSE = ROOT / "docker-compose.yml"
COMPOSECHECK = ROOT / ".tools" / "bin" / "composecheck"
# Variables the compose file reads from the environment; the tests choose them.
COMPOSE_VARIABLES = ("DATABASE_URL", "PAYMENTS_ADMIN_EMAIL", "PAYMENTS_ADMIN_PASSWORD", "PAYMENTS_LOG_LEVEL",
                     "PAYMENTS_CORS_ORIGINS")


def _validate(path) -> subprocess.CompletedProcess:
    """check-jsonschema with the Compose specification schema it ships (vendor.compose-spec)."""
    return subprocess.run([str(support.BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True)


def _load(path=COMPOSE, *profiles: str, **variables: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_VARIABLES and not k.startswith("COMPOSE_")}
    env.update(variables)
    return subprocess.run([str(COMPOSECHECK), str(path), *profiles], capture_output=True, text=True, env=env,
                          cwd=ROOT)


def _project(*profiles: str, **variables: str) -> dict:
    result = _load(COMPOSE, *profiles, **variables)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def services():
    return _project()["services"]


def _mounts(service) -> dict[str, tuple[str, bool]]:
    """target -> (volume, read_only)."""
    return {v["target"]: (v["source"], bool(v.get("read_only"))) for v in service.get("volumes", [])}


def test_compose_file_matches_the_compose_specification():
    result = _validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profiles", [(), ("postgres",)])
def test_compose_loads_as_docker_compose_would(profiles):
    assert _load(COMPOSE, *profiles).returncode == 0


@pytest.mark.parametrize("breakage", [
    # the schema check catches a value the specification does not allow
    ("schema", lambda c: c["services"]["server"]["depends_on"].update(keys={"condition": "whenever"})),
    # the loader catches what a schema cannot: without the profile, postgres does not exist
    ("load", lambda c: c["services"]["server"]["depends_on"]["postgres"].pop("required")),
    ("load", lambda c: c["services"]["envoy"].update(network_mode="service:api")),
])
def test_the_checks_reject_a_broken_file(tmp_path, breakage):
    check, damage = breakage
    broken = support.compose()
    damage(broken)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = _validate(path) if check == "schema" else _load(path)
    assert result.returncode != 0


def test_images_are_built_from_the_dockerfiles(services):
    assert services["server"]["build"] == {"context": str(ROOT), "dockerfile": "Dockerfile.server"}
    assert services["envoy"]["build"] == {"context": str(ROOT), "dockerfile": "Dockerfile.envoy"}
    assert services["swagger-ui"]["build"] == {"context": str(ROOT), "dockerfile": "Dockerfile.swagger-ui"}
    # The image names are the ones `make images` (scripts/images.sh) tags.
    for name in ("server", "envoy", "swagger-ui"):
        assert services[name]["image"] == f"payments-{name}:local"
    assert (services["keys"]["image"], services["keys"]["build"]) == (services["server"]["image"], services["server"]["build"])


def test_envoy_shares_the_servers_network_namespace_and_finds_it_where_envoy_yaml_says(services):
    assert services["envoy"]["network_mode"] == "service:server"
    host, port = support.envoy_backend()
    listen = support.final_stage("server").env()["PAYMENTS_LISTEN_ADDR"]
    assert host == "127.0.0.1" and listen.endswith(f":{port}")
    assert "PAYMENTS_LISTEN_ADDR" not in services["server"].get("environment", {})


def test_envoy_gets_the_environment_its_config_reads(services):
    wanted = set(re.findall(r'os\.getenv\("([A-Z_]+)"\)', support.ENVOY_CONFIG.read_text()))
    assert wanted <= set(services["envoy"].get("environment", {})), wanted


def test_only_envoys_port_is_published_and_only_on_loopback(services):
    listener = support.envoy_listener_port()
    assert [(p["host_ip"], p["target"], p["published"]) for p in services["server"]["ports"]] == [
        ("127.0.0.1", listener, str(listener))]
    assert "ports" not in services["envoy"]  # a service in another's namespace cannot publish
    assert all(p["host_ip"] == "127.0.0.1" for s in services.values() for p in s.get("ports", []))


def test_keys_volume_is_made_by_the_keys_command_and_mounted_read_only(services):
    from server.infra import config

    defaults = config.Settings()
    server_dir = support.final_stage("server").workdir
    envoy_dir = support.final_stage("envoy").workdir
    assert services["keys"]["command"] == ["python", "-m", "server.cli", "keys", "--if-missing"]
    assert _mounts(services["keys"])[str(server_dir / "keys")] == ("keys", False)
    assert str(defaults.jwks_file.parent) == str(defaults.jwt_private_key_file.parent)
    assert _mounts(services["server"])[str(server_dir / defaults.jwt_private_key_file.parent)] == ("keys", True)
    jwks = next(p for p in support.envoy_file_paths() if p.endswith("jwks.json"))
    assert _mounts(services["envoy"])[str(envoy_dir / PurePosixPath(jwks).parent)] == ("keys", True)
    assert services["server"]["depends_on"]["keys"]["condition"] == "service_completed_successfully"


def test_sqlite_by_default_in_the_images_data_volume(services):
    volume = support.final_stage("server").all("VOLUME")[0].args
    assert _mounts(services["server"])[volume] == ("data", False)
    assert services["server"]["environment"]["DATABASE_URL"] == ""
    assert "postgres" not in services


def test_postgres_profile_with_the_documented_database_url():
    documented = re.findall(r"DATABASE_URL=(\S+) docker compose --profile postgres up", COMPOSE.read_text())
    assert documented, "the header should show how to run with the postgres profile"
    services = _project("postgres", DATABASE_URL=documented[0])["services"]
    pg = services["postgres"]
    assert services["server"]["environment"]["DATABASE_URL"] == documented[0]
    assert services["server"]["depends_on"]["postgres"] == {"condition": "service_healthy", "required": False}
    url = urlparse(documented[0])
    env = pg["environment"]
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert (url.username, url.password, url.path.lstrip("/")) == (
        env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"])
    from server.infra import config

    assert config.load({"DATABASE_URL": documented[0]}).database_url == documented[0]


def test_swagger_ui_calls_the_api_where_compose_publishes_it(services):
    """The Swagger UI image's default API address is the page's host on port 8080 (no config.json
    mounted): that must be where Envoy is published, and the page's origin one Envoy allows."""
    ui = services["swagger-ui"]
    assert "volumes" not in ui
    initializer = (ROOT / "openapi" / "ui" / "swagger-initializer.js").read_text()
    assert f'var DEFAULT_API_PORT = "{support.envoy_listener_port()}";' in initializer
    published = ui["ports"][0]["published"]
    origins = services["envoy"]["environment"]["PAYMENTS_CORS_ORIGINS"].split(",")
    assert f"http://localhost:{published}" in origins and f"http://127.0.0.1:{published}" in origins


def test_containers_are_locked_down(services):
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
    for name in ("keys", "server", "envoy", "swagger-ui"):
        assert services[name].get("read_only") is True, name


def test_server_healthcheck_targets_the_images_port(services):
    """tests/containers runs this command in the real container; here: it targets the image's port."""
    test = services["server"]["healthcheck"]["test"]
    port = support.final_stage("server").env()["PAYMENTS_LISTEN_ADDR"].rsplit(":", 1)[1]
    assert test[:3] == ["CMD", "python", "-c"] and f"127.0.0.1:{port}" in test[3]
