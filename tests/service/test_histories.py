"""Races through the real server, checked as histories (after Jepsen's Elle, one payment at a time).

Eight clients hammer four payments through two real server processes (each call to either
process's port, over gRPC) with confirms, cancels, deletes and undeletes from the owner and an
admin, retrying a call whose answer was lost, while one run SIGKILLs a server process in the middle.
Every invocation is recorded with its real-time interval and what came back. Then, for each
payment, the checker reads its history (ListPaymentEvents) and shows:

- the history is one valid path (created first, each from-status the previous to-status);
- every change in it was made by a call of that kind, by that caller, while that call was in
  flight (one change per call at most), and no acknowledged change is missing from it;
- every acknowledged answer (a success that changed nothing: a retry; or an error) is what the
  rules answer in a state the payment was in while that call was in flight.

So the history is explained by one serial order (the history's) of the acknowledged calls, and
nothing acknowledged was lost, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import threading
import time

import grpc
import pytest

from devstack.stack import free_ports
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from tests.conftest import ADMIN_CALLER, ALICE, _reset_postgres, rich_status
from tests.support.stack import Server, prepare_workdir, server_env

PROCESSES, CLIENTS, PAYMENTS, SECONDS = 2, 8, 4, 6.0
SLACK = 0.002  # seconds: the server stamps a change under its lock, between the call's start and end on the same clock
# On PostgreSQL the server's clock is the database's, read every 10 s and carried by the monotonic
# clock (server/infra/clock.py): it follows the host's within half of that read's round trip, which
# on a loaded two-core machine is milliseconds.
PG_SLACK = 0.025
ACTIONS = {"confirm": "CONFIRMED", "cancel": "CANCELLED", "delete": "DELETED", "undelete": "UNDELETED"}
OPS = [("confirm", ADMIN_CALLER), ("cancel", ALICE), ("cancel", ADMIN_CALLER), ("delete", ALICE),
       ("delete", ADMIN_CALLER), ("undelete", ADMIN_CALLER)]
UNKNOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
           grpc.StatusCode.UNKNOWN}


@dataclasses.dataclass
class Call:
    op: str
    caller: str  # account id
    pid: str
    start: float
    end: float
    outcome: str  # "ok", an error reason, or "unknown" (no answer: it may or may not have happened)


@dataclasses.dataclass(frozen=True)
class State:
    status: str = "PENDING"
    reason: str = ""
    deleted: bool = False
    last: tuple = ()  # ((action, actor), ...): the latest actor of each kind of change

    def actor(self, action: str) -> str | None:
        return dict(self.last).get(action)

    def after(self, event) -> "State":
        action = pb.PaymentEvent.Action.Name(event.action)
        last = tuple((a, w) for a, w in self.last if a != action) + ((action, event.actor_id),)
        return State(pb.Payment.Status.Name(event.to_status),
                     pb.Payment.FailureReason.Name(event.failure_reason) if event.failure_reason else "",
                     {"DELETED": True, "UNDELETED": False}.get(action, self.deleted), last)


def answer(state: State, op: str, caller: str, admin: bool) -> str:
    """What the rules answer `op` by `caller` in `state`: "change", "ok" (a retry) or an error reason."""
    mine = state.actor(ACTIONS[op]) == caller
    if op in ("confirm", "cancel"):
        if state.deleted:
            return "PAYMENT_NOT_FOUND"
        if state.status == "PENDING":
            return "change"
        wanted = ("SUCCESS", "") if op == "confirm" else ("FAILED", "CANCELLED")
        return "ok" if (state.status, state.reason) == wanted and mine else "PAYMENT_NOT_PENDING"
    if op == "delete":
        if state.deleted:
            return "ok" if mine else "PAYMENT_NOT_FOUND"
        return "PAYMENT_SETTLED" if state.status == "SUCCESS" else "change"
    if op == "undelete":
        return "change" if state.deleted else ("ok" if mine else "PAYMENT_NOT_DELETED")
    raise AssertionError(op)


def call_once(stubs, op: str, caller, pid: str, token: str) -> str:
    md = (("authorization", f"Bearer {token}"),)
    method = {"confirm": (stubs.ConfirmPayment, pb.ConfirmPaymentRequest), "cancel": (stubs.CancelPayment, pb.CancelPaymentRequest),
              "delete": (stubs.DeletePayment, pb.DeletePaymentRequest), "undelete": (stubs.UndeletePayment, pb.UndeletePaymentRequest)}[op]
    try:
        method[0](method[1](id=pid), metadata=md, timeout=5)
        return "ok"
    except grpc.RpcError as e:
        if e.code() in UNKNOWN:
            return "unknown"
        return rich_status(e)[1].reason


def start_processes(request, work, keys_dir, backend, **extra: str) -> Server:
    """PROCESSES server processes on consecutive free ports, on the test's database (emptied)."""
    prepare_workdir(work, keys_dir)
    if backend == "postgres":
        url = request.getfixturevalue("pg_session_url")
        _reset_postgres(url)
        extra["DATABASE_URL"] = url
    base = free_ports(PROCESSES)
    # No admin named at start-up: the seeded one (tests/conftest.py) is the admin here.
    return Server.start(work, server_env(work, PAYMENTS_PROCESSES=str(PROCESSES), PAYMENTS_ADMIN_EMAIL="",
                                         PAYMENTS_LISTEN_ADDR=f"127.0.0.1:{base}", **extra))


