"""Webhook delivery by real server processes (`python -m server`) to a real receiver on loopback
(which checks every delivery with the README's snippet, Stripe's library and Standard Webhooks'):
two replicas on one PostgreSQL send each event once per attempt, two server processes split one
endpoint's backlog between them (on PostgreSQL and on one SQLite file), a server killed with SIGKILL
in the middle of a delivery loses no event (its successor sends again what the dead one had
leased: the receiver sees a duplicate with the same event id, and drops it), a receiver's
Retry-After holds the whole endpoint that long, and an address is checked at delivery, not only at
registration.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import grpc
import peewee
import pytest
from playhouse.db_url import parse as parse_db_url

from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from server.infra import config
from tests.conftest import ADMIN_CALLER, ALICE, _reset_postgres, seed_accounts_into
from tests.service.test_jobs_replicas import Replica
from tests.support.jobs import wait_for
from devstack.webhook_receiver import FAST_WEBHOOKS, Receiver


def base_env(keys_dir, tmp_path, database_url: str = "") -> dict:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PAYMENTS_", "DATABASE_URL"))},
        "PAYMENTS_LISTEN_ADDR": "127.0.0.1:0",
        "PAYMENTS_METRICS_ADDR": "127.0.0.1:0",
        "PAYMENTS_DATA_DIR": str(tmp_path / "data"),
        "PAYMENTS_JWT_PRIVATE_KEY_FILE": str(keys_dir / "jwt-private.pem"),
        "PAYMENTS_JWKS_FILE": str(keys_dir / "jwks.json"),
        "PAYMENTS_PAGE_TOKEN_SECRET": "webhook-replicas-page-token-secret",
        "PAYMENTS_PROCESSES": "1",
        **FAST_WEBHOOKS,
        "PAYMENTS_GRACE_SECONDS": "2",
        "PAYMENTS_DB_POOL_SIZE": "4",
    }
    if database_url:
        env["DATABASE_URL"] = database_url
    return env


def started(index: int, env: dict, tmp_path) -> Replica:
    replica = Replica(index, env, tmp_path / f"server{index}.log")
    wait_for(replica.listening_port, timeout=30, what=f"server {index} to listen")
    return replica


TOKENS: dict[str, str] = {}  # by subject: the tokens fixture's, for the seeded accounts


def md(caller) -> tuple:
    return (("authorization", f"Bearer {TOKENS[caller.subject]}"),)


def subscribe(port: int, receiver: Receiver, url: str = "") -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        made = pb_grpc.WebhookServiceStub(channel).CreateWebhookEndpoint(
            pb.CreateWebhookEndpointRequest(endpoint=pb.WebhookEndpoint(url=url or receiver.url, event_types=["*"],
                                                                        enabled=True)),
            metadata=md(ADMIN_CALLER))
    receiver.secret = made.secret
    return made.endpoint.id


def create_payments(ports: list[int], count: int) -> list[str]:
    ids = []
    for i in range(count):
        with grpc.insecure_channel(f"127.0.0.1:{ports[i % len(ports)]}") as channel:
            stub = pb_grpc.PaymentServiceStub(channel)
            payment = stub.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=ALICE.email, amount=100 + i)),
                                         metadata=md(ALICE))
            if i % 2:
                stub.CancelPayment(pb.CancelPaymentRequest(id=payment.id), metadata=md(ALICE))
            ids.append(payment.id)
    return ids


def hold_events(settings: config.Settings, held: bool) -> None:
    """Keep the outbox's events from the delivery job (dispatched NULL, as history from before
    webhooks is) or hand them back (not yet dispatched): a test that starts several processes
    holds its backlog until every one of them runs, so how it splits does not depend on which
    process started first."""
    from server.infra import storage
    database = storage.make_database(settings)
    with database.bind_ctx(storage.MODELS), database.connection_context():
        storage.PaymentEvent.update(dispatched=None if held else False).where(
            storage.PaymentEvent.dispatched.is_null(False) if held else storage.PaymentEvent.dispatched.is_null()
        ).execute()
    database.close()


def outbox_ids(settings: config.Settings) -> list[str]:
    from server.infra import storage
    database = storage.make_database(settings)
    with database.bind_ctx(storage.MODELS), database.connection_context():
        ids = [row.id for row in storage.PaymentEvent.select().where(storage.PaymentEvent.dispatched.is_null(False))
               .order_by(storage.PaymentEvent.number)]
    database.close()
    return ids


@pytest.fixture
def tokens(token_for):
    TOKENS.update({c.subject: token_for(c) for c in (ALICE, ADMIN_CALLER)})
    yield
    TOKENS.clear()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


@pytest.mark.parametrize("backend", ["postgres"])
def test_two_replicas_on_one_postgresql_send_each_event_once(pg_session_url, keys_dir, tmp_path, tokens, receiver,
                                                             backend):
    _reset_postgres(pg_session_url)
    env = base_env(keys_dir, tmp_path, pg_session_url)
    receiver.delay = 0.05  # a run outlasts part of its tick: the replicas contend for every one
    replicas = [started(i, {**env, "PAYMENTS_DATA_DIR": str(tmp_path / f"data{i}")}, tmp_path) for i in range(2)]
    try:
        seed_accounts_into(config.load(env))
        subscribe(replicas[0].port, receiver)
        payments = create_payments([r.port for r in replicas], 24)
        expected = len(payments) + len(payments) // 2  # created, and every other one cancelled
        receiver.wait_for(lambda r: len(r.events) >= expected, timeout=60)
        wait_for(lambda: len(outbox_ids(config.load(env))) == expected, timeout=5, what="the outbox")
        time.sleep(2.5)  # two more ticks: nothing is sent again
    finally:
        codes = [r.stop() for r in replicas]
    assert codes == [0, 0]
    assert receiver.bad == []
    per_event = Counter(json.loads(a["body"])["id"] for a in receiver.arrivals)
    assert len(per_event) == expected and set(per_event.values()) == {1}, per_event.most_common(3)
    assert sorted(per_event) == sorted(outbox_ids(config.load(env)))
    runs = Counter(e["replica"] for r in replicas for e in r.lines()
                   if e.get("message") == "job run" and e.get("job") == "webhooks" and e.get("rows"))
    assert sum(runs.values()) >= 1
    params = parse_db_url(pg_session_url)
    db = peewee.PostgresqlDatabase(params.pop("database"), **params)
    with db.connection_context():
        attempts = db.execute_sql("SELECT attempts, status FROM webhook_deliveries").fetchall()
    assert attempts and set(attempts) == {(1, "succeeded")}


def delivered_by_replica(replica: Replica) -> int:
    """What the replica's webhook runs delivered, by their log lines (an attempt handed off at a
    run's end is not counted there)."""
    return sum(e.get("rows", 0) for e in replica.lines() if e.get("message") == "job run" and e.get("job") == "webhooks")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_replicas_split_one_endpoints_backlog_and_keep_each_payments_order(request, keys_dir, tmp_path, tokens,
                                                                            receiver, backend):
    """A backlog for one endpoint answering in 100 ms, then two server processes with the delivery
    job (on PostgreSQL: two replicas; on SQLite: two processes on one database file), the backlog
    held back until both listen (hold_events; a process that started a second later found it
    gone, once, on a loaded machine). Checked as a
    history of what the receiver saw: every event arrives, none twice (everything is answered 200
    within its lease, so the at-least-once window never opens), each payment's events in its
    order, each sent only after the one before it was answered; and both processes delivered
    a good part of it (each claims its own batches: one process alone has at most
    PAYMENTS_WEBHOOK_CONCURRENCY POSTs in flight)."""
    url = request.getfixturevalue("pg_session_url") if backend == "postgres" else ""
    if url:
        _reset_postgres(url)
    env = base_env(keys_dir, tmp_path, url)
    delay = receiver.delay = 0.1
    making = started(0, {**env, "PAYMENTS_JOBS_ENABLED": "false"}, tmp_path)
    try:
        seed_accounts_into(config.load(env))
        subscribe(making.port, receiver)
        payments = create_payments([making.port], 80)
    finally:
        assert making.stop() == 0
    expected = outbox_ids(config.load(env))
    assert len(expected) == 120  # created, and every other one cancelled
    hold_events(config.load(env), held=True)
    replicas = [Replica(i, env, tmp_path / f"server{i}.log") for i in (1, 2)]
    try:
        for r in replicas:  # each runs its scheduler before it listens
            wait_for(r.listening_port, timeout=30, what=f"server {r.index} to listen")
        hold_events(config.load(env), held=False)
        receiver.wait_for(lambda r: len(r.events) >= len(expected), timeout=90, what="every event")
        time.sleep(1.5)  # more ticks on both: nothing is sent again
    finally:
        codes = [r.stop() for r in replicas]
    assert codes == [0, 0]
    assert receiver.bad == []
    history = [(a["at"], json.loads(a["body"])) for a in receiver.arrivals]
    ids = [body["id"] for _, body in history]
    assert sorted(ids) == sorted(expected), [i for i, n in Counter(ids).items() if n > 1]  # each once, all there
    number = {event_id: n for n, event_id in enumerate(expected)}  # the outbox's order
    by_payment: dict[str, list] = {}
    for at, body in history:
        by_payment.setdefault(body["payment"]["id"], []).append((at, number[body["id"]], body["type"]))
    assert set(by_payment) == set(payments)
    for chain in by_payment.values():
        assert [n for _, n, _ in chain] == sorted(n for _, n, _ in chain), chain  # in the payment's order
        for (at, _, _), (later, _, _) in zip(chain, chain[1:]):
            assert later - at >= delay * 0.95, chain  # sent after the one before was answered
    shares = [delivered_by_replica(r) for r in replicas]
    print(f"delivered by each process ({backend}): {shares} of {len(expected)}")
    # Each process took a real part of the backlog (an even split is not promised: on one SQLite
    # file the claims take turns at the write lock, and a loaded machine skews the turns).
    assert min(shares) >= len(expected) // 10 and sum(shares) <= len(expected), shares
    late = [e for r in replicas for e in r.lines() if e.get("message") == "job run" and e.get("late_writes")]
    assert late == []


