"""Calls whose request never finishes arriving hold nothing another customer needs.

An HTTP/2 client can open a gRPC call, send its HEADERS, and then never send the message (or send
a length prefix announcing a message and only part of it), on every method and as many streams as
the connection allows. grpc's sync server gives such a call to a worker thread that then waits
for the message: a handful of them took a lane's every thread. So

- through Envoy, every unary call (and health Watch) is buffered whole before its stream to the
  server is opened, and a request that has not arrived within Envoy's request timeout (at most
  10 s) is ended by Envoy; a call on a method that needs a token is refused on its headers alone;
- straight to the server's port, a call waits for its message in grpc's receive operation, on
  no thread (not a worker's), and is ended after the receive deadline (5 s)
  (server/edge/admission.py).

Here an attacker (a customer of its own, from loopback addresses of its own) opens such streams on
every method the descriptors list, with and without a token, while a bystander (another customer,
tests/support/bystander.py) must succeed at REST and gRPC payment calls and a login, each within
5 s; afterwards every attacking stream has been answered and the next call succeeds at once, and
the attack started no thread in the server.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from server.edge import auth
from tests.conftest import ALICE, BOB
from tests.support import attacks
from tests.support.bystander import Bystander

STREAMS = 20  # per method, for each kind of attack
# Envoy ends a request that has not arrived whole (envoy.yaml request_timeout; the docs: about 10 s).
REQUEST_TIMEOUT = min(attacks.configured_timeouts()["request_timeout"], 10.0)
RECEIVE_DEADLINE = 5.0  # the server ends a call whose message has not arrived (server/edge/admission.py)
SLACK = 3.0  # for the timers' granularity and a busy machine
AT_ONCE = 1.0  # "at once": a refusal on the headers alone, a call on an idle service
THREADS_KEPT = 24  # threads the server may start beyond its count before the attack (the lanes'
# workers the bystander's calls start); a thread per waiting call was ~220 more

METHODS = attacks.grpc_methods()
PROTECTED = [m for m in METHODS if not auth.is_public(m)]


def test_the_method_list_covers_every_service():
    services = {m.split("/")[1] for m in METHODS}
    assert services == {"payments.v1.PaymentService", "payments.v1.AuthService", "payments.v1.WebhookService",
                        "payments.v1.TokenService", "payments.v1.ClientService", "grpc.health.v1.Health"}, services
    assert {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"} <= set(METHODS)
    assert len(METHODS) >= 20 and PROTECTED


@pytest.fixture(scope="module")
def bystander(edge, token_for) -> Bystander:
    return Bystander.register(edge.api, f"127.0.0.1:{edge.envoy.port}", token_for(ALICE), "bystander@example.com",
                              direct_target=f"127.0.0.1:{edge.server.port}")


def attack_kinds(port: int, token: str, count: int, first_source: int) -> dict:
    """Header-only and partial-message streams on every method, without a token and with the
    attacker's own, each kind from a loopback address of its own (not the bystander's)."""
    host = "127.0.0.1"
    sources = (f"127.66.{first_source}.{i}" for i in range(1, 5))
    return {
        "header-only, no token": attacks.header_only_streams(host, port, METHODS, count, source=next(sources)),
        "header-only, token": attacks.header_only_streams(host, port, METHODS, count, token=token,
                                                          source=next(sources)),
        "partial message, no token": attacks.partial_message_streams(host, port, METHODS, count,
                                                                     source=next(sources)),
        "partial message, token": attacks.partial_message_streams(host, port, METHODS, count, token=token,
                                                                  source=next(sources)),
    }


def report(name: str, streams: attacks.H2Streams, unanswered: int) -> None:
    times = streams.answer_times()
    print(f"  {name}: {len(streams.streams)} streams on {len(streams.conns)} connections, "
          f"{streams.not_opened} not opened, {unanswered} unanswered; outcomes {dict(streams.outcomes())}; "
          f"answered after median {attacks.median(times):.2f} s, max {max(times, default=0):.2f} s")


def assert_quick(check, bound: float = AT_ONCE) -> None:
    """Nothing is wedged: every step of this check, the login's hash aside, took under `bound`."""
    slow = {step: round(s, 2) for step, s in check.latencies.items() if s > bound and step != "rest login"}
    assert not slow, f"after the attack, calls were slow: {slow}"


