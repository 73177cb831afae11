import dataclasses
import os
from pathlib import Path

import pytest

from server.infra import config


def test_defaults_are_safe_and_local():
    s = config.load({})
    assert s.listen_addr == "127.0.0.1:50051"
    assert s.database_url == ""
    assert s.sqlite_path == Path("data/payments.db")
    assert s.jobs_enabled is True


def test_reads_every_documented_variable():
    s = config.load({
        "PAYMENTS_LISTEN_ADDR": "0.0.0.0:6000",
        "DATABASE_URL": "postgresql://u:p@h:5432/d",
        "PAYMENTS_DATA_DIR": "/var/lib/payments",
        "PAYMENTS_WORKER_THREADS": "4",
        "PAYMENTS_GRACE_SECONDS": "2.5",
        "PAYMENTS_LOG_LEVEL": "debug",
        "PAYMENTS_PAGE_TOKEN_SECRET": "0123456789abcdef",
        "PAYMENTS_JOBS_ENABLED": "false",
        "PAYMENTS_JWT_TTL_SECONDS": "60",
    })
    assert (s.listen_addr, s.database_url, s.data_dir) == ("0.0.0.0:6000", "postgresql://u:p@h:5432/d", Path("/var/lib/payments"))
    assert (s.worker_threads, s.grace_seconds, s.log_level) == (4, 2.5, "DEBUG")
    assert s.page_token_secret == b"0123456789abcdef"
    assert s.jobs_enabled is False and s.jwt_ttl_seconds == 60


