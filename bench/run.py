"""`make bench`: throughput, latency and memory of the Payments server, printed as tables.

For GetPayment, ListPayments (a page of 20) and CreatePayment, each over three paths — gRPC
straight to the server, gRPC through Envoy, REST through Envoy — with ghz (gRPC) and wrk
(REST), a valid token, a fixed concurrency and a fixed duration per case. The same cases run
first against bench/empty_server.py (handlers that do nothing, same thread-pool settings), the
baseline that shows what Python gRPC and Envoy cost by themselves on this machine. Then
ListPayments page 1 against page 1,000, as the payer and as an admin, on a table of --rows
payments seeded by bulk SQL (bench/seed.py), on SQLite and, with --postgres, on PostgreSQL too.
Each row also shows the server's CPU (in cores) and its peak RSS so far (VmHWM).

    .venv/bin/python bench/run.py [--seconds 5] [--concurrency 16] [--rows 1000000] [--postgres]

Everything runs on loopback ports chosen by the kernel, in a temporary directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402

import loadgen  # noqa: E402
import seed  # noqa: E402
from server import config, tokens  # noqa: E402
from server.pb import payments_pb2 as pb  # noqa: E402
from server.pb import payments_pb2_grpc as pb_grpc  # noqa: E402
from tests.e2e.stack import Envoy, Server, prepare_workdir, server_env  # noqa: E402

EMAIL = "bench@example.com"
PATHS = ("gRPC direct", "gRPC via Envoy", "REST via Envoy")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Row:
    target: str
    operation: str
    path: str
    result: loadgen.Result
    cpu: float  # server CPU over the case, in cores
    envoy_cpu: float
    peak_rss_mb: float


def proc_status(pid: int, field: str) -> float:
    """A /proc/PID/status value in MB (VmHWM = peak resident set since start, VmRSS = now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class Bench:
    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        keys = work / "signing-keys"
        tokens.create_key_pair(keys / "jwt-private.pem", keys / "jwks.json")
        prepare_workdir(work, keys)
        s = config.Settings()
        issuer = tokens.TokenIssuer(tokens.load_private_key(keys / "jwt-private.pem"), issuer=s.jwt_issuer,
                                    audience=s.jwt_audience, ttl_seconds=3600)
        self.token = issuer.issue(subject="usr_bench", email=EMAIL, role="customer")
        self.admin_token = issuer.issue(subject="usr_bench_admin", email="bench-admin@example.com", role="admin")
        self.rows: list[Row] = []

    def env(self, **extra):
        overrides = {"PAYMENTS_LOG_LEVEL": "INFO", **extra}  # INFO: one access-log line per call, as deployed
        for name in ("PAYMENTS_WORKER_THREADS", "PAYMENTS_MAX_CONCURRENT_RPCS", "PAYMENTS_LOG_LEVEL"):
            if os.environ.get(name):
                overrides[name] = os.environ[name]
        return server_env(self.work, **overrides)

    def measure(self, target, operation, path, server, envoy, run) -> Row:
        run(1.0)  # warm-up: connections, caches, JIT-free but lazy imports
        before, envoy_before = cpu_seconds(server.proc.pid), cpu_seconds(envoy.proc.pid if envoy else None)
        start = time.monotonic()
        result = run(self.args.seconds)
        took = time.monotonic() - start
        row = Row(target, operation, path, result,
                  cpu=(cpu_seconds(server.proc.pid) - before) / took,
                  envoy_cpu=(cpu_seconds(envoy.proc.pid if envoy else None) - envoy_before) / took,
                  peak_rss_mb=proc_status(server.proc.pid, "VmHWM"))
        self.rows.append(row)
        print(f"  {target:8} {operation:24} {path:15} {result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
              f"p99 {result.p99_ms:6.2f} ms  errors {result.errors}", flush=True)
        return row

    def cases(self, target: str, server, envoy, payment_id: str, operations=("GetPayment", "ListPayments", "CreatePayment")):
        c, token = self.args.concurrency, self.token
        direct, via = f"127.0.0.1:{server.port}", f"127.0.0.1:{envoy.port}"
        create = {"payment": {"email": EMAIL, "amount": "1250", "currency": "IDR", "request_id": "{{.UUID}}"}}
        grpc_calls = {
            "GetPayment": ("GetPayment", {"id": payment_id}),
            "ListPayments": ("ListPayments", {"page_size": 20}),
            "CreatePayment": ("CreatePayment", create),
        }
        rest_calls = {
            "GetPayment": ("GET", f"/v1/payments/{payment_id}", None),
            "ListPayments": ("GET", "/v1/payments?page_size=20", None),
            "CreatePayment": ("POST", "/v1/payments",
                              '{"email":"%s","amount":"1250","currency":"IDR","request_id":"{{n}}"}' % EMAIL),
        }
        for op in operations:
            method, data = grpc_calls[op]
            for path, addr in ((PATHS[0], direct), (PATHS[1], via)):
                self.measure(target, op, path, server, envoy if path == PATHS[1] else None,
                             lambda s, a=addr: loadgen.ghz(a, method, data, token, seconds=s, concurrency=c))
            verb, url, body = rest_calls[op]
            self.measure(target, op, PATHS[2], server, envoy,
                         lambda s: loadgen.wrk(envoy.url + url, verb, token, body=body, seconds=s, concurrency=c))

    def baseline(self) -> None:
        print("baseline: empty handlers", flush=True)
        server = Server.start(self.work, self.env(), [sys.executable, str(ROOT / "bench" / "empty_server.py")])
        try:
            envoy = Envoy.start(self.work, server.port)
            try:
                self.cases("baseline", server, envoy, "pay_" + "a" * 26)
            finally:
                envoy.stop()
        finally:
            server.stop()

    def service(self, label: str, database_url: str = "") -> None:
        """The real server on a seeded database: the three operations, then paging depth."""
        data_dir = self.work / f"data-{label}"
        settings = dataclasses.replace(config.Settings(), database_url=database_url, data_dir=data_dir)
        print(f"{label}: seeding {self.args.rows:,} payments ...", flush=True)
        took = seed.seed(settings, self.args.rows, EMAIL, share=self.args.share)
        print(f"{label}: seeded in {took:.0f}s", flush=True)
        env = self.env(PAYMENTS_DATA_DIR=str(data_dir), PAYMENTS_PAGE_TOKEN_SECRET="bench-page-token-secret")
        if database_url:
            env["DATABASE_URL"] = database_url
        server = Server.start(self.work, env)
        try:
            envoy = Envoy.start(self.work, server.port)
            try:
                payment_id = self.create_one(server.port)
                self.cases(label, server, envoy, payment_id, self.args.operations)
                c, direct = self.args.concurrency, f"127.0.0.1:{server.port}"
                # Paging depth, as the payer (index on email, created_at, id) and as an admin
                # (index on created_at, id).
                for who, token in (("", self.token), (" (admin)", self.admin_token)):
                    deep = self.page_token(server.port, token, 1000)
                    for name, page_token in ((f"ListPayments page 1{who}", ""), (f"ListPayments page 1000{who}", deep)):
                        self.measure(label, name, PATHS[0], server, None,
                                     lambda s, t=page_token, a=token: loadgen.ghz(
                                         direct, "ListPayments", {"page_size": 20, "page_token": t}, a,
                                         seconds=s, concurrency=c))
            finally:
                envoy.stop()
        finally:
            server.stop()

    def create_one(self, port: int) -> str:
        """A payment of the bench payer's, for GetPayment."""
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            created = pb_grpc.PaymentServiceStub(ch).CreatePayment(
                pb.CreatePaymentRequest(payment=pb.Payment(email=EMAIL, amount=100)),
                metadata=(("authorization", f"Bearer {self.token}"),), timeout=10)
        return created.id

    @staticmethod
    def page_token(port: int, token: str, page: int) -> str:
        """The token of page `page` (of 20), walked page by page as a client would."""
        md = (("authorization", f"Bearer {token}"),)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.PaymentServiceStub(ch)
            page_token = ""
            for _ in range(page - 1):
                page_token = stub.ListPayments(pb.ListPaymentsRequest(page_size=20, page_token=page_token),
                                               metadata=md, timeout=30).next_page_token
                if not page_token:
                    raise SystemExit(f"the seeded table has fewer than {page} pages for the bench payer: raise --rows")
        return page_token

    def report(self) -> str:
        base = {(r.operation, r.path): r.result.rps for r in self.rows if r.target == "baseline"}
        direct = {(r.target, r.operation): r.result.rps for r in self.rows if r.path == PATHS[0]}
        lines = [
            f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"Python {platform.python_version()}, {self.args.seconds:g} s per case, {self.args.concurrency} concurrent "
            f"requests, {os.environ.get('PAYMENTS_WORKER_THREADS') or config.Settings().worker_threads} server threads.",
            "",
            "| target | operation | path | req/s | p50 ms | p99 ms | errors | vs baseline | vs gRPC direct "
            "| server CPU | Envoy CPU | server peak RSS MB |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            res = r.result
            b = base.get((r.operation, r.path))
            d = direct.get((r.target, r.operation))
            errors = f"{res.errors}" + (f" {res.error_kinds}" if res.error_kinds else "")
            lines.append(
                f"| {r.target} | {r.operation} | {r.path} | {res.rps:.0f} | {res.p50_ms:.2f} | {res.p99_ms:.2f} "
                f"| {errors} | {f'{res.rps / b:.0%}' if b and r.target != 'baseline' else ''} "
                f"| {f'{res.rps / d:.0%}' if d and r.path != PATHS[0] else ''} | {r.cpu:.2f} "
                f"| {r.envoy_cpu:.2f} | {r.peak_rss_mb:.0f} |")
        return "\n".join(lines)


def postgres_url() -> str:
    """A database of the bench's own on the local PostgreSQL that `make test` uses."""
    base = subprocess.run([str(ROOT / "scripts" / "pg-test-db.sh")], capture_output=True, text=True, check=True).stdout.strip()
    import peewee

    params = seed.storage.parse_db_url(base)
    params.pop("database")
    admin = peewee.PostgresqlDatabase("postgres", **params)
    admin.connect()
    admin.connection().autocommit = True
    admin.execute_sql('DROP DATABASE IF EXISTS "payments_bench" WITH (FORCE)')
    admin.execute_sql('CREATE DATABASE "payments_bench"')
    admin.close()
    return base.rsplit("/", 1)[0] + "/payments_bench"


def main() -> int:
    parser = argparse.ArgumentParser(description="Payments benchmarks (see bench/run.py)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured duration of each case")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1_000_000, help="payments seeded for the paging cases")
    parser.add_argument("--share", type=float, default=0.1, help="part of the rows that the bench payer owns")
    parser.add_argument("--postgres", action="store_true", help="also run on PostgreSQL (scripts/pg-test-db.sh)")
    parser.add_argument("--operations", nargs="*", default=["GetPayment", "ListPayments", "CreatePayment"])
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the servers and Envoys this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if loadgen.wrk_path() is None:
        print("wrk is not installed; it drives the REST cases. Install it with: sudo apt-get install wrk", file=sys.stderr)
        return 2
    if not loadgen.GHZ.exists():
        print("ghz is missing: run `make setup`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="payments-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        if args.baseline:
            bench.baseline()
        bench.service("SQLite")
        if args.postgres:
            bench.service("PostgreSQL", postgres_url())
        print()
        print(bench.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