@pytest.fixture
def processes(request, tmp_path, keys_dir, backend):
    server = start_processes(request, tmp_path, keys_dir, backend)
    yield server
    server.stop()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def run(server, token_for, kill: bool) -> tuple[list[Call], dict[str, list]]:
    tokens = {c.subject: token_for(c) for c in (ALICE, ADMIN_CALLER)}
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in server.ports]
    stubs = [pb_grpc.PaymentServiceStub(ch) for ch in channels]
    pids = [stubs[0].CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=ALICE.email, amount=1000 + i)),
                                   metadata=(("authorization", f"Bearer {tokens[ALICE.subject]}"),), timeout=10).id
            for i in range(PAYMENTS)]
    calls: list[Call] = []
    lock = threading.Lock()
    stop = time.monotonic() + SECONDS

    def client(n: int):
        rng = random.Random(n)
        while time.monotonic() < stop:
            op, caller = rng.choice(OPS)
            pid = rng.choice(pids)
            for attempt in range(2):  # an answer lost: the same call once more
                start = time.time()
                outcome = call_once(stubs[rng.randrange(len(stubs))], op, caller, pid, tokens[caller.subject])
                with lock:
                    calls.append(Call(op, caller.subject, pid, start, time.time(), outcome))
                if outcome != "unknown":
                    break

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    if kill:
        time.sleep(SECONDS / 2)
        os.kill(_children(server.proc.pid)[-1], signal.SIGKILL)
    for t in threads:
        t.join(timeout=60)
    # The history, read once the supervisor has replaced the killed process.
    admin_md = (("authorization", f"Bearer {tokens[ADMIN_CALLER.subject]}"),)
    histories = {}
    deadline = time.monotonic() + 20
    for pid in pids:
        while True:
            try:
                events, page = [], ""
                while True:
                    got = stubs[0].ListPaymentEvents(pb.ListPaymentEventsRequest(payment_id=pid, page_size=100, page_token=page),
                                                     metadata=admin_md, timeout=5)
                    events += got.events
                    if not got.next_page_token:
                        break
                    page = got.next_page_token
                histories[pid] = events
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, e
                time.sleep(0.2)
    for ch in channels:
        ch.close()
    return calls, histories


def stamp(event) -> float:
    return event.time.seconds + event.time.nanos / 1e9


