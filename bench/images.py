"""The images' numbers: size, time from container start to ready, memory at idle (part of `make bench`).

Builds with scripts/images.sh (cached after the first time), then, --rounds times, starts the API pod
(server + Envoy with the manifest's security settings, devstack/containers.py's ApiPod) and the Swagger UI container, and times each from
`podman run` to its readiness answer (the server: grpc.health SERVING; Envoy: /ready 200, which needs
the server; Swagger UI: /ui/ 200). Memory is each container's cgroup usage after 10 s at idle.
Prints the median round.

    .venv/bin/python bench/images.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack.containers import IMAGES, ApiPod, Podman, free_port, grpc_health  # noqa: E402
from devstack.stack import http_status  # noqa: E402


def until(check, timeout: float = 60) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit("not ready in time")
        time.sleep(0.02)
    return time.monotonic()


def memory_mb(podman: Podman, name: str) -> float:
    out = podman("stats", "--no-stream", "--format", "{{.MemUsage}}", name).stdout.split("/")[0].strip()
    number, unit = float(out.rstrip("kKMGB")), out.lstrip("0123456789.").upper()
    return number * {"KB": 1e-3, "MB": 1, "GB": 1e3}.get(unit, 1)


def round_once(podman: Podman, work: Path) -> dict[str, tuple[float, float]]:
    pod = ApiPod(podman, f"payments-bench-{int(time.time() * 1000)}", work, free_port(), free_port(), env={},
                 envoy_env={"PAYMENTS_CORS_ORIGINS": ""})
    pod.prepare()
    ui_port = free_port()
    try:
        start = time.monotonic()
        pod.create()
        pod_start = time.monotonic()
        pod.run_containers()
        server_ready = until(lambda: grpc_health(pod.grpc_addr) is not None)
        envoy_ready = until(lambda: http_status(f"{pod.url}/ready") == 200)
        ui_start = time.monotonic()
        podman("run", "-d", "--name", f"{pod.name}-ui", "--read-only", "--cap-drop=ALL", "--user=10001:10001",
               "-p", f"127.0.0.1:{ui_port}:8080", IMAGES["swagger-ui"])
        ui_ready = until(lambda: http_status(f"http://127.0.0.1:{ui_port}/ui/") == 200)
        time.sleep(10)
        return {
            "server": (server_ready - pod_start, memory_mb(podman, f"{pod.name}-server")),
            "envoy": (envoy_ready - start, memory_mb(podman, f"{pod.name}-envoy")),
            "swagger-ui": (ui_ready - ui_start, memory_mb(podman, f"{pod.name}-ui")),
        }
    finally:
        podman("rm", "-f", "-t", "1", f"{pod.name}-ui", check=False)
        pod.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        podman = Podman(Path(tmp))
        print(podman.build_images(), end="")
        rounds = []
        for i in range(args.rounds):
            work = Path(tmp) / f"round{i}"
            work.mkdir()
            rounds.append(round_once(podman, work))
        print("\n| image | size MB | start to ready s | memory at idle MB |")
        print("|---|---:|---:|---:|")
        for name in ("server", "envoy", "swagger-ui"):
            size = podman.inspect(IMAGES[name])["Size"] / 1e6
            ready = statistics.median(r[name][0] for r in rounds)
            memory = statistics.median(r[name][1] for r in rounds)
            print(f"| payments-{name} | {size:.0f} | {ready:.2f} | {memory:.1f} |")
        print("\n(envoy: from starting the pod to /ready 200, which waits for the server's health too)")


if __name__ == "__main__":
    main()
