"""The stack as processes: `python -m server`, the real Envoy in front of it, and Swagger UI's
static files. `make run` (devstack/__main__.py) runs it on the fixed ports; the end-to-end tests
and the benchmarks run it on ports of their own.

Every port is chosen by the kernel (port 0) and read back, so there is no window in which
another process can take it: the server logs the port it bound, Envoy writes its admin address
to a file and reports its listener's port on the admin API. Envoy runs in a work directory that
holds keys/ and gen/, exactly as in the image, so the config's relative paths are exercised too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import http.server
import itertools
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from devstack.envoyconf import CONFIG, ROOT, render, with_google_keys_at
from server.infra import config

ENVOY = ROOT / ".venv" / "bin" / "envoy"
ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "admin-password-e2e"
START_TIMEOUT = 30.0


def wait_until(what: str, probe, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT):
    """Poll probe() until it returns a value; fail early (with the log) if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None:
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout}s\n{log.read_text()[-4000:]}")


def dies_with_parent() -> None:
    """A Popen preexec_fn: the child gets SIGTERM when the process that started it dies, even by
    SIGKILL (Linux's PR_SET_PDEATHSIG), so a killed `make run` leaves no server or Envoy behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def stop_process(proc: subprocess.Popen | None, timeout: float = 15) -> None:
    """SIGTERM (a server drains its calls), then SIGKILL if it has not exited within `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # the API's access log is Envoy's; keep this one quiet
        pass


def serve_files(directory: Path, address: tuple[str, int],
                tls: ssl.SSLContext | None = None) -> http.server.ThreadingHTTPServer:
    """Static files from `directory` on a thread of their own (make run's Swagger UI, and the tests'
    pages), over TLS with `tls`; stop with .shutdown() and .server_close()."""
    httpd = http.server.ThreadingHTTPServer(address, functools.partial(_QuietFiles, directory=str(directory)))
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, name=f"files:{address[1]}", daemon=True).start()
    return httpd


def free_port() -> int:
    """A loopback port that was free a moment ago, for what cannot bind port 0 and report it back
    (PostgreSQL, published container ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> int:
    """A base port whose `count` consecutive ports are free (server process i listens on base + i).
    Free means bindable: a port can be taken by a listener, or be the local end of an outgoing
    connection (a pooled PostgreSQL connection holds one for minutes), which no connect() sees.
    The base is picked below the kernel's ephemeral range (ip_local_port_range), from which every
    outgoing connection and every bind to port 0 takes its port: a port found free there could be
    handed out again before the server binds it (a clean-clone run lost a test that way)."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        base = random.randrange(max(1024, low - 12_000), low - count)
        if all(bindable("127.0.0.1", base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def bindable(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_status(url: str, ca: Path | None = None) -> int | None:
    """The status of GET url (None if nothing answers); `ca` verifies an https URL's certificate."""
    context = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def server_env(work: Path, **overrides: str) -> dict[str, str]:
    """The environment of a test server whose files live in `work`; overrides win."""
    env = {
        **os.environ,
        "PAYMENTS_LISTEN_ADDR": "127.0.0.1:0",
        "PAYMENTS_DATA_DIR": str(work / "data"),
        "PAYMENTS_JWT_PRIVATE_KEY_FILE": str(work / "keys" / "jwt-private.pem"),
        "PAYMENTS_JWKS_FILE": str(work / "keys" / "jwks.json"),
        "PAYMENTS_JOBS_ENABLED": "false",
        "PAYMENTS_ADMIN_EMAIL": ADMIN_EMAIL,
        "PAYMENTS_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PAYMENTS_PAGE_TOKEN_SECRET": "test-page-token-secret",
        "PAYMENTS_GRACE_SECONDS": "5",
        "PAYMENTS_PROCESSES": "1",  # ephemeral ports: Envoy could not find a second process's
        "PAYMENTS_METRICS_ADDR": "127.0.0.1:0",  # Server.metrics_port says which
    }
    env.pop("DATABASE_URL", None)
    env.update(overrides)
    return env


def logged_ports(log: Path, message: str) -> list[int]:
    """The ports of the server's log lines with this message written so far."""
    ports = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("message") == message:
            ports.append(int(entry["port"]))
    return ports


def listening_ports(log: Path) -> list[int]:
    """The ports of the server's "listening" log lines written so far (one per server process)."""
    return logged_ports(log, "listening")


def listening_port(log: Path) -> int | None:
    """The port from the server's first "listening" log line, once it has been written."""
    ports = listening_ports(log)
    return ports[0] if ports else None


_starts = itertools.count(1)


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path

    @classmethod
    def start(cls, work: Path, env: dict[str, str] | None = None, argv: list[str] | None = None,
              timeout: float = START_TIMEOUT, then: Callable[[config.Settings], None] | None = None) -> "Server":
        """Start `python -m server` (or argv) with server_env(work) (or env); each start logs to its own file.
        `then(settings)` runs once it listens (the tests add their accounts with it)."""
        log = work / f"server-{next(_starts)}.log"
        env = env or server_env(work)
        with log.open("wb") as out:
            proc = subprocess.Popen(argv or [sys.executable, "-m", "server"], cwd=ROOT, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            try:
                settings = config.load(env)
            except config.ConfigError:
                settings = None  # the server itself will say what is wrong, and exit
            processes = settings.processes if settings else 1
            # Every server process listening (one line each), then the first one's port.
            wait_until("server", lambda: len(listening_ports(log)) >= processes or None, proc, log, timeout)
            port = listening_port(log)
            if then is not None:
                then(settings or config.load(env))
        except BaseException:
            stop_process(proc)
            raise
        return cls(proc, port, log)

    @property
    def ports(self) -> list[int]:
        """Every server process's port, the first process's first."""
        return sorted(set(listening_ports(self.log)))

    @property
    def metrics_port(self) -> int | None:
        """The port of the Prometheus endpoint (its "metrics listening" log line), if it has one."""
        ports = logged_ports(self.log, "metrics listening")
        return ports[0] if ports else None

    def stop(self) -> None:
        stop_process(self.proc)


@dataclasses.dataclass
class Envoy:
    proc: subprocess.Popen
    port: int
    admin: str
    log: Path
    access_log: Path
    ca: Path | None = None  # set when the listener speaks TLS (envoy-tls.yaml)
    metrics_port: int = 0  # the metrics listener's (GET /stats/prometheus)

    @property
    def url(self) -> str:
        return f"{'https://localhost' if self.ca else 'http://127.0.0.1'}:{self.port}"

    @classmethod
    def start(cls, work: Path, backend_port: int | list[int], env: dict[str, str] | None = None,
              source: Path = CONFIG, ca: Path | None = None, google_jwks: str = "") -> "Envoy":
        """`backend_port`: the server's, or one per server process; `source`: envoy.yaml, or
        envoy-tls.yaml with `ca` the authority of work/tls/tls.crt; `google_jwks`: a stand-in's
        URL for Google's keys."""
        config = work / "envoy.yaml"
        # The admin port is chosen here, not by the kernel: the metrics listener forwards to it.
        text = source.read_text()
        if google_jwks:
            text = with_google_keys_at(text, google_jwks)
        config.write_text(render(text, listen_port=0, admin_port=free_port(), backend_port=backend_port))
        admin_file = work / "envoy-admin.txt"
        admin_file.unlink(missing_ok=True)
        log, access_log = work / "envoy.log", work / "envoy-access.log"
        with log.open("wb") as err, access_log.open("wb") as out:
            proc = subprocess.Popen(
                [str(ENVOY), "-c", str(config), "--disable-hot-restart", "--log-level", "warn", "--concurrency", "1",
                 "--file-flush-interval-msec", "200",
                 "--admin-address-path", str(admin_file)],
                cwd=work, stdout=out, stderr=err, env={**os.environ, **(env or {})},
            )
        try:
            def admin_address():
                return (admin_file.read_text().strip() or None) if admin_file.exists() else None

            admin = wait_until("envoy admin", admin_address, proc, log)

            def listener_ports():
                try:
                    with urllib.request.urlopen(f"http://{admin}/listeners?format=json", timeout=2) as r:
                        statuses = json.load(r)["listener_statuses"]
                except (OSError, ValueError, KeyError):
                    return None
                ports = {s["name"]: s["local_address"]["socket_address"].get("port_value") for s in statuses}
                return ports if ports.get("payments_api") and ports.get("metrics") else None

            ports = wait_until("envoy listeners", listener_ports, proc, log)
            envoy = cls(proc, ports["payments_api"], admin, log, access_log, ca, ports["metrics"])
            wait_until("envoy /ready", lambda: True if http_status(f"{envoy.url}/ready", ca) == 200 else None, proc, log)
        except BaseException:
            stop_process(proc)
            raise
        return envoy

    def set_runtime(self, **values: str) -> None:
        """Change runtime values through the admin interface (envoy.yaml's admin layer), e.g.
        edge_rate_limit__enforced="0" for edge_rate_limit.enforced (dots cannot be keywords)."""
        query = "&".join(f"{key.replace('__', '.')}={value}" for key, value in values.items())
        request = urllib.request.Request(f"http://{self.admin}/runtime_modify?{query}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as reply:
            if reply.status != 200:
                raise RuntimeError(f"runtime_modify {query}: HTTP {reply.status}")

    def stop(self) -> None:
        stop_process(self.proc)


def prepare_workdir(work: Path, keys: Path) -> None:
    """What Envoy's working directory holds in the image: keys/jwks.json and gen/payments.pb."""
    (work / "keys").mkdir(parents=True, exist_ok=True)
    shutil.copy(keys / "jwks.json", work / "keys" / "jwks.json")
    shutil.copy(keys / "jwt-private.pem", work / "keys" / "jwt-private.pem")
    (work / "gen").mkdir(exist_ok=True)
    shutil.copy(ROOT / "gen" / "payments.pb", work / "gen" / "payments.pb")
    shutil.copy(ROOT / "gen" / "rest_bindings.lua", work / "gen" / "rest_bindings.lua")