def check(calls: list[Call], histories: dict[str, list], slack: float = SLACK) -> dict[str, int]:
    counts = {"calls": len(calls), "changes": 0, "acknowledged": 0, "retries": 0, "unknown": 0}
    admins = {ADMIN_CALLER.subject}
    for pid, events in histories.items():
        names = [pb.PaymentEvent.Action.Name(e.action) for e in events]
        assert names[0] == "CREATED", names
        for before, after in zip(events, events[1:]):
            assert after.from_status == before.to_status, names  # one valid path
        states, times = [State()], [stamp(events[0])]
        for event in events[1:]:
            states.append(states[-1].after(event))
            times.append(stamp(event))
        assert times == sorted(times), "the history's times do not follow its order"

        def in_flight(c: Call) -> list[int]:
            """The states the payment was in at some moment of the call (state k holds from
            times[k] until times[k + 1])."""
            return [k for k in range(len(states)) if times[k] <= c.end + slack
                    and (k + 1 == len(states) or times[k + 1] >= c.start - slack)]

        mine = [c for c in calls if c.pid == pid]
        # Which calls could have made each change: its kind and caller, in flight at its time, and
        # the change is what the rules do in the state before it.
        makers = {}
        for k, event in enumerate(events[1:], start=1):
            action = pb.PaymentEvent.Action.Name(event.action)
            makers[k] = [i for i, c in enumerate(mine) if ACTIONS[c.op] == action and c.caller == event.actor_id
                         and c.outcome in ("ok", "unknown") and c.start - slack <= times[k] <= c.end + slack
                         and answer(states[k - 1], c.op, c.caller, c.caller in admins) == "change"]
        # An acknowledged success needs a change of its own unless, at some moment in flight, the
        # rules would have answered it as a retry.
        needs_change = {i for i, c in enumerate(mine) if c.outcome == "ok"
                        and "ok" not in {answer(states[k], c.op, c.caller, c.caller in admins) for k in in_flight(c)}}
        # One call per change at most: a maximum matching (augmenting paths); every change must
        # have its maker, and every success that needs a change must have made one.
        owner: dict[int, int] = {}

        def augment(k: int, seen: set) -> bool:
            for i in makers[k]:
                if i in seen:
                    continue
                seen.add(i)
                if i not in owner or augment(owner[i], seen):
                    owner[i] = k
                    return True
            return False

        for k in sorted(makers, key=lambda k: len(makers[k])):
            assert augment(k, set()), f"{pid}: change {k} ({names[k]} by {events[k].actor_id}) matches no call in flight; history {names}"
        counts["changes"] += len(makers)
        missing = needs_change - set(owner)
        assert not missing, f"{pid}: acknowledged changes missing from the history: {[mine[i] for i in missing]}"
        # Every other acknowledged answer is the rules' answer in a state the payment had in flight.
        for i, c in enumerate(mine):
            if c.outcome == "unknown":
                counts["unknown"] += 1
                continue
            counts["acknowledged"] += 1
            if i in owner:
                continue
            expected = {answer(states[k], c.op, c.caller, c.caller in admins) for k in in_flight(c)} - {"change"}
            assert c.outcome in expected, (
                f"{pid}: {c.op} by {c.caller} answered {c.outcome!r}, but in flight the rules answer only {expected}; "
                f"states {[states[k] for k in in_flight(c)]}")
            counts["retries"] += c.outcome == "ok"
    return counts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kill", [False, True], ids=["steady", "a process killed"])
def test_racing_clients_leave_a_history_one_serial_order_explains(processes, token_for, backend, kill):
    calls, histories = run(processes, token_for, kill)
    counts = check(calls, histories, PG_SLACK if backend == "postgres" else SLACK)
    print(f"\n{counts}")
    assert counts["changes"] >= PAYMENTS and counts["acknowledged"] > 50, counts
    if kill:  # the process did die mid-run, and was replaced (its calls in flight: either outcome is allowed)
        assert "server process exited; starting another" in processes.log.read_text()
