"""How fast one server delivers webhooks, against the same POSTs without the service around them.

N payments are created with the jobs off (so N `payment.created` events wait), then a server with
the delivery job on (its defaults, or --interval) starts, and the clock runs until a receiver on
loopback (devstack/webhook_receiver.py: it checks every signature) has all N. The baseline, in
the same run and against the same receiver: the same N bodies, signed the same two ways, POSTed one
after another by the server's own HTTP client (server/infra/webhook_sender.py), with no database,
leases or job ticks.
The ratio is what the delivery job costs on top of the POSTs themselves (it sends for 90% of each
interval, docs/jobs.md); with --receiver-delay, a receiver that takes that long to answer, it is what
sending several payments' events at once (PAYMENTS_WEBHOOK_CONCURRENCY) wins back.

    .venv/bin/python bench/webhooks.py [--events 2000] [--interval 5] [--receiver-delay 0.05]

With --processes 1,2,4 (PostgreSQL: --database-url, or PAYMENTS_TEST_DATABASE_URL, next to which
it makes a database of its own, emptied before each case and dropped at the end) it measures
instead how delivery to one endpoint grows with replicas: for each count, the same backlog of N `payment.created` events, then that many server processes
with the delivery job on; events/s from the first delivery to the last, the ratio to one process
in the same run, and the backlog (events the receiver has not had yet) over time.

    .venv/bin/python bench/webhooks.py --processes 1,2,4 --receiver-delay 0.1 --events 1200
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from devstack.stack import Server, prepare_workdir, server_env  # noqa: E402
from server.domain.caller import ADMIN, CUSTOMER, Caller  # noqa: E402
from server.domain.webhooks import signed_headers  # noqa: E402
from server.edge.pb import payments_pb2 as pb  # noqa: E402
from server.edge.pb import payments_pb2_grpc as pb_grpc  # noqa: E402
from server.infra import config, storage, tokens  # noqa: E402
from server.infra.webhook_sender import Sender  # noqa: E402
from devstack.webhook_receiver import FAST_WEBHOOKS, Receiver  # noqa: E402

PAYER = Caller(subject="usr_bench_payer", email="payer@example.com", role=CUSTOMER, session_id="ses_bench_payer")
OPERATOR = Caller(subject="usr_bench_admin", email="operator@example.com", role=ADMIN, session_id="ses_bench_admin")


def seed_callers(settings: config.Settings) -> None:
    """The payer and the admin the tokens name, with their sessions, in the running server's database."""
    database = storage.make_database(settings)
    since, until = dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    with database.bind_ctx(storage.MODELS), database.connection_context():
        for c in (PAYER, OPERATOR):
            storage.User.insert(id=c.subject, email=c.email, password_hash="!", role=c.role, created_at=since).execute()
            storage.Session.insert(id=c.session_id, user_id=c.subject, role=c.role, created_at=since,
                                   expires_at=until).execute()
    database.close()


def backlog(settings: config.Settings, receiver: Receiver, issuer: tokens.TokenIssuer, events: int,
            env: dict) -> None:
    """One endpoint (the receiver) and `events` payments, made by a server with the jobs off."""
    def md(c: Caller) -> tuple:
        return (("authorization", "Bearer " + issuer.issue(subject=c.subject, email=c.email, role=c.role,
                                                           session_id=c.session_id)),)

    server = Server.start(Path(settings.data_dir).parent, env)
    try:
        seed_callers(settings)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            made = pb_grpc.WebhookServiceStub(channel).CreateWebhookEndpoint(pb.CreateWebhookEndpointRequest(
                endpoint=pb.WebhookEndpoint(url=receiver.url, event_types=["*"], enabled=True)), metadata=md(OPERATOR))
            receiver.secret = made.secret
            payments = pb_grpc.PaymentServiceStub(channel)
            payer = md(PAYER)
            for i in range(events):
                payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=PAYER.email, amount=100 + i)),
                                       metadata=payer)
    finally:
        server.stop()


