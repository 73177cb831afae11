"""`make bench`: throughput, latency and memory of the Payments server, printed as tables.

For GetPayment, ListPayments (a page of 20), CreatePayment and CreateRefund (an admin's refund of
1 of a settled payment, each with its own request_id: the conditional UPDATE, the refund and its
history row in one transaction), each over three paths — gRPC
straight to the server, gRPC through Envoy, REST through Envoy — with ghz (gRPC) and wrk
(REST), a valid token, a fixed concurrency and a fixed duration per case. The same cases run
against bench/empty_server.py (handlers that do nothing, same thread-pool settings), the
baseline that shows what Python gRPC and Envoy cost by themselves on this machine. Then
ListPayments page 1 against page 1,000, as the payer and as an admin, on a table of --rows
payments seeded by bulk SQL (bench/seed.py), on SQLite and, with --postgres, on PostgreSQL too.
Each row also shows the server's CPU (in cores) and its peak RSS so far (VmHWM).

All servers run at once, and each case runs on every server back to back (baseline first), in
--rounds rounds; the table shows each case's median round. A shared 2-core machine drifts by
a quarter from minute to minute, so a baseline measured minutes apart from the case it is
compared with says more about the drift than about the server.

    .venv/bin/python bench/run.py [--seconds 5] [--rounds 3] [--concurrency 16] [--rows 1000000] [--postgres]

Everything runs on loopback ports chosen by the kernel, in a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
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
from playhouse.db_url import parse as parse_db_url  # noqa: E402

import churn  # noqa: E402
import loadgen  # noqa: E402
import seed  # noqa: E402
import versus  # noqa: E402
from server.infra import config, tokens  # noqa: E402
from server.edge.pb import payments_pb2 as pb  # noqa: E402
from server.edge.pb import payments_pb2_grpc as pb_grpc  # noqa: E402
from devstack.stack import Envoy, Server, free_port, free_ports, prepare_workdir, server_env  # noqa: E402

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


@dataclasses.dataclass
class Target:
    """A server (and its Envoy) under test, and the payment its GetPayment cases read."""

    label: str
    server: Server
    envoy: Envoy
    payment_id: str
    settled_id: str = ""  # a success payment with room for every CreateRefund case's refunds


def median_row(rows: list[Row]) -> Row:
    """The round with the median throughput (its latencies and CPU belong to that round);
    errors are counted over every round."""
    ranked = sorted(rows, key=lambda r: r.result.rps)
    row = ranked[len(ranked) // 2]
    errors = sum(r.result.errors for r in rows)
    kinds: dict[str, int] = {}
    for r in rows:
        for k, v in r.result.error_kinds.items():
            kinds[k] = kinds.get(k, 0) + v
    return dataclasses.replace(row, result=dataclasses.replace(row.result, errors=errors, error_kinds=kinds))


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
    def __init__(self, args, work: Path, stack: contextlib.ExitStack):
        self.args, self.work, self.stack = args, work, stack
        keys = work / "signing-keys"
        tokens.create_key_pair(keys / "jwt-private.pem", keys / "jwks.json")
        self.keys = keys
        prepare_workdir(work, keys)
        s = config.Settings()
        issuer = tokens.TokenIssuer(tokens.load_private_key(keys / "jwt-private.pem"), issuer=s.jwt_issuer,
                                    audience=s.jwt_audience, ttl_seconds=3600)
        (user, email, role, sid), (admin, admin_email, admin_role, admin_sid) = seed.CALLERS
        self.token = issuer.issue(subject=user, email=email, role=role, session_id=sid)
        self.admin_token = issuer.issue(subject=admin, email=admin_email, role=admin_role, session_id=admin_sid)
        self.rows: list[Row] = []

    def env(self, **extra):
        overrides = {"PAYMENTS_LOG_LEVEL": "INFO", **extra}  # INFO: one access-log line per call, as deployed
        for name in ("PAYMENTS_WORKER_THREADS", "PAYMENTS_MAX_CONCURRENT_RPCS", "PAYMENTS_LOG_LEVEL"):
            if os.environ.get(name):
                overrides[name] = os.environ[name]
        return server_env(self.work, **overrides)

    def measure(self, target: str, operation: str, path: str, server, envoy, run, warm_up: bool = True) -> Row:
        if warm_up:
            run(1.0)  # connections, caches, lazy imports
        before, envoy_before = cpu_seconds(server.proc.pid), cpu_seconds(envoy.proc.pid if envoy else None)
        start = time.monotonic()
        result = run(self.args.seconds)
        took = time.monotonic() - start
        row = Row(target, operation, path, result,
                  cpu=(cpu_seconds(server.proc.pid) - before) / took,
                  envoy_cpu=(cpu_seconds(envoy.proc.pid if envoy else None) - envoy_before) / took,
                  peak_rss_mb=proc_status(server.proc.pid, "VmHWM"))
        print(f"  {target:8} {operation:24} {path:15} {result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
              f"p99 {result.p99_ms:6.2f} ms  errors {result.errors}", flush=True)
        return row

    def runner(self, target: Target, operation: str, path: str):
        """The load of one case against one target: a function of the duration."""
        c, token, pid = self.args.concurrency, self.token, target.payment_id
        settled = target.settled_id or pid
        if operation == "CreateRefund":
            token = self.admin_token  # only admins refund
        if path == PATHS[2]:
            verb, url, body = {
                "GetPayment": ("GET", f"/v1/payments/{pid}", None),
                "ListPayments": ("GET", "/v1/payments?page_size=20", None),
                "CreatePayment": ("POST", "/v1/payments",
                                  '{"email":"%s","amount":"1250","currency":"IDR","request_id":"{{n}}"}' % EMAIL),
                "CreateRefund": ("POST", f"/v1/payments/{settled}/refunds",
                                 '{"amount":"1","reason":"OTHER","request_id":"{{n}}"}'),
            }[operation]
            return lambda s: loadgen.wrk(target.envoy.url + url, verb, token, body=body, seconds=s, concurrency=c)
        data = {
            "GetPayment": {"id": pid},
            "ListPayments": {"page_size": 20},
            "CreatePayment": {"payment": {"email": EMAIL, "amount": "1250", "currency": "IDR",
                                          "request_id": "{{.UUID}}"}},
            "CreateRefund": {"payment_id": settled, "refund": {"amount": "1", "reason": "OTHER",
                                                               "request_id": "{{.UUID}}"}},
        }[operation]
        addr = f"127.0.0.1:{target.server.port if path == PATHS[0] else target.envoy.port}"
        return lambda s: loadgen.ghz(addr, operation, data, token, seconds=s, concurrency=c)

    def paired_cases(self, targets: list[Target]) -> None:
        """Every operation and path on every target, back to back, --rounds times; one row each
        (the median round)."""
        for op in self.args.operations:
            for path in PATHS:
                rounds: dict[str, list[Row]] = {t.label: [] for t in targets}
                for n in range(self.args.rounds):
                    for t in targets:
                        rounds[t.label].append(self.measure(
                            t.label, op, path, t.server, t.envoy if path != PATHS[0] else None,
                            self.runner(t, op, path), warm_up=n == 0))
                self.rows.extend(median_row(rows) for rows in rounds.values())

    def start_baseline(self) -> Target:
        server = self.stack.enter_context(stopping(Server.start(
            self.work, self.env(), [sys.executable, str(ROOT / "bench" / "empty_server.py")])))
        envoy = self.stack.enter_context(stopping(Envoy.start(self.envoy_dir("baseline"), server.port)))
        envoy.set_runtime(**loadgen.UNLIMITED)  # capacity from one address and one caller, not the per-address and per-caller policy
        return Target("baseline", server, envoy, "pay_" + "a" * 26)

    def envoy_dir(self, label: str) -> Path:
        """A working directory of its own for each Envoy (its config, admin address and logs)."""
        work = self.work / f"envoy-{label}"
        prepare_workdir(work, self.keys)
        return work

    def start_service(self, label: str, database_url: str = "") -> Target:
        """The real server on a seeded database."""
        data_dir = self.work / f"data-{label}"
        settings = dataclasses.replace(config.Settings(), database_url=database_url, data_dir=data_dir)
        print(f"{label}: seeding {self.args.rows:,} payments ...", flush=True)
        took = seed.seed(settings, self.args.rows, EMAIL, share=self.args.share)
        seed.seed_callers(settings)
        print(f"{label}: seeded in {took:.0f}s", flush=True)
        env = self.env(PAYMENTS_DATA_DIR=str(data_dir), PAYMENTS_PAGE_TOKEN_SECRET="bench-page-token-secret")
        if database_url:
            env["DATABASE_URL"] = database_url
        server = self.stack.enter_context(stopping(Server.start(self.work, env)))
        envoy = self.stack.enter_context(stopping(Envoy.start(self.envoy_dir(label), server.port)))
        envoy.set_runtime(**loadgen.UNLIMITED)  # capacity from one address and one caller, not the per-address and per-caller policy
        return Target(label, server, envoy, self.create_one(server.port), self.settled_one(server.port))

    def start_processes(self, target: Target, processes: int) -> Target:
        """The real server again, with `processes` server processes on the same database, behind an
        Envoy that lists each process's port."""
        data_dir = self.work / f"data-{target.label}"
        base = free_ports(processes)
        env = self.env(PAYMENTS_DATA_DIR=str(data_dir), PAYMENTS_PAGE_TOKEN_SECRET="bench-page-token-secret",
                       PAYMENTS_PROCESSES=str(processes), PAYMENTS_LISTEN_ADDR=f"127.0.0.1:{base}",
                       PAYMENTS_JOBS_ENABLED="false")
        server = self.stack.enter_context(stopping(Server.start(self.work, env)))
        label = f"{target.label} x{processes}"
        envoy = self.stack.enter_context(stopping(Envoy.start(self.envoy_dir(label.replace(" ", "-")), server.ports)))
        envoy.set_runtime(**loadgen.UNLIMITED)  # capacity from one address and one caller, not the per-address and per-caller policy
        return Target(label, server, envoy, target.payment_id, target.settled_id)

    def versus(self, target: Target) -> str:
        """bench/versus.py: REST GetPayment, ListPayments and CreatePayment, this project (1 and N processes)
        against FastAPI."""
        processes = config.load({}).processes
        contenders = [versus.Contender(f"this project, 1 process ({target.label})", target.envoy.url,
                                       [target.server.proc.pid, target.envoy.proc.pid])]
        if processes > 1:
            multi = self.start_processes(target, processes)
            contenders.append(versus.Contender(f"this project, {processes} processes", multi.envoy.url,
                                               [multi.server.proc.pid, multi.envoy.proc.pid]))
        database = self.work / f"data-{target.label}" / "payments.db"
        for workers in (1, 2):
            peer = self.stack.enter_context(stopping(versus.Peer(self.work, free_port(), workers, database,
                                                                 self.keys / "jwks.json",
                                                                 config.load({}).payment_ttl_seconds)))
            contenders.append(versus.Contender(f"FastAPI + uvicorn, {workers} worker{'s' if workers > 1 else ''}",
                                               peer.url, [peer.proc.pid]))
        print("versus: REST, interleaved ...", flush=True)
        rows = versus.run(contenders, target.payment_id, self.token, seconds=self.args.seconds,
                          rounds=self.args.rounds, concurrency=self.args.concurrency, email=EMAIL,
                          only=self.args.versus_operations)
        return versus.report(rows, reference=contenders[-1].label)

    def paging(self, target: Target) -> None:
        """Paging depth, as the payer (index on email, created_at, id) and as an admin (index
        on created_at, id), gRPC direct."""
        c, direct = self.args.concurrency, f"127.0.0.1:{target.server.port}"
        for who, token in (("", self.token), (" (admin)", self.admin_token)):
            deep = self.page_token(target.server.port, token, 1000)
            for name, page_token in ((f"ListPayments page 1{who}", ""), (f"ListPayments page 1000{who}", deep)):
                self.rows.append(self.measure(
                    target.label, name, PATHS[0], target.server, None,
                    lambda s, t=page_token, a=token: loadgen.ghz(
                        direct, "ListPayments", {"page_size": 20, "page_token": t}, a, seconds=s, concurrency=c)))

    def create_one(self, port: int) -> str:
        """A payment of the bench payer's, for GetPayment."""
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            created = pb_grpc.PaymentServiceStub(ch).CreatePayment(
                pb.CreatePaymentRequest(payment=pb.Payment(email=EMAIL, amount=100)),
                metadata=(("authorization", f"Bearer {self.token}"),), timeout=10)
        return created.id

    def settled_one(self, port: int) -> str:
        """A success payment of the bench payer's, of the largest amount, for CreateRefund."""
        md = (("authorization", f"Bearer {self.admin_token}"),)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.PaymentServiceStub(ch)
            created = stub.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=EMAIL, amount=999_999_999_999_999)),
                                         metadata=md, timeout=10)
            stub.ConfirmPayment(pb.ConfirmPaymentRequest(id=created.id), metadata=md, timeout=10)
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
            f"Python {platform.python_version()}, {self.args.seconds:g} s per case, median of {self.args.rounds} "
            f"round(s), {self.args.concurrency} concurrent requests, "
            f"{os.environ.get('PAYMENTS_WORKER_THREADS') or config.Settings().worker_threads} server threads.",
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


