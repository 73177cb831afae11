"""The load generators, run as external processes: ghz for gRPC, wrk for REST.

Both run for a fixed duration with a fixed number of concurrent requests, and both report
throughput, p50/p99 latency and errors, read from their machine-readable output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GHZ = ROOT / ".tools" / "bin" / "ghz"
# Envoy's runtime values that switch its per-address and per-caller limits off: a benchmark measures
# capacity from one address with one caller's token, not those policies (with the per-caller one
# on, an empty-handler baseline past 2,000 calls a second was mostly fast 429s, counted as calls).
UNLIMITED = {"edge_rate_limit__enforced": "0", "caller_rate_limit__enforced": "0"}
PROTOSET = ROOT / "gen" / "payments.pb"
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk.lua"


@dataclasses.dataclass
class Result:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    error_kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    latencies_ms: list[float] = dataclasses.field(default_factory=list)  # every call's, when asked for


def p99(latencies_ms: list[float]) -> float:
    """The 99th percentile of many runs' calls together (the nearest-rank method)."""
    ordered = sorted(latencies_ms)
    return ordered[max(0, -(-len(ordered) * 99 // 100) - 1)] if ordered else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def ghz(target: str, method: str, data: dict, token: str, *, seconds: float, concurrency: int,
        every_call: bool = False) -> Result:
    """gRPC load: `method` like "GetPayment" on payments.v1.PaymentService, for `seconds`;
    `every_call`: with each call's latency (ghz's per-call details), to pool runs.

    --duration-stop=wait lets calls in flight at the end finish, so the end of the run is not
    counted as errors. `{{.UUID}}` in data is a fresh UUID per call (ghz templates).
    """
    cmd = [str(GHZ), "--insecure", "--protoset", str(PROTOSET),
           "--call", f"payments.v1.PaymentService/{method}", "-d", json.dumps(data),
           "--metadata", json.dumps({"authorization": f"Bearer {token}"}),
           "-c", str(concurrency), "--connections", "1", "-z", f"{seconds}s", "--duration-stop", "wait",
           "--format", "json", target]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0 and not out.stdout.strip():
        raise RuntimeError(f"ghz failed: {out.stderr}")
    report = json.loads(out.stdout)
    latency = {d["percentage"]: d["latency"] / 1e6 for d in report.get("latencyDistribution") or []}
    codes = report.get("statusCodeDistribution") or {}
    errors = {k: v for k, v in codes.items() if k != "OK"}
    calls = [d["latency"] / 1e6 for d in report.get("details") or []] if every_call else []
    return Result(requests=report["count"], rps=report["rps"], p50_ms=latency.get(50, 0.0),
                  p99_ms=latency.get(99, 0.0), errors=sum(errors.values()), error_kinds=errors, latencies_ms=calls)


def wrk(url: str, method: str, token: str, *, body: str | None = None, seconds: float, concurrency: int) -> Result:
    """REST load through Envoy with wrk (HTTP/1.1 keep-alive connections, one per concurrent
    request). Non-2xx answers and socket errors count as errors."""
    env = {**os.environ, "WRK_METHOD": method, "WRK_TOKEN": token, "WRK_RUN": uuid.uuid4().hex[:8]}
    if body is not None:
        env["WRK_BODY"] = body
    cmd = [wrk_path() or "wrk", "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(WRK_SCRIPT), url]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    r = json.loads(line[len("WRK_JSON "):])
    kinds = {k: r[k] for k in ("non2xx", "socket_errors") if r[k]}
    return Result(requests=r["requests"], rps=r["requests"] / (r["duration_us"] / 1e6), p50_ms=r["p50_us"] / 1e3,
                  p99_ms=r["p99_us"] / 1e3, errors=sum(kinds.values()), error_kinds=kinds)