def workdir(prefix: str, args, **env: str) -> tuple[Path, dict, dict, config.Settings, tokens.TokenIssuer]:
    """A work directory with signing keys; the servers' environment (the fast retries of the tests,
    the given interval, no admin from the environment: ours is seeded; `env` added), the same with
    jobs off (for making the backlog), its settings, and an issuer of tokens for its callers."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    keys = work / "signing-keys"
    tokens.create_key_pair(keys / "jwt-private.pem", keys / "jwks.json")
    prepare_workdir(work, keys)
    base = {**FAST_WEBHOOKS, "PAYMENTS_WEBHOOK_INTERVAL_SECONDS": str(args.interval), "PAYMENTS_ADMIN_EMAIL": "",
            "PAYMENTS_ADMIN_PASSWORD": "", **env}
    jobs_off = server_env(work, **{**base, "PAYMENTS_JOBS_ENABLED": "false"})
    settings = config.load(jobs_off)
    issuer = tokens.TokenIssuer(tokens.load_private_key(settings.jwt_private_key_file), issuer=settings.jwt_issuer,
                                audience=settings.jwt_audience, ttl_seconds=3600)
    return work, base, jobs_off, settings, issuer


def cpu_seconds(pid: int) -> float:
    """The CPU time a running process has used (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drop_tables(url: str) -> None:
    database = storage.make_database(dataclasses.replace(config.Settings(), database_url=url))
    with database.connection_context():
        for model in storage.MODELS:
            database.execute_sql(f'DROP TABLE IF EXISTS "{model._meta.table_name}" CASCADE')
    database.close()


def scaling(args) -> int:
    """Delivery to one endpoint by 1, 2, 4... server processes on one PostgreSQL, in a database
    of the benchmark's own (made next to the one the URL names, dropped at the end)."""
    url = args.database_url or os.environ.get("PAYMENTS_TEST_DATABASE_URL", "")
    if not url.startswith("postgres"):
        print("--processes needs PostgreSQL: --database-url or PAYMENTS_TEST_DATABASE_URL", file=sys.stderr)
        return 2
    import peewee  # noqa: PLC0415
    from playhouse.db_url import parse as parse_db_url  # noqa: PLC0415

    name = f"payments_bench_{os.getpid()}"
    params = parse_db_url(url)
    params.pop("database")
    admin = peewee.PostgresqlDatabase("postgres", **params)  # the server's maintenance database
    with admin.connection_context():
        admin.connection().autocommit = True
        admin.execute_sql(f'CREATE DATABASE "{name}"')
    try:
        return _scaling(args, url.rsplit("/", 1)[0] + "/" + name)
    finally:
        with admin.connection_context():
            admin.connection().autocommit = True
            admin.execute_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _scaling(args, url: str) -> int:
    counts = [int(n) for n in args.processes.split(",")]
    results = []
    for count in counts:
        drop_tables(url)
        work, base, jobs_off, settings, issuer = workdir(f"bench-webhooks-{count}-", args, DATABASE_URL=url)
        receiver = Receiver()
        try:
            receiver.delay = args.receiver_delay
            backlog(settings, receiver, issuer, args.events, jobs_off)
            started = time.time()
            servers = [Server.start(work, server_env(work, **{**base, "PAYMENTS_DATA_DIR": str(work / f"data{i}")}))
                       for i in range(count)]
            try:
                receiving = time.process_time()
                receiver.wait_for(lambda r: len(r.events) >= args.events, timeout=3600, what="every event")
                receiving = time.process_time() - receiving
                cpu = sum(cpu_seconds(server.proc.pid) for server in servers)
                load = os.getloadavg()[0]
            finally:
                for server in servers:
                    server.stop()
            assert receiver.bad == [], len(receiver.bad)
            arrivals = sorted(a["at"] for a in receiver.arrivals)
            duplicates = len(arrivals) - len(receiver.events)
        finally:
            receiver.stop()
        took = arrivals[-1] - arrivals[0]
        results.append((count, (len(arrivals) - 1) / took, took, duplicates, started, arrivals, cpu, receiving, load))
    settings = config.Settings()
    print(f"webhooks by replicas, {args.events} events to one endpoint answering in {args.receiver_delay * 1000:.0f} ms, "
          f"PostgreSQL, job every {args.interval} s, {settings.webhook_concurrency} POSTs at once per process")
    one = results[0][1]
    for count, rate, took, duplicates, _, _, cpu, receiving, load in results:
        print(f"  {count} process{'es' if count > 1 else '  '}  {rate:8.1f} events/s  {rate / one:5.2f}x  "
              f"(first to last delivery: {took:.1f} s; sent twice: {duplicates}; CPU: servers {cpu:.1f} s, "
              f"receiver {receiving:.1f} s; load average {load:.1f} on {os.cpu_count()} CPUs)")
    step = max(1, round(results[0][2] / 10))
    print(f"  backlog (events not yet received) every {step} s from the servers' start:")
    for count, _, _, _, started, arrivals, *_ in results:
        curve, t = [], 0
        while True:
            left = args.events - sum(1 for a in arrivals if a <= started + t)
            curve.append(left)
            if left <= 0:
                break
            t += step
        print(f"  {count}: " + " ".join(str(n) for n in curve))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--interval", type=int, default=config.Settings().webhook_interval_seconds)
    parser.add_argument("--receiver-delay", type=float, default=0.0,
                        help="seconds the receiver takes to answer (a distant merchant: 0.05)")
    parser.add_argument("--processes", default="",
                        help="server process counts to compare on PostgreSQL, e.g. 1,2,4")
    parser.add_argument("--database-url", default="", help="the PostgreSQL of --processes")
    args = parser.parse_args()
    if args.processes:
        return scaling(args)
    work, base, jobs_off, settings, issuer = workdir("bench-webhooks-", args)

    receiver = Receiver()
    try:
        receiver.delay = args.receiver_delay
        backlog(settings, receiver, issuer, args.events, jobs_off)
        bodies = [(f"evt_base{i}",
                   f'{{"id":"evt_base{i}","type":"payment.created","payment":{{"id":"pay_{i}"}}}}'.encode())
                  for i in range(args.events)]

        # Baseline: the same number of signed POSTs, back to back, by the same client.
        send = Sender(allow_loopback=True)
        started = time.monotonic()
        for event_id, body in bodies:
            headers = {"Content-Type": "application/json",
                       **signed_headers([receiver.secret], event_id, int(time.time()), body)}
            assert send(receiver.url, body, headers).ok
        baseline = args.events / (time.monotonic() - started)

        before = len(receiver.arrivals)
        server = Server.start(work, server_env(work, **base))
        try:
            receiver.wait_for(lambda r: len(r.events) >= 2 * args.events, timeout=3600, what="every event")
        finally:
            server.stop()
        assert receiver.bad == [], len(receiver.bad)
        arrivals = [a["at"] for a in receiver.arrivals[before:]]
    finally:
        receiver.stop()
    # From the first delivery to the last: the server's start and its first tick are not the rate.
    took = max(arrivals) - min(arrivals)
    delivered = (len(arrivals) - 1) / took
    print(f"webhooks, {args.events} events, one endpoint on loopback answering in {args.receiver_delay * 1000:.0f} ms, "
          f"job every {args.interval} s, {settings.webhook_concurrency} POSTs at once")
    print(f"  baseline (the POSTs alone)   {baseline:8.0f} events/s")
    print(f"  delivered by the server      {delivered:8.0f} events/s  (first to last delivery: {took:.1f} s)")
    print(f"  ratio                        {delivered / baseline:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