@pytest.mark.parametrize("env, message", [
    ({"PAYMENTS_WORKER_THREADS": "many"}, "PAYMENTS_WORKER_THREADS must be an integer"),
    ({"PAYMENTS_WORKER_THREADS": "0"}, "PAYMENTS_WORKER_THREADS must be >= 1"),
    ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL must start with"),
    ({"PAYMENTS_LOG_LEVEL": "loud"}, "PAYMENTS_LOG_LEVEL"),
    ({"PAYMENTS_JOBS_ENABLED": "maybe"}, "PAYMENTS_JOBS_ENABLED must be true or false"),
    ({"PAYMENTS_PAGE_TOKEN_SECRET": "short"}, "at least 16"),
    ({"PAYMENTS_GRACE_SECONDS": "-1"}, "PAYMENTS_GRACE_SECONDS must be >= 0"),
])
def test_bad_values_are_refused_with_the_variable_named(env, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(env)


def test_secrets_never_appear_in_repr():
    s = config.load({"PAYMENTS_PAGE_TOKEN_SECRET": "0123456789abcdef-secret", "PAYMENTS_ADMIN_PASSWORD": "hunter2hunter2"})
    assert "secret" not in repr(s).replace("page_token_secret", "") and "hunter2" not in repr(s)


# --- server processes (server/edge/processes.py, server/infra/cpus.py) ---

def _cgroup(directory: Path, v2: str | None = None, v1: tuple[int, int] | None = None) -> Path:
    """A stand-in for /sys/fs/cgroup: cgroup v2's cpu.max, or v1's cpu/cpu.cfs_* files."""
    directory.mkdir()
    if v2 is not None:
        (directory / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (directory / "cpu").mkdir()
        (directory / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (directory / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return directory


@pytest.mark.parametrize("v2, v1, expected", [
    ("50000 100000", None, 1),        # 500m, as k8s/base limits the server: one process
    ("max 100000", None, "mine"),     # no quota: the CPUs this process may run on
    (None, (150000, 100000), 1),      # v1, 1.5 CPUs: rounded down
    (None, (-1, 100000), "mine"),     # v1, no quota
    ("6400000 100000", None, "mine"),  # a quota above the affinity: the affinity
    (None, None, "mine"),             # no cgroup files at all
])
def test_the_cpus_available_are_the_quota_rounded_down_within_the_affinity(tmp_path, v2, v1, expected):
    from server.infra import cpus

    mine = len(os.sched_getaffinity(0))
    assert cpus.available(_cgroup(tmp_path / "cgroup", v2, v1)) == (mine if expected == "mine" else min(expected, mine))


def test_processes_default_to_the_cpus_available_at_most_four():
    from server.infra import cpus

    assert config.load({}).processes == min(config.MAX_PROCESSES, cpus.available())
    assert config.load({"PAYMENTS_PROCESSES": "auto"}).processes == config.load({}).processes
    assert config.load({"PAYMENTS_PROCESSES": "3"}).processes == 3
    for bad in ("0", "5", "two"):
        with pytest.raises(config.ConfigError, match="PAYMENTS_PROCESSES"):
            config.load({"PAYMENTS_PROCESSES": bad})


def test_each_server_process_gets_its_port_the_shared_page_key_and_only_the_first_the_jobs():
    from server.edge.processes import settings_for

    base = config.Settings(listen_addr="0.0.0.0:50051", processes=3, jobs_enabled=True, page_token_secret=b"")
    children = [settings_for(base, i, b"k" * 32) for i in range(3)]
    assert [c.listen_addr for c in children] == ["0.0.0.0:50051", "0.0.0.0:50052", "0.0.0.0:50053"]
    assert [c.jobs_enabled for c in children] == [True, False, False]
    assert {c.page_token_secret for c in children} == {b"k" * 32} and {c.processes for c in children} == {1}
    assert settings_for(dataclasses.replace(base, jobs_enabled=False), 0, b"k").jobs_enabled is False
    assert settings_for(dataclasses.replace(base, listen_addr="127.0.0.1:0"), 2, b"k").listen_addr == "127.0.0.1:0"


SUB, CLIENT = "104412345678901234567", "cli_" + "a" * 26


def test_google_service_accounts_are_off_by_default_and_pinned_by_sub_to_a_client():
    assert (config.load({}).google_audience, config.load({}).google_service_accounts) == ("", ())
    s = config.load({"PAYMENTS_GOOGLE_AUDIENCE": "https://payments.example.com",
                     "PAYMENTS_GOOGLE_SERVICE_ACCOUNTS": f" {SUB}={CLIENT}, 7=cli_{'b' * 26} ",
                     "PAYMENTS_GOOGLE_JWKS_URL": "http://127.0.0.1:1/certs"})
    assert s.google_service_accounts == ((SUB, CLIENT), ("7", "cli_" + "b" * 26))
    assert (s.google_audience, s.google_issuer, s.google_jwks_url) == (
        "https://payments.example.com", "https://accounts.google.com", "http://127.0.0.1:1/certs")


@pytest.mark.parametrize("env, message", [
    ({"PAYMENTS_GOOGLE_AUDIENCE": "https://p.example.com"}, "both PAYMENTS_GOOGLE_AUDIENCE and"),
    ({"PAYMENTS_GOOGLE_SERVICE_ACCOUNTS": f"{SUB}={CLIENT}"}, "both PAYMENTS_GOOGLE_AUDIENCE and"),
    ({"PAYMENTS_GOOGLE_AUDIENCE": "a", "PAYMENTS_GOOGLE_SERVICE_ACCOUNTS": f"shop@p.iam.gserviceaccount.com={CLIENT}"},
     "unique id"),
    ({"PAYMENTS_GOOGLE_AUDIENCE": "a", "PAYMENTS_GOOGLE_SERVICE_ACCOUNTS": f"{SUB}=shopping"}, "not a service client id"),
    ({"PAYMENTS_GOOGLE_AUDIENCE": "a", "PAYMENTS_GOOGLE_SERVICE_ACCOUNTS": f"{SUB}"}, "not a service client id"),
    ({"PAYMENTS_GOOGLE_AUDIENCE": "a", "PAYMENTS_GOOGLE_SERVICE_ACCOUNTS": f"{SUB}={CLIENT},{SUB}={CLIENT}"}, "twice"),
])
def test_google_settings_that_cannot_work_stop_the_start(env, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(env)