def test_sigkill_during_delivery_loses_no_event(keys_dir, tmp_path, tokens, receiver):
    env = base_env(keys_dir, tmp_path)
    receiver.delay = 0.4  # each POST takes a while, so the kill lands in the middle of one
    first = started(0, env, tmp_path)
    try:
        seed_accounts_into(config.load(env))
        subscribe(first.port, receiver)
        payments = create_payments([first.port], 8)
        receiver.wait_for(lambda r: len(r.arrivals) >= 2, timeout=30)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
    finally:
        first.stop()
    arrived_before = len(receiver.arrivals)
    second = started(1, env, tmp_path)
    try:
        expected = outbox_ids(config.load(env))
        assert len(expected) == len(payments) + len(payments) // 2
        receiver.wait_for(lambda r: len(r.events) == len(expected), timeout=60, what="every event after the restart")
    finally:
        assert second.stop() == 0
    assert first.proc.returncode == -signal.SIGKILL
    assert receiver.bad == []
    assert sorted(e["id"] for e in receiver.events) == sorted(expected)
    assert len(receiver.arrivals) > arrived_before
    # Whatever came twice came with the same id (the one in flight at the kill, sent again).
    ids = [json.loads(a["body"])["id"] for a in receiver.arrivals]
    assert set(ids) == set(expected)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_429_with_retry_after_holds_every_delivery_to_the_endpoint_that_long(request, keys_dir, tmp_path, tokens,
                                                                               receiver, backend):
    """Two payments' events, the first attempt answered 429 with Retry-After: 3: nothing reaches the
    receiver for 3 s (the backoff alone would retry after 0.2 s, the other payment's event go at the
    next 1 s tick), then both arrive."""
    url = request.getfixturevalue("pg_session_url") if backend == "postgres" else ""
    if url:
        _reset_postgres(url)
    env = {**base_env(keys_dir, tmp_path, url),
           "PAYMENTS_WEBHOOK_RETRY_MAX_DELAY_SECONDS": "5"}
    receiver.status, receiver.reply_headers = 429, {"Retry-After": "3"}
    server = started(0, env, tmp_path)
    try:
        seed_accounts_into(config.load(env))
        subscribe(server.port, receiver)
        payments = create_payments([server.port], 2)
        receiver.wait_for(lambda r: r.arrivals, timeout=20)
        receiver.status, receiver.reply_headers = 200, {}
        receiver.wait_for(lambda r: len(r.events) == 3, timeout=20)  # two created, one cancelled
    finally:
        assert server.stop() == 0
    assert receiver.bad == []
    first = receiver.arrivals[0]["at"]
    gaps = [a["at"] - first for a in receiver.arrivals]
    # The first batch's POSTs (up to one per payment at once) answered 429; then nothing for 3 s.
    assert all(g < 0.5 or g >= 3.0 for g in gaps), gaps
    assert any(g >= 3.0 for g in gaps) and {e["payment"]["id"] for e in receiver.events} == set(payments)


