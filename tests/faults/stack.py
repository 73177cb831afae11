"""Server processes for fault tests and benchmarks, started like tests/e2e/stack.py starts them
(`python -m server`, ports read back from the "listening" log line) but with the settings a
scenario needs: a given database, a fixed port to restart on, or another program entirely.
Envoy is started by tests.e2e.stack.Envoy, unchanged.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.e2e.stack import ADMIN_EMAIL, ADMIN_PASSWORD, ROOT, Server, _wait

_starts = itertools.count(1)


def free_port() -> int:
    """A port that was free a moment ago; only for a server that must come back on the same port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(work: Path, **overrides: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PAYMENTS_LISTEN_ADDR": "127.0.0.1:0",
        "PAYMENTS_DATA_DIR": str(work / "data"),
        "PAYMENTS_JWT_PRIVATE_KEY_FILE": str(work / "keys" / "jwt-private.pem"),
        "PAYMENTS_JWKS_FILE": str(work / "keys" / "jwks.json"),
        "PAYMENTS_JOBS_ENABLED": "false",
        "PAYMENTS_ADMIN_EMAIL": ADMIN_EMAIL,
        "PAYMENTS_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PAYMENTS_PAGE_TOKEN_SECRET": "faults-page-token-secret",
        "PAYMENTS_GRACE_SECONDS": "5",
    }
    env.pop("DATABASE_URL", None)
    env.update(overrides)
    return env


def start_server(work: Path, env: dict[str, str], argv: list[str] | None = None, timeout: float = 30.0) -> Server:
    """Start `python -m server` (or argv) with env; each start logs to its own file."""
    log = work / f"server-{next(_starts)}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv or [sys.executable, "-m", "server"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)

    def bound_port():
        for line in log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("message") == "listening":
                return int(entry["port"])
        return None

    try:
        port = _wait("server", bound_port, proc, log, timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return Server(proc, port, log)
