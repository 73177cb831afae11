"""`make run` (`python -m devstack`): the gRPC server, Envoy in front of it and Swagger UI, in
the foreground.

Starts `python -m server` and Envoy (envoy/envoy.yaml on loopback only, working directory = the
repository root, so its relative paths keys/jwks.json and gen/payments.pb resolve), waits until Envoy's /ready says the
server passes its gRPC health checks, prints the URLs, and stops everything on Ctrl-C or SIGTERM.
Swagger UI (openapi/ui, see openapi/ui/package.json) is served as static files on port 8081 when
it has been installed. The environment passes through to the server. The process handling is
devstack/stack.py's, which the tests and benchmarks use too.
"""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time

from devstack.envoyconf import CONFIG, render
from devstack.stack import ENVOY, ROOT, dies_with_parent, http_status, port_in_use, serve_files, stop_process
from server.infra import config

API_URL = "http://127.0.0.1:8080"
ADMIN_URL = "http://127.0.0.1:9901"
UI_ADDR = ("127.0.0.1", 8081)
UI_DIR = ROOT / "openapi"  # the UI's page is openapi/ui/, and it loads ../payments.swagger.json
START_TIMEOUT = 60.0


def log(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


def serve_swagger_ui() -> http.server.ThreadingHTTPServer | None:
    """Static files for Swagger UI, if its distribution is installed (make setup does that)."""
    if not (UI_DIR / "ui" / "index.html").exists() or not (UI_DIR / "ui" / "node_modules" / "swagger-ui-dist").exists():
        log("Swagger UI not installed (openapi/ui/node_modules missing): skipping it")
        return None
    return serve_files(UI_DIR, UI_ADDR)


def reachable(host: str) -> str:
    """Where to look for a listener bound to `host` (every interface: loopback)."""
    return host.strip("[]") if host not in ("0.0.0.0", "", "[::]") else "127.0.0.1"


def main() -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    try:  # the server's own reading of the environment: its defaults, and its errors early
        settings = config.load()
    except config.ConfigError as e:
        log(f"configuration error: {e}")
        return 2
    listen = settings.listen_addr
    host, _, port = listen.rpartition(":")
    if port != "50051":
        log(f"PAYMENTS_LISTEN_ADDR={listen}: envoy/envoy.yaml expects the server on port 50051")
        return 1
    probe_host = reachable(host)
    server_ports = [int(port) + i for i in range(settings.processes)]  # one per server process
    metrics = [settings.metrics_addr.rsplit(":", 1)] if settings.metrics_addr else []
    busy = [p for h, p in (*((probe_host, p) for p in server_ports),
                           ("127.0.0.1", 8080), ("127.0.0.1", 9901), ("127.0.0.1", 9902), UI_ADDR,
                           *((reachable(h), int(p)) for h, p in metrics))
            if port_in_use(h, p)]
    if busy:
        log(f"port(s) {busy} already in use (another `make run`?); stop that first")
        return 1

    subprocess.run([sys.executable, "-m", "server.cli", "keys", "--if-missing"], cwd=ROOT, check=True)

    procs: list[subprocess.Popen] = []
    ui = None
    try:
        deadline = time.monotonic() + START_TIMEOUT

        def wait_for(ready) -> bool:
            while not ready():
                if any(p.poll() is not None for p in procs) or stop.is_set() or time.monotonic() > deadline:
                    if not stop.is_set():
                        log("the stack did not become ready (see the logs above)")
                    return False
                time.sleep(0.2)
            return True

        # Local development: webhooks may go to a receiver on this machine (http://127.0.0.1:...),
        # which a deployment refuses (docs/webhooks.md).
        server_env = {**os.environ, "PAYMENTS_WEBHOOK_ALLOW_LOOPBACK": os.environ.get("PAYMENTS_WEBHOOK_ALLOW_LOOPBACK", "true")}
        procs.append(subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=server_env,
                                      preexec_fn=dies_with_parent))
        # Envoy after the server listens, so its first health check already passes.
        if not wait_for(lambda: all(port_in_use(probe_host, p) for p in server_ports)):
            return 1
        # Envoy flushes its JSON access log (stdout) every second rather than every 10 s.
        # CORS: Envoy allows no browser origin unless told; here, the local Swagger UI's.
        ui_origins = f"http://{UI_ADDR[0]}:{UI_ADDR[1]},http://localhost:{UI_ADDR[1]}"
        envoy_env = {**os.environ, "PAYMENTS_CORS_ORIGINS": os.environ.get("PAYMENTS_CORS_ORIGINS") or ui_origins}
        # envoy/envoy.yaml as deployed, but listening on loopback only (its paths stay relative to ROOT).
        envoy_config = ROOT / settings.data_dir / "envoy-make-run.yaml"
        envoy_config.parent.mkdir(parents=True, exist_ok=True)
        envoy_config.write_text(render(CONFIG.read_text(), listen_port=8080, admin_port=9901, metrics_port=9902,
                                       backend_port=[50051 + i for i in range(4)], loopback_only=True))
        procs.append(subprocess.Popen([str(ENVOY), "-c", str(envoy_config), "--log-level", "warn",
                                       "--disable-hot-restart", "--concurrency", "1",
                                       "--file-flush-interval-msec", "1000"], cwd=ROOT, env=envoy_env,
                                      preexec_fn=dies_with_parent))
        if not wait_for(lambda: http_status(f"{API_URL}/ready") == 200):
            return 1
        ui = serve_swagger_ui()
        log("ready:")
        log(f"  REST (JSON)           {API_URL}/v1/...   e.g. POST {API_URL}/v1/auth/register")
        log("  gRPC through Envoy    127.0.0.1:8080     reflection there needs a token: -H 'authorization: Bearer …'")
        log(f"  gRPC direct (server)  {host}:{'/'.join(map(str, server_ports))}   "
            f"({settings.processes} process{'es' if settings.processes > 1 else ''}: PAYMENTS_PROCESSES)")
        log(f"  readiness             {API_URL}/ready")
        log(f"  Envoy admin           {ADMIN_URL} (loopback only)")
        log("  Envoy metrics         http://127.0.0.1:9902/stats/prometheus")
        if settings.metrics_addr:
            log(f"  server metrics        http://{settings.metrics_addr}/metrics (PAYMENTS_METRICS_ADDR)")
        if ui is not None:
            log(f"  Swagger UI            http://{UI_ADDR[0]}:{UI_ADDR[1]}/ui/")
        log("Ctrl-C stops everything")
        while not stop.is_set():
            if any(p.poll() is not None for p in procs):
                log("a process exited; stopping the stack")
                return 1
            stop.wait(0.5)
        return 0
    finally:
        if ui is not None:
            ui.shutdown()
        # Envoy first, so nothing new reaches the server; then the server drains in-flight calls.
        for p in reversed(procs):
            stop_process(p, timeout=20)
        log("stopped")


if __name__ == "__main__":
    sys.exit(main())
