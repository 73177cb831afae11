"""Where a call's time goes inside the server: the real server (server.edge.app.build) in this
process, a real gRPC channel over loopback, and each call's handler thread measured.

Two passes over the same calls: first without a profiler, the CPU each call costs its handler
thread (time.thread_time around the job the lane runs: interceptor, token, rules, storage,
commit, access line; not grpc's C core or its polling thread, which the whole-process numbers of
bench/run.py include); then with cProfile on every handler thread, timed by that thread's CPU clock (time spent waiting
for the GIL, a lock or the disk does not count), the functions that cost it.
Only the handler threads are profiled, so the client in the same process does not show.

    .venv/bin/python bench/profile_calls.py [--operation CreatePayment] [--calls 3000] [--clients 4]
        [--database-url postgresql://...] [--top 40]

For the time Envoy adds, see bench/run.py (Envoy CPU per case) and docs/performance.md.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import sys
import tempfile
import threading
import time
import uuid
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402

import seed  # noqa: E402
from server.edge import app as assembly, capacity  # noqa: E402
from server.edge.pb import payments_pb2 as pb  # noqa: E402
from server.edge.pb import payments_pb2_grpc as pb_grpc  # noqa: E402
from server.infra import config, logs, tokens  # noqa: E402

EMAIL = "bench@example.com"


class HandlerClock:
    """Wraps the lanes' job runner: each job's thread CPU time, and, when profiling, a cProfile
    per handler thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cpu = 0.0
        self.jobs = 0
        self.profiling = False
        self.profiles: dict[int, cProfile.Profile] = {}
        self._run = capacity._run

    def install(self) -> None:
        def run(done, fn, *args, **kwargs):
            profile = None
            if self.profiling:
                profile = self.profiles.get(threading.get_ident())
                if profile is None:
                    with self.lock:
                        profile = self.profiles[threading.get_ident()] = cProfile.Profile(time.thread_time)
                profile.enable()
            start = time.thread_time()
            try:
                return self._run(done, fn, *args, **kwargs)
            finally:
                took = time.thread_time() - start
                if profile is not None:
                    profile.disable()
                with self.lock:
                    self.cpu += took
                    self.jobs += 1

        capacity._run = run

    def reset(self) -> None:
        with self.lock:
            self.cpu, self.jobs = 0.0, 0


def requests(operation: str, payment_id: str):
    if operation == "CreatePayment":
        return lambda: pb.CreatePaymentRequest(payment=pb.Payment(
            email=EMAIL, amount=1250, currency="IDR", request_id=uuid.uuid4().hex))
    if operation == "GetPayment":
        return lambda: pb.GetPaymentRequest(id=payment_id)
    raise SystemExit(f"unknown operation {operation}")


def drive(stub, operation: str, make, token: str, calls: int, clients: int) -> float:
    method = getattr(stub, operation)
    md = (("authorization", f"Bearer {token}"),)

    def client(n: int) -> None:
        for _ in range(n):
            method(make(), metadata=md, timeout=30)

    start = time.perf_counter()
    with futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [calls // clients] * clients))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--operation", default="CreatePayment", choices=["CreatePayment", "GetPayment"])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--database-url", default="", help="PostgreSQL (a database of its own: it is filled)")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="payments-profile-") as tmp:
        work = Path(tmp)
        keys = work / "keys"
        tokens.create_key_pair(keys / "jwt-private.pem", keys / "jwks.json")
        settings = dataclasses.replace(
            config.load({}), database_url=args.database_url, data_dir=work / "data", listen_addr="127.0.0.1:0",
            jwks_file=keys / "jwks.json", jwt_private_key_file=keys / "jwt-private.pem", jobs_enabled=False,
            page_token_secret=b"profile")
        seed.seed_callers(settings)
        issuer = tokens.TokenIssuer(tokens.load_private_key(keys / "jwt-private.pem"), issuer=settings.jwt_issuer,
                                    audience=settings.jwt_audience, ttl_seconds=3600)
        user, email, role, sid = seed.CALLERS[0]
        token = issuer.issue(subject=user, email=email, role=role, session_id=sid)
        logs.configure("INFO")  # the access line, as deployed (to this process's stderr)
        clock = HandlerClock()
        clock.install()
        app = assembly.build(settings)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = pb_grpc.PaymentServiceStub(channel)
                first = stub.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=EMAIL, amount=100)),
                                           metadata=(("authorization", f"Bearer {token}"),), timeout=10)
                make = requests(args.operation, first.id)
                drive(stub, args.operation, make, token, args.calls // 5, args.clients)  # warm
                clock.reset()
                wall = drive(stub, args.operation, make, token, args.calls, args.clients)
                plain_cpu, jobs = clock.cpu, clock.jobs
                clock.reset()
                clock.profiling = True
                drive(stub, args.operation, make, token, args.calls, args.clients)
                clock.profiling = False
        finally:
            app.stop(0)
    database = "PostgreSQL" if args.database_url else "SQLite"
    print(f"{args.operation} on {database}, {jobs} calls from {args.clients} clients: {jobs / wall:.0f} calls/s, "
          f"handler thread CPU {plain_cpu / jobs * 1e6:.0f} us a call (without the profiler)", file=sys.stdout)
    stats = None
    for profile in clock.profiles.values():
        if stats is None:
            stats = pstats.Stats(profile, stream=io.StringIO())
        else:
            stats.add(profile)
    if stats is not None:
        out = io.StringIO()
        stats.stream = out
        stats.sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
