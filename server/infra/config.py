"""Configuration: the environment, read once into one typed, immutable object.

Nothing else in the server reads os.environ, so every knob is listed here and in docs/configuration.md's
configuration table, and tests build a Settings directly instead of patching the environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Mapping


class ConfigError(ValueError):
    """A setting is present but unusable; start-up stops with this message."""


@dataclasses.dataclass(frozen=True)
class Settings:
    listen_addr: str = "127.0.0.1:50051"  # the first server process's; process i listens on port + i
    processes: int = 1  # server processes (server/edge/processes.py); load() defaults to the CPUs available
    database_url: str = ""  # empty: SQLite file in data_dir
    data_dir: Path = Path("data")
    worker_threads: int = 4  # per process; more threads cost more CPU per call (docs/performance.md)
    max_concurrent_rpcs: int = 256
    auth_threads: int = 2  # concurrent password hashes (sign-up, login)
    max_streams: int = 8  # concurrent server-reflection streams
    stream_max_seconds: float = 120.0  # a public stream (reflection, health Watch) is ended after this
    request_seconds: float = 5.0  # a call whose request message has not arrived this long after its headers is ended
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    payment_ttl_seconds: int = 24 * 3600
    delete_retention_seconds: int = 30 * 24 * 3600
    # empty: random per process (single replica only); repr=False keeps secrets out of logs
    page_token_secret: bytes = dataclasses.field(default=b"", repr=False)
    page_token_ttl_seconds: int = 24 * 3600
    db_pool_size: int = 20
    # auth (tokens signed by this server, verified here and by Envoy)
    jwt_private_key_file: Path = Path("keys/jwt-private.pem")
    jwks_file: Path = Path("keys/jwks.json")
    jwt_issuer: str = "payments"
    jwt_audience: str = "payments-api"
    jwt_ttl_seconds: int = 300  # access tokens: short, a refresh token gets the next one
    refresh_ttl_seconds: int = 30 * 24 * 3600  # a session's refresh tokens end this long after login
    revocation_check_seconds: float = 5.0  # logout, disable, delete or a role change reach every call within this
    # Google service accounts as callers (server/infra/google_tokens.py, docs/cloudrun.md): off
    # unless an audience and at least one account are given; each account pinned by its unique id
    # (`sub`) and acting as a service client, whose permissions it gets.
    google_audience: str = ""
    google_issuer: str = "https://accounts.google.com"
    google_jwks_url: str = "https://www.googleapis.com/oauth2/v3/certs"
    google_service_accounts: tuple[tuple[str, str], ...] = ()  # (sub, client id)
    admin_email: str = ""
    admin_password: str = dataclasses.field(default="", repr=False)
    # jobs (APScheduler, in-process)
    jobs_enabled: bool = True
    expire_interval_seconds: int = 60
    purge_interval_seconds: int = 3600
    job_batch_size: int = 500
    # webhooks (docs/webhooks.md): the delivery job's tick, each POST's deadline, the retry schedule
    webhook_interval_seconds: int = 5
    webhook_timeout_seconds: float = 15.0  # the low end of Standard Webhooks' 15-30 s
    webhook_retry_base_seconds: float = 60.0  # after the n-th failure: base * 2^(n-1), at most the max delay
    webhook_retry_max_delay_seconds: float = 12 * 3600.0
    webhook_retry_window_seconds: float = 3 * 24 * 3600.0  # then the delivery is given up, the endpoint disabled
    webhook_batch_size: int = 100
    webhook_concurrency: int = 4  # POSTs in flight at once, each for a different payment
    webhook_max_endpoints: int = 20  # endpoints per deployment: each multiplies every change's delivery rows
    webhook_allow_loopback: bool = False  # local development and tests only: http:// and 127.0.0.1 endpoints
    # observability (docs/observability.md)
    metrics_addr: str = "127.0.0.1:9464"  # Prometheus scrape endpoint; empty: none
    otlp_endpoint: str = ""  # OTLP/gRPC collector for traces; empty: no spans are made or sent
    trace_project: str = ""  # Google Cloud project: log lines name traces as Cloud Logging wants

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "payments.db"


def _number(env: Mapping[str, str], name: str, default, parse, kind: str, minimum):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    return _number(env, name, default, int, "an integer", minimum)


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    return _number(env, name, default, float, "a number", 0)


# Where `make gen` writes the Python stubs: gen/python at the repository root.
GENERATED_CODE_DIR = Path(__file__).resolve().parents[2] / "gen" / "python"


def generated_code_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where the generated protobuf modules are: PAYMENTS_GEN_DIR (the image sets it), else gen/python.
    Apart from Settings, because the stubs are imported before any settings are loaded."""
    env = os.environ if env is None else env
    return Path(env.get("PAYMENTS_GEN_DIR") or GENERATED_CODE_DIR)


