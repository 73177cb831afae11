"""A PostgreSQL instance of a test's own (initdb into a temporary directory, pg_ctl on a free
port), so a test can stop and start it without touching the cluster other tests share.

PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
`postgres` OS user (runuser), and its directory belongs to that user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from devstack.stack import free_port


def _bin_dir() -> Path:
    """Debian's PostgreSQL binaries (the newest installed major version), or $PG_BIN."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else Path("/usr/lib/postgresql/15/bin")


BIN = _bin_dir()


class PrivatePostgres:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="payments-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.log = self.root / "postgres.log"
        as_root = os.geteuid() == 0
        self._prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
        if as_root:
            pg = pwd.getpwnam("postgres")
            os.chown(self.root, pg.pw_uid, pg.pw_gid)
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                  "-E", "UTF8", "--locale", "C")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/payments"

    def _run(self, *argv: str) -> None:
        out = subprocess.run([*self._prefix, *argv], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(argv)} failed: {out.stdout}{out.stderr}\n{log[-2000:]}")

    def start(self) -> None:
        # Sockets only on loopback TCP (and in our own directory), fsync off: a test database.
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off -c full_page_writes=off"
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str = "payments") -> None:
        self._run(str(BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-qAt",
                  "-c", f'CREATE DATABASE "{name}"')

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except RuntimeError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
