"""The dev stack (devstack/stack.py) as the tests use it: servers that hold the test accounts
behind tests.conftest's token_for tokens, and a server with Envoy in front of it."""

from __future__ import annotations

import contextlib
from pathlib import Path

from devstack import stack
from devstack.stack import (ADMIN_EMAIL, ADMIN_PASSWORD, ENVOY, ROOT, Envoy, free_port, http_status, listening_port,  # noqa: F401
                            prepare_workdir, serve_files, server_env, stop_process, wait_until)


class Server(stack.Server):
    @classmethod
    def start(cls, work: Path, env: dict[str, str] | None = None, argv: list[str] | None = None,
              timeout: float = stack.START_TIMEOUT, test_accounts: bool = True) -> "Server":
        """`test_accounts`: add the accounts and sessions behind tests.conftest's token_for tokens."""
        from tests.conftest import seed_accounts_into

        return super().start(work, env, argv, timeout, then=seed_accounts_into if test_accounts else None)


@contextlib.contextmanager
def running_stack(work: Path, keys: Path, envoy_env: dict[str, str] | None = None, database_url: str = "",
                  envoy_source: Path | None = None, ca: Path | None = None, server_overrides: dict[str, str] | None = None,
                  google_jwks: str = ""):
    """A server (SQLite, or PostgreSQL at database_url) and the real Envoy in front of it, stopped on
    exit; `envoy_source`: one of envoy.yaml's variants instead (with `ca` for envoy-tls.yaml);
    `server_overrides`: more of the server's environment; `google_jwks`: where Envoy fetches
    Google's keys (a stand-in's URL)."""
    prepare_workdir(work, keys)
    overrides = {**({"DATABASE_URL": database_url} if database_url else {}), **(server_overrides or {})}
    server = Server.start(work, server_env(work, **overrides) if overrides else None)
    try:
        envoy = Envoy.start(work, server.port, env=envoy_env, ca=ca, google_jwks=google_jwks,
                            **({"source": envoy_source} if envoy_source else {}))
    except BaseException:
        server.stop()
        raise
    try:
        yield server, envoy
    finally:
        envoy.stop()
        server.stop()