def test_the_address_is_checked_again_at_delivery(keys_dir, tmp_path, tokens, receiver):
    """Registered where loopback was allowed, then served by a server where it is not (as a
    deployment is): nothing reaches the receiver, and the attempts say why."""
    env = base_env(keys_dir, tmp_path)
    first = started(0, env, tmp_path)
    try:
        seed_accounts_into(config.load(env))
        plain = subscribe(first.port, receiver)
        tls = subscribe(first.port, receiver, receiver.url.replace("http://", "https://"))
    finally:
        assert first.stop() == 0
    strict = started(1, {**env, "PAYMENTS_WEBHOOK_ALLOW_LOOPBACK": "false"}, tmp_path)
    try:
        [payment_id] = create_payments([strict.port], 1)
        with grpc.insecure_channel(f"127.0.0.1:{strict.port}") as channel:
            stub = pb_grpc.WebhookServiceStub(channel)

            def attempts(endpoint_id):
                events = stub.ListWebhookEvents(pb.ListWebhookEventsRequest(payment_id=payment_id), metadata=md(ADMIN_CALLER))
                return [a for e in events.events for d in e.deliveries if d.endpoint_id == endpoint_id for a in d.attempts]

            refused = {e: wait_for(lambda: attempts(e), timeout=20, what="an attempt")[0] for e in (plain, tls)}
    finally:
        assert strict.stop() == 0
    # Refused before any connection: nothing reached the receiver (tests/unit/test_webhooks.py also
    # resolves a name to loopback, and to a private address, at delivery).
    assert receiver.arrivals == []
    assert {a.http_status for a in refused.values()} == {0}
    assert refused[plain].error == "refused: only https URLs are sent to"
    assert refused[tls].error == "refused: 127.0.0.1 resolves to 127.0.0.1 is a loopback address", refused[tls].error