# Envoy's clusters list one endpoint per server process, ports 50051 to 50054 (envoy/envoy.yaml).
MAX_PROCESSES = 4


def _processes(env: Mapping[str, str]) -> int:
    raw = env.get("PAYMENTS_PROCESSES", "auto").strip().lower()
    if raw in ("", "auto"):
        from server.infra import cpus
        return min(MAX_PROCESSES, cpus.available())
    count = _int(env, "PAYMENTS_PROCESSES", 1, 1)
    if count > MAX_PROCESSES:
        raise ConfigError(f"PAYMENTS_PROCESSES must be at most {MAX_PROCESSES} (Envoy's clusters list that many ports)")
    return count


def _address(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, default).strip()
    if raw and (":" not in raw or not raw.rsplit(":", 1)[1].isdigit()):
        raise ConfigError(f"{name} must be host:port (or empty for none), got {raw!r}")
    return raw


_GOOGLE_SUB = re.compile(r"[0-9]{1,64}")
_CLIENT_ID = re.compile(r"cli_[a-z2-7]{26}")


def _google_accounts(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """PAYMENTS_GOOGLE_SERVICE_ACCOUNTS: `<sub>=<client id>` pairs, comma-separated. The sub is
    the account's unique id (digits), never its email: an email is a name that can be deleted and
    taken again by another account; the unique id never is."""
    raw = env.get("PAYMENTS_GOOGLE_SERVICE_ACCOUNTS", "").strip()
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        sub, _, client_id = (x.strip() for x in item.partition("="))
        if not _GOOGLE_SUB.fullmatch(sub):
            raise ConfigError("PAYMENTS_GOOGLE_SERVICE_ACCOUNTS pins each service account by its unique id "
                              f"(digits: gcloud iam service-accounts describe ... --format='value(uniqueId)'), got {sub!r}")
        if not _CLIENT_ID.fullmatch(client_id):
            raise ConfigError(f"PAYMENTS_GOOGLE_SERVICE_ACCOUNTS maps {sub} to {client_id!r}: not a service client id (cli_...)")
        if sub in pairs:
            raise ConfigError(f"PAYMENTS_GOOGLE_SERVICE_ACCOUNTS names {sub} twice")
        pairs[sub] = client_id
    return tuple(pairs.items())


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment; unset variables keep the safe defaults."""
    env = os.environ if env is None else env
    d = Settings()
    url = env.get("DATABASE_URL", "")
    if url and not url.startswith(("postgres://", "postgresql://", "sqlite:///")):
        raise ConfigError("DATABASE_URL must start with postgresql://, postgres:// or sqlite:///")
    level = env.get("PAYMENTS_LOG_LEVEL", d.log_level).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"PAYMENTS_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    secret = env.get("PAYMENTS_PAGE_TOKEN_SECRET", "")
    if secret and len(secret) < 16:
        raise ConfigError("PAYMENTS_PAGE_TOKEN_SECRET must be at least 16 characters")
    google_audience = env.get("PAYMENTS_GOOGLE_AUDIENCE", "").strip()
    google_accounts = _google_accounts(env)
    if bool(google_audience) != bool(google_accounts):
        raise ConfigError("Google service accounts need both PAYMENTS_GOOGLE_AUDIENCE and "
                          "PAYMENTS_GOOGLE_SERVICE_ACCOUNTS (or neither)")
    return Settings(
        listen_addr=env.get("PAYMENTS_LISTEN_ADDR", d.listen_addr),
        processes=_processes(env),
        database_url=url,
        data_dir=Path(env.get("PAYMENTS_DATA_DIR", str(d.data_dir))),
        worker_threads=_int(env, "PAYMENTS_WORKER_THREADS", d.worker_threads, 1),
        max_concurrent_rpcs=_int(env, "PAYMENTS_MAX_CONCURRENT_RPCS", d.max_concurrent_rpcs, 1),
        auth_threads=_int(env, "PAYMENTS_AUTH_THREADS", d.auth_threads, 1),
        max_streams=_int(env, "PAYMENTS_MAX_STREAMS", d.max_streams, 1),
        stream_max_seconds=_float(env, "PAYMENTS_STREAM_MAX_SECONDS", d.stream_max_seconds),
        request_seconds=_float(env, "PAYMENTS_REQUEST_SECONDS", d.request_seconds),
        grace_seconds=_float(env, "PAYMENTS_GRACE_SECONDS", d.grace_seconds),
        log_level=level,
        payment_ttl_seconds=_int(env, "PAYMENTS_PAYMENT_TTL_SECONDS", d.payment_ttl_seconds, 1),
        delete_retention_seconds=_int(env, "PAYMENTS_DELETE_RETENTION_SECONDS", d.delete_retention_seconds, 0),
        page_token_secret=secret.encode(),
        page_token_ttl_seconds=_int(env, "PAYMENTS_PAGE_TOKEN_TTL_SECONDS", d.page_token_ttl_seconds, 1),
        db_pool_size=_int(env, "PAYMENTS_DB_POOL_SIZE", d.db_pool_size, 1),
        jwt_private_key_file=Path(env.get("PAYMENTS_JWT_PRIVATE_KEY_FILE", str(d.jwt_private_key_file))),
        jwks_file=Path(env.get("PAYMENTS_JWKS_FILE", str(d.jwks_file))),
        jwt_issuer=env.get("PAYMENTS_JWT_ISSUER", d.jwt_issuer),
        jwt_audience=env.get("PAYMENTS_JWT_AUDIENCE", d.jwt_audience),
        jwt_ttl_seconds=_int(env, "PAYMENTS_JWT_TTL_SECONDS", d.jwt_ttl_seconds, 30),
        refresh_ttl_seconds=_int(env, "PAYMENTS_REFRESH_TTL_SECONDS", d.refresh_ttl_seconds, 60),
        revocation_check_seconds=_float(env, "PAYMENTS_REVOCATION_CHECK_SECONDS", d.revocation_check_seconds),
        google_audience=google_audience,
        google_issuer=env.get("PAYMENTS_GOOGLE_ISSUER", "").strip() or d.google_issuer,
        google_jwks_url=env.get("PAYMENTS_GOOGLE_JWKS_URL", "").strip() or d.google_jwks_url,
        google_service_accounts=google_accounts,
        admin_email=env.get("PAYMENTS_ADMIN_EMAIL", ""),
        admin_password=env.get("PAYMENTS_ADMIN_PASSWORD", ""),
        jobs_enabled=_bool(env, "PAYMENTS_JOBS_ENABLED", d.jobs_enabled),
        expire_interval_seconds=_int(env, "PAYMENTS_EXPIRE_INTERVAL_SECONDS", d.expire_interval_seconds, 1),
        purge_interval_seconds=_int(env, "PAYMENTS_PURGE_INTERVAL_SECONDS", d.purge_interval_seconds, 1),
        job_batch_size=_int(env, "PAYMENTS_JOB_BATCH_SIZE", d.job_batch_size, 1),
        webhook_interval_seconds=_int(env, "PAYMENTS_WEBHOOK_INTERVAL_SECONDS", d.webhook_interval_seconds, 1),
        webhook_timeout_seconds=_float(env, "PAYMENTS_WEBHOOK_TIMEOUT_SECONDS", d.webhook_timeout_seconds),
        webhook_retry_base_seconds=_float(env, "PAYMENTS_WEBHOOK_RETRY_BASE_SECONDS", d.webhook_retry_base_seconds),
        webhook_retry_max_delay_seconds=_float(env, "PAYMENTS_WEBHOOK_RETRY_MAX_DELAY_SECONDS",
                                               d.webhook_retry_max_delay_seconds),
        webhook_retry_window_seconds=_float(env, "PAYMENTS_WEBHOOK_RETRY_WINDOW_SECONDS", d.webhook_retry_window_seconds),
        webhook_batch_size=_int(env, "PAYMENTS_WEBHOOK_BATCH_SIZE", d.webhook_batch_size, 1),
        webhook_concurrency=_int(env, "PAYMENTS_WEBHOOK_CONCURRENCY", d.webhook_concurrency, 1),
        webhook_max_endpoints=_int(env, "PAYMENTS_WEBHOOK_MAX_ENDPOINTS", d.webhook_max_endpoints, 1),
        webhook_allow_loopback=_bool(env, "PAYMENTS_WEBHOOK_ALLOW_LOOPBACK", d.webhook_allow_loopback),
        metrics_addr=_address(env, "PAYMENTS_METRICS_ADDR", d.metrics_addr),
        # OpenTelemetry's own variables, so a collector set up for other services is found here too.
        otlp_endpoint=(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")).strip(),
        trace_project=env.get("GOOGLE_CLOUD_PROJECT", "").strip(),
    )
