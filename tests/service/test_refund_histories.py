"""Concurrent partial refunds through the real server, checked as histories (tests/service/test_histories.py's
way), on SQLite and PostgreSQL.

Twelve clients refund three settled payments of 10,000 through two real server processes (each call
to either process's port, over gRPC), with amounts that soon outgrow what is left, a third of them
with expected_refunded_amount as last read, every one with its own request_id, retried with it when
the answer was lost, and some replayed on purpose after a success. The webhook job delivers to a
real receiver meanwhile. Every invocation is recorded with its real-time interval and its answer.
Then, per payment, the checker reads the refunds (ListRefunds), the history (ListPaymentEvents) and
the delivered events and shows:

- the refunds, in their order, add up step by step to each one's refunded_amount_after, and to the
  payment's refunded_amount, never above its amount;
- the history's REFUNDED rows are exactly those refunds, in that order, with those totals;
- every acknowledged refund is in the refunds, in the history and in the delivered payment.refunded
  events exactly once (delivered in the payment's order, each with the payment as it was after it);
  a replay answered the first refund; no refund is there that no call asked for, and none twice
  for one request_id;
- a success with an expectation started from exactly that total; every refusal is the rules'
  answer in a state the payment was in while the call was in flight.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from tests.conftest import ADMIN_CALLER, ALICE, rich_status
from tests.service.test_histories import start_processes
from devstack.webhook_receiver import FAST_WEBHOOKS, Receiver

CLIENTS, PAYMENTS, SECONDS, AMOUNT = 12, 3, 5.0, 10_000  # against test_histories' server processes
AMOUNTS = [1, 250, 700, 1500, 3000]
SLACK = 0.005  # seconds: a refund's time is read on the server between the call's start and its commit
UNKNOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
           grpc.StatusCode.UNKNOWN}


@dataclasses.dataclass
class Call:
    pid: str
    request_id: str
    amount: int
    expected: int | None
    start: float
    end: float
    outcome: str  # "ok", an error reason, or "unknown" (no answer)
    refund: pb.Refund | None = None
    replay: bool = False


@pytest.fixture
def refund_processes(request, tmp_path, keys_dir, backend):
    server = start_processes(request, tmp_path, keys_dir, backend, **FAST_WEBHOOKS)
    receiver = Receiver()
    yield server, receiver
    receiver.stop()
    server.stop()


def stamp(value) -> float:
    return value.seconds + value.nanos / 1e9


def run(server, receiver, token_for):
    md = {c.subject: (("authorization", f"Bearer {token_for(c)}"),) for c in (ALICE, ADMIN_CALLER)}
    admin = md[ADMIN_CALLER.subject]
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in server.ports]
    stubs = [pb_grpc.PaymentServiceStub(ch) for ch in channels]
    made = pb_grpc.WebhookServiceStub(channels[0]).CreateWebhookEndpoint(
        pb.CreateWebhookEndpointRequest(endpoint=pb.WebhookEndpoint(url=receiver.url, event_types=["payment.refunded"],
                                                                    enabled=True)), metadata=admin, timeout=10)
    receiver.secret = made.secret
    pids = []
    for _ in range(PAYMENTS):
        pid = stubs[0].CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=ALICE.email, amount=AMOUNT)),
                                     metadata=md[ALICE.subject], timeout=10).id
        stubs[0].ConfirmPayment(pb.ConfirmPaymentRequest(id=pid), metadata=admin, timeout=10)
        pids.append(pid)
    calls: list[Call] = []
    lock = threading.Lock()
    stop = time.monotonic() + SECONDS

    def send(stub, pid, request_id, amount, expected) -> tuple[str, pb.Refund | None]:
        request = pb.CreateRefundRequest(payment_id=pid, refund=pb.Refund(
            amount=amount, reason=pb.Refund.REQUESTED_BY_CUSTOMER, note=f"refund {request_id}", request_id=request_id))
        if expected is not None:
            request.expected_refunded_amount = expected
        try:
            return "ok", stub.CreateRefund(request, metadata=admin, timeout=5)
        except grpc.RpcError as e:
            if e.code() in UNKNOWN:
                return "unknown", None
            return rich_status(e)[1].reason, None

    def client(n: int):
        rng = random.Random(n)
        i = 0
        while time.monotonic() < stop:
            i += 1
            pid, amount, request_id = rng.choice(pids), rng.choice(AMOUNTS), f"c{n}-{i}"
            expected = None
            if rng.random() < 1 / 3:
                expected = stubs[rng.randrange(len(stubs))].GetPayment(
                    pb.GetPaymentRequest(id=pid), metadata=admin, timeout=5).refunded_amount
            for attempt in range(3):  # an answer lost: the same call again, with its request_id
                start = time.time()
                outcome, refund = send(stubs[rng.randrange(len(stubs))], pid, request_id, amount, expected)
                with lock:
                    calls.append(Call(pid, request_id, amount, expected, start, time.time(), outcome, refund,
                                      replay=attempt > 0))
                if outcome != "unknown":
                    break
            if outcome == "ok" and rng.random() < 0.2:  # a replay on purpose: the first answer again
                start = time.time()
                again, refund = send(stubs[rng.randrange(len(stubs))], pid, request_id, amount, expected)
                with lock:
                    calls.append(Call(pid, request_id, amount, expected, start, time.time(), again, refund, replay=True))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    def every(method, request_of, field):
        items, page = [], ""
        while True:
            got = method(request_of(page), metadata=admin, timeout=10)
            items += getattr(got, field)
            if not got.next_page_token:
                return items
            page = got.next_page_token

    payments = {pid: stubs[0].GetPayment(pb.GetPaymentRequest(id=pid), metadata=admin, timeout=10) for pid in pids}
    refunds = {pid: every(stubs[0].ListRefunds, lambda page, p=pid: pb.ListRefundsRequest(
        payment_id=p, page_size=100, page_token=page), "refunds") for pid in pids}
    histories = {pid: every(stubs[0].ListPaymentEvents, lambda page, p=pid: pb.ListPaymentEventsRequest(
        payment_id=p, page_size=100, page_token=page), "events") for pid in pids}
    total = sum(len(r) for r in refunds.values())
    receiver.wait_for(lambda r: len(r.events) >= total, timeout=60, what=f"{total} payment.refunded events")
    for ch in channels:
        ch.close()
    return calls, payments, refunds, histories, list(receiver.events)


def check(calls, payments, refunds, histories, delivered) -> dict[str, int]:
    counts = {"calls": len(calls), "refunds": 0, "refused": 0, "replays": 0, "unknown": 0, "with_expectation": 0}
    by_request = {}
    for pid, made in refunds.items():
        payment = payments[pid]
        totals = [sum(r.amount for r in made[:i + 1]) for i in range(len(made))]
        assert [r.refunded_amount_after for r in made] == totals, f"{pid}: the refunds do not add up in their order"
        assert payment.refunded_amount == (totals[-1] if totals else 0) <= payment.amount
        assert payment.fully_refunded == (payment.refunded_amount == payment.amount)
        assert payment.status == pb.Payment.SUCCESS
        refunded = [e for e in histories[pid] if e.action == pb.PaymentEvent.REFUNDED]
        assert [(e.refund_id, e.refunded_amount) for e in refunded] == [(r.id, r.refunded_amount_after) for r in made]
        # The delivered events of this payment: each refund once, in the payment's order, each with
        # the payment as that refund left it.
        events = [e for e in delivered if e["payment"]["id"] == pid]
        assert [e["refund"]["id"] for e in events] == [r.id for r in made], f"{pid}: delivered events differ"
        assert [e["payment"].get("refunded_amount") for e in events] == [str(t) for t in totals]
        assert [e["id"] for e in events] == [e.id for e in refunded]
        # Times follow the order the payment's lock gave: the history, the refunds (oldest first),
        # the delivered payments' updated_at, and the payment's updated_at after all of them.
        history_times = [stamp(e.time) for e in histories[pid]]
        assert history_times == sorted(history_times), f"{pid}: the history's times go backwards"
        refund_times = [stamp(r.created_at) for r in made]
        assert refund_times == sorted(refund_times), f"{pid}: the refunds' times go backwards"
        assert stamp(payment.updated_at) >= max(history_times)
        updated = [e["payment"]["updated_at"] for e in events]
        assert updated == sorted(updated), f"{pid}: delivered updated_at goes backwards"  # RFC 3339, one zone
        for r in made:
            assert r.request_id not in by_request, f"two refunds for request_id {r.request_id}"
            by_request[r.request_id] = r
        counts["refunds"] += len(made)

        # The payment's refunded total over time: total k holds from the k-th refund's time on.
        times = [0.0] + [stamp(r.created_at) for r in made]
        states = [0] + totals

        def in_flight(c: Call) -> set[int]:
            return {states[k] for k in range(len(states)) if times[k] <= c.end + SLACK
                    and (k + 1 == len(states) or times[k + 1] >= c.start - SLACK)}

        for c in (c for c in calls if c.pid == pid):
            if c.outcome == "unknown":
                counts["unknown"] += 1
                continue
            if c.outcome == "ok":
                mine = by_request.get(c.request_id)
                assert mine is not None, f"acknowledged refund {c.request_id} is missing from the refunds"
                assert c.refund == mine, f"{c.request_id}: answered {c.refund}, the refund is {mine}"
                assert (mine.amount, mine.payment_id) == (c.amount, pid)
                if c.expected is not None:
                    assert mine.refunded_amount_after - mine.amount == c.expected
                    counts["with_expectation"] += 1
                counts["replays"] += c.replay
                continue
            counts["refused"] += 1
            seen = in_flight(c)
            if c.outcome == "REFUND_EXCEEDS_REMAINING":
                assert any(t + c.amount > AMOUNT for t in seen), (c, seen)
            elif c.outcome == "REFUNDED_AMOUNT_CHANGED":
                assert c.expected is not None and seen != {c.expected}, (c, seen)
            else:
                raise AssertionError(f"an answer the rules never give here: {c}")
    asked = {c.request_id for c in calls}
    assert set(by_request) <= asked, "a refund that no call asked for"
    assert len(delivered) == counts["refunds"], "a delivered refund event that is not one of the refunds"
    return counts


@pytest.mark.timeout(180)
def test_concurrent_partial_refunds_never_overshoot_and_every_acknowledged_one_is_recorded_once(
        refund_processes, token_for):
    server, receiver = refund_processes
    calls, payments, refunds, histories, delivered = run(server, receiver, token_for)
    counts = check(calls, payments, refunds, histories, delivered)
    print(f"\n{counts}")
    assert counts["refunds"] >= PAYMENTS and counts["refused"] > 0, counts  # the race reached the limit
    assert any(p.fully_refunded for p in payments.values()) or counts["refused"] > 10, counts
    assert counts["replays"] > 0 and counts["with_expectation"] > 0, counts


@pytest.mark.timeout(120)
def test_identical_retries_arriving_at_once_all_answer_the_one_refund(refund_processes, token_for):
    """Sixteen identical CreateRefund calls (one request_id, one body) at once, across both server
    processes: a retry overlapping the first call is answered with the first refund, never with a
    refusal that refund caused (REFUNDED_AMOUNT_CHANGED with an expectation, REFUND_EXCEEDS_REMAINING
    for a full refund)."""
    server, _ = refund_processes
    admin = (("authorization", f"Bearer {token_for(ADMIN_CALLER)}"),)
    alice = (("authorization", f"Bearer {token_for(ALICE)}"),)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in server.ports]
    stubs = [pb_grpc.PaymentServiceStub(ch) for ch in channels]
    outcomes = {}
    for case, amount, expected in [("expectation", 100, 0), ("full", AMOUNT, None), ("partial", 100, None)]:
        for round_ in range(3):
            pid = stubs[0].CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=ALICE.email, amount=AMOUNT)),
                                         metadata=alice, timeout=10).id
            stubs[0].ConfirmPayment(pb.ConfirmPaymentRequest(id=pid), metadata=admin, timeout=10)
            request = pb.CreateRefundRequest(payment_id=pid, refund=pb.Refund(
                amount=amount, reason=pb.Refund.OTHER, request_id=f"same-{case}-{round_}"))
            if expected is not None:
                request.expected_refunded_amount = expected
            barrier, answers = threading.Barrier(16), [None] * 16

            def call(n):
                barrier.wait()
                try:
                    answers[n] = stubs[n % len(stubs)].CreateRefund(request, metadata=admin, timeout=20)
                except grpc.RpcError as e:
                    answers[n] = f"{e.code().name}:{rich_status(e)[1].reason if e.code() not in UNKNOWN else ''}"

            threads = [threading.Thread(target=call, args=(n,)) for n in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            made = stubs[0].ListRefunds(pb.ListRefundsRequest(payment_id=pid), metadata=admin, timeout=10).refunds
            assert len(made) == 1, (case, made)
            assert all(a == made[0] for a in answers), (case, [a if isinstance(a, str) else "ok" for a in answers])
            outcomes[case] = outcomes.get(case, 0) + 16
    for ch in channels:
        ch.close()
    print(f"\n{outcomes}")