@contextlib.contextmanager
def stopping(process):
    try:
        yield process
    finally:
        process.stop()


def postgres_url(name: str = "") -> str:
    """A fresh database of the bench's own on the local PostgreSQL that `make test` uses."""
    base = subprocess.run([str(ROOT / "scripts" / "pg-test-db.sh")], capture_output=True, text=True, check=True).stdout.strip()
    import peewee

    params = parse_db_url(base)
    params.pop("database")
    admin = peewee.PostgresqlDatabase("postgres", **params)
    admin.connect()
    admin.connection().autocommit = True
    # PAYMENTS_BENCH_DATABASE: a name of one's own, when others may run benchmarks on the same PostgreSQL.
    name = (name or os.environ.get("PAYMENTS_BENCH_DATABASE") or "payments_bench").replace("-", "_")
    admin.execute_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.execute_sql(f'CREATE DATABASE "{name}"')
    admin.close()
    return base.rsplit("/", 1)[0] + "/" + name


def main() -> int:
    parser = argparse.ArgumentParser(description="Payments benchmarks (see bench/run.py)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured duration of each case")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each case per server; the median counts")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1_000_000, help="payments seeded for the paging cases")
    parser.add_argument("--share", type=float, default=0.1, help="part of the rows that the bench payer owns")
    parser.add_argument("--postgres", action="store_true", help="also run on PostgreSQL (scripts/pg-test-db.sh)")
    parser.add_argument("--operations", nargs="*", default=["GetPayment", "ListPayments", "CreatePayment",
                                                            "CreateRefund"])
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--no-paging", dest="paging", action="store_false",
                        help="skip the paging-depth cases (one case alone: --operations CreateRefund --no-paging)")
    parser.add_argument("--no-versus", dest="versus", action="store_false",
                        help="skip the comparison with FastAPI (bench/versus.py)")
    parser.add_argument("--versus-operations", nargs="*", default=None,
                        help="the operations compared with FastAPI (default: GetPayment, ListPayments, CreatePayment)")
    parser.add_argument("--churn-rows", type=int, nargs="*", default=[100_000, 200_000],
                        help="backlog sizes of the job-churn case (bench/churn.py); none to skip it")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the servers and Envoys this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if loadgen.wrk_path() is None:
        print("wrk is not installed; it drives the REST cases. Install it with: sudo apt-get install wrk", file=sys.stderr)
        return 2
    if not loadgen.GHZ.exists():
        print("ghz is missing: run `make setup`", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="payments-bench-") as tmp, contextlib.ExitStack() as stack:
        bench = Bench(args, Path(tmp), stack)
        targets = [bench.start_baseline()] if args.baseline else []
        services = [bench.start_service("SQLite")]
        if args.postgres:
            services.append(bench.start_service("PostgreSQL", postgres_url()))
        bench.paired_cases(targets + services)
        against = bench.versus(services[0]) if args.versus else ""
        for target in services if args.paging else []:
            bench.paging(target)
        databases = [("SQLite", lambda name: "")] + ([("PostgreSQL", postgres_url)] if args.postgres else [])
        churned = [churn.run(bench, label, rows, url_for) for label, url_for in databases for rows in args.churn_rows]
        print()
        print(bench.report())
        if against:
            print()
            print(against)
        if churned:
            print()
            print(churn.report(churned))
    return 0


if __name__ == "__main__":
    sys.exit(main())
