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