@pytest.mark.timeout(120)
def test_calls_that_never_send_their_message_through_envoy_hold_nothing(edge, bystander, token_for):
    bystander.check("envoy-warm")  # connections, prepared queries
    port = edge.envoy.port
    with contextlib.ExitStack() as held:
        kinds = {name: held.enter_context(streams)
                 for name, streams in attack_kinds(port, token_for(BOB), STREAMS, first_source=1).items()}
        total = sum(len(s.streams) for s in kinds.values())
        print(f"\nthrough Envoy: {total} attacking streams on {len(METHODS)} methods")
        during = [bystander.check(f"envoy-during-{i}") for i in range(3)]
        unanswered = {name: s.answered_within(REQUEST_TIMEOUT + SLACK) for name, s in kinds.items()}
        for name, streams in kinds.items():
            report(name, streams, unanswered[name])
        by_method = {name: s.outcomes_by_method() for name, s in kinds.items()}
        refusal_times = {name: [s.answered_at - s.opened for s in streams.streams
                                if s.method in PROTECTED and s.answered_at is not None]
                         for name, streams in kinds.items() if "no token" in name}
    after = bystander.check("envoy-after")
    for check in during + [after]:
        print(f"  bystander {check}")
    bystander.assert_ok(during + [after])
    assert_quick(after)
    # Envoy answered every stream itself, within its request timeout: none is left holding anything.
    assert unanswered == dict.fromkeys(kinds, 0), unanswered
    for name, methods in by_method.items():
        closed = {m: c for m, c in methods.items() if c.get("closed") or c.get("open")}
        assert not closed, f"{name}: streams ended by a closed connection or never: {closed}"
    # A method that needs a token is refused on the headers, at once, when there is none.
    for name in ("header-only, no token", "partial message, no token"):
        for method in PROTECTED:
            assert by_method[name][method] == {"grpc:UNAUTHENTICATED": STREAMS}, (name, method, by_method[name][method])
        assert max(refusal_times[name]) < AT_ONCE, (name, max(refusal_times[name]))
    assert edge.api.get("/ready").status == 200


@pytest.mark.timeout(120)
def test_calls_that_never_send_their_message_to_the_servers_port_are_ended_and_hold_no_thread(
        edge, bystander, token_for):
    """Straight to the server's port (no Envoy in front: what a client inside the pod, or a
    misconfigured network policy, reaches): every wave is answered by the server within its receive
    deadline, the bystander's calls to that same port succeed meanwhile, and a second wave, while
    the first one's connections stay open, finds the server as able as the first did."""
    bystander.check("direct-warm", direct=True)
    pid, port = edge.server.proc.pid, edge.server.port
    threads = {"before": attacks.thread_count(pid)}
    with contextlib.ExitStack() as held:
        for wave in (1, 2):
            kinds = {name: held.enter_context(streams)
                     for name, streams in attack_kinds(port, token_for(BOB), STREAMS, first_source=10 + wave).items()}
            print(f"\nstraight to the server, wave {wave}: {sum(len(s.streams) for s in kinds.values())} streams")
            during = [bystander.check(f"direct-w{wave}-{i}", direct=True) for i in range(2)]
            threads[f"wave {wave}"] = attacks.thread_count(pid)
            unanswered = {name: s.answered_within(RECEIVE_DEADLINE + SLACK) for name, s in kinds.items()}
            threads[f"wave {wave} answered"] = attacks.thread_count(pid)
            for name, streams in kinds.items():
                report(name, streams, unanswered[name])
            for check in during:
                print(f"  bystander {check}")
            bystander.assert_ok(during)
            assert unanswered == dict.fromkeys(kinds, 0), f"wave {wave}: streams left unanswered: {unanswered}"
            for name, streams in kinds.items():
                ended = [s for s in streams.streams if s.outcome in ("closed", "goaway:refused")]
                assert not ended, f"wave {wave}, {name}: {len(ended)} streams ended by the connection, not answered"
        # The attacker goes away without a word: its sockets close, nothing of it stays.
    after = bystander.check("direct-after", direct=True)
    threads["after"] = attacks.thread_count(pid)
    print(f"  bystander {after}\n  server threads: {threads}")
    bystander.assert_ok([after])
    assert_quick(after)
    # Waiting for a message holds no thread: the attack started none (a thread each was ~220).
    assert max(threads.values()) <= threads["before"] + THREADS_KEPT, threads


@pytest.mark.timeout(60)
def test_a_client_that_disconnects_mid_request_leaves_nothing_behind(edge, bystander, token_for):
    """The attacker opens its streams and closes the connections at once: the server's threads come
    back without waiting for any deadline, and the next calls are served at once."""
    bystander.check("gone-warm", direct=True)
    pid = edge.server.proc.pid
    before = attacks.thread_count(pid)
    for target in (edge.server.port, edge.envoy.port):
        for _ in range(3):
            for streams in attack_kinds(target, token_for(BOB), STREAMS, first_source=20).values():
                with streams:
                    pass  # opened, then closed at once
    started = time.monotonic()
    after = bystander.check("gone-after", direct=True)
    print(f"\nserver threads before {before}, right after {attacks.thread_count(pid)}; bystander {after}")
    bystander.assert_ok([after])
    assert_quick(after)
    assert time.monotonic() - started < 5 * AT_ONCE
