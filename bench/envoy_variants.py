"""What Envoy's own filters cost a request: the same server behind several Envoys, each running
envoy/envoy.yaml with one part taken out or changed, REST GetPayment and CreatePayment with wrk,
interleaved rounds (every variant back to back in each round), the median round of each.

Envoy's CPU per request is the number to read (its process's CPU over the run divided by the
requests): the differences between variants are what each part costs, on the same machine in
the same minutes. A variant that drops a part is an experiment, never a proposal to drop it.

    .venv/bin/python bench/envoy_variants.py [--seconds 5] [--rounds 3] [--variants ...]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import loadgen  # noqa: E402
import run as bench_run  # noqa: E402
from devstack.stack import CONFIG, Envoy  # noqa: E402,F401

_ACCESS_LOG = CONFIG.read_text()[CONFIG.read_text().index("          access_log:\n          - name: envoy.access_loggers.stdout"):
                                 CONFIG.read_text().index("          http_filters:\n")]
_LUA = CONFIG.read_text()[CONFIG.read_text().index("          - name: envoy.filters.http.lua\n"):
                          CONFIG.read_text().index("          - name: envoy.filters.http.cors\n")]
_JWT_CACHE = "                  jwt_cache_config: {jwt_cache_size: 4096}\n"

# name -> how envoy.yaml becomes the variant
VARIANTS = {
    "as configured": lambda text: text,
    "no verified-token cache": lambda text: _once(text, _JWT_CACHE, ""),
    "no access log": lambda text: _once(text, _ACCESS_LOG, ""),
    "no Lua filter": lambda text: _once(text, _LUA, ""),
    "Lua on requests only": lambda text: _once(text, "function envoy_on_response(handle)", "function unused(handle)"),
}


def _once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise SystemExit(f"envoy.yaml changed: {old[:60]!r} is not there exactly once")
    return text.replace(old, new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    args.rows, args.share = 2_000, 1.0
    with tempfile.TemporaryDirectory(prefix="payments-envoy-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        bench = bench_run.Bench(args, work, stack)
        target = bench.start_service("SQLite")
        envoys = {}
        for n, name in enumerate(args.variants):
            source = work / f"variant-{n}.yaml"
            source.write_text(VARIANTS[name](CONFIG.read_text()))
            envoy = stack.enter_context(bench_run.stopping(Envoy.start(bench.envoy_dir(f"variant-{n}"), target.server.port,
                                                                       source=source)))
            envoy.set_runtime(**loadgen.UNLIMITED)
            envoys[name] = envoy
        cases = {
            "GetPayment": ("GET", f"/v1/payments/{target.payment_id}", None),
            "CreatePayment": ("POST", "/v1/payments",
                              '{"email":"%s","amount":"1250","currency":"IDR","request_id":"{{n}}"}' % bench_run.EMAIL),
        }
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for operation, (verb, path, body) in cases.items():
            for n in range(args.rounds):
                for name, envoy in envoys.items():
                    url = envoy.url + path
                    if n == 0:
                        loadgen.wrk(url, verb, bench.token, body=body, seconds=1, concurrency=args.concurrency)
                    before, start = bench_run.cpu_seconds(envoy.proc.pid), time.monotonic()
                    result = loadgen.wrk(url, verb, bench.token, body=body, seconds=args.seconds,
                                         concurrency=args.concurrency)
                    cpu = bench_run.cpu_seconds(envoy.proc.pid) - before
                    per_request = cpu / result.requests * 1e6 if result.requests else 0.0
                    results.setdefault((operation, name), []).append((result.rps, per_request))
                    print(f"  {operation:14} {name:26} {result.rps:7.0f} req/s  Envoy {per_request:5.0f} us a request "
                          f"errors {result.errors}", flush=True)
        print("\n| operation | Envoy | req/s (median round) | Envoy CPU µs per request (median) |")
        print("|---|---|---:|---:|")
        for (operation, name), rows in results.items():
            rps = sorted(r for r, _ in rows)[len(rows) // 2]
            us = sorted(u for _, u in rows)[len(rows) // 2]
            print(f"| {operation} | {name} | {rps:.0f} | {us:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
