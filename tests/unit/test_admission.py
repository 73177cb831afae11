"""A call waits for its request message on no thread, never on a lane's
(server/edge/admission.py): raw HTTP/2 clients send the headers of calls and never their message,
against a real grpc server on loopback with the server's lanes."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.edge import capacity
from server.edge.interceptor import CallInterceptor
from tests.support.jobs import wait_for

CHECK = "/grpc.health.v1.Health/Check"


def serve(request_seconds: float):
    """A grpc server with the lanes (16 calls may wait for their message) and health."""
    lanes = capacity.Lanes.create(worker_threads=2, max_concurrent_rpcs=32, auth_threads=1, max_streams=2,
                                  stream_max_seconds=5, request_seconds=request_seconds, receiving=16)
    # The server's interceptor puts each method in its lane (health checks in the health lane).
    server = grpc.server(lanes.payments, interceptors=[CallInterceptor(None, None, lanes, None)],
                         maximum_concurrent_rpcs=lanes.total + 64)
    servicer = health.HealthServicer(experimental_non_blocking=True, experimental_thread_pool=lanes.health)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, lanes


@contextlib.contextmanager
def serving(request_seconds: float):
    server, port, lanes = serve(request_seconds)
    try:
        yield port, lanes
    finally:
        server.stop(None)
        lanes.shutdown()


@pytest.fixture
def served():
    """A 3 s request deadline: room for a loaded machine to dispatch the streams first."""
    with serving(3.0) as it:
        yield it


@pytest.fixture
def served_patiently():
    """A 30 s request deadline: within a test, only eviction ends a waiting call."""
    with serving(30.0) as it:
        yield it


class HeaderOnly:
    """One HTTP/2 connection with `count` streams whose headers were sent and nothing else."""

    def __init__(self, port: int, count: int, path: str = CHECK):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.streams = []
        for _ in range(count):
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":authority", "t"), (":path", path),
                                         ("content-type", "application/grpc"), ("te", "trailers")])
            self.streams.append(sid)
        self.sock.sendall(self.conn.data_to_send())

    def statuses(self, seconds: float) -> dict[int, str]:
        """grpc-status of each stream that ended within `seconds`."""
        out: dict[int, str] = {}
        deadline = time.monotonic() + seconds
        self.sock.settimeout(0.2)
        while len(out) < len(self.streams) and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not data:
                break
            for event in self.conn.receive_data(data):
                headers = getattr(event, "headers", None)
                if headers:
                    status = dict(headers).get(b"grpc-status")
                    if status is not None:
                        out[event.stream_id] = status.decode()
            pending = self.conn.data_to_send()
            if pending:
                self.sock.sendall(pending)
        return out

    def close(self):
        self.sock.close()


def check(port: int) -> float:
    started = time.monotonic()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - started


def test_calls_whose_message_never_comes_hold_no_lane_thread_and_end_at_the_deadline(served):
    port, lanes = served
    receiver = lanes.health.receiver
    attack = HeaderOnly(port, 6)  # three times the health lane's two threads, fewer than its receiver holds
    try:
        wait_for(lambda: receiver.waiting == 6, timeout=2, interval=0.02, what="six calls waiting for a message")
        assert receiver.waiting < receiver.limit
        assert check(port) < 0.5  # a whole request is served at once, beside them
        statuses = attack.statuses(6.0)
        assert set(statuses.values()) == {str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])}, statuses
        assert len(statuses) == 6
        until = time.monotonic() + 2  # the completions come a moment after the status went out
        while receiver.waiting and time.monotonic() < until:
            time.sleep(0.02)
        assert receiver.waiting == 0 and receiver.expired == 6
    finally:
        attack.close()


def test_beyond_the_receivers_bound_the_longest_stalled_call_makes_room(served_patiently):
    port, lanes = served_patiently
    receiver = lanes.health.receiver
    attack = HeaderOnly(port, receiver.limit)  # every place the health lane's receiver holds
    try:
        wait_for(lambda: receiver.waiting == receiver.limit, timeout=2, interval=0.02, what="the receiver full")
        time.sleep(0.3)  # stalled for longer than Receiver.STALE_SECONDS
        assert check(port) < 0.5  # a whole request is taken at once
        assert receiver.evicted == 1  # the one stalled call that made room for it
        assert check(port) < 0.5 and receiver.evicted == 1  # that room is still there
        ended = attack.statuses(1.5)
        assert sorted(ended) == attack.streams[:1], ended  # the oldest
        assert set(ended.values()) == {str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])}, ended
    finally:
        attack.close()


def test_calls_of_one_kind_never_make_room_from_anothers(served_patiently):
    port, lanes = served_patiently
    attack = HeaderOnly(port, lanes.payments.receiver.limit, path="/payments.v1.PaymentService/GetPayment")
    try:
        time.sleep(0.3)
        assert check(port) < 0.5  # health has a receiver of its own
        assert lanes.payments.receiver.evicted == 0 and lanes.health.receiver.evicted == 0
    finally:
        attack.close()


def test_a_client_that_goes_away_frees_its_place_at_once(served):
    port, lanes = served
    receiver = lanes.health.receiver
    attack = HeaderOnly(port, 6)
    wait_for(lambda: receiver.waiting == 6, timeout=2, interval=0.02, what="six calls waiting for a message")
    attack.close()
    deadline = time.monotonic() + 0.9  # well before the 3 s request deadline
    while receiver.waiting and time.monotonic() < deadline:
        time.sleep(0.02)
    assert receiver.waiting == 0 and receiver.expired == 0


@pytest.mark.parametrize("peer, claimed, taken", [
    ("ipv4:127.0.0.1:5000", "203.0.113.7", "203.0.113.7"),  # the pod's Envoy, on loopback: its word
    ("ipv6:[::1]:5000", "203.0.113.7", "203.0.113.7"),
    ("ipv6:[::ffff:127.0.0.1]:5000", "203.0.113.7", "203.0.113.7"),
    ("ipv4:10.8.0.1:5000", "127.0.0.2", "10.8.0.1"),  # the node, on the server's own port: its own claim, ignored
    ("ipv6:[2001:db8::5]:5000", "127.0.0.2", "2001:db8::5"),
    ("ipv4:127.0.0.1:5000", None, "127.0.0.1"),
])
def test_only_the_pods_own_envoy_names_the_client_address(peer, claimed, taken):
    """A client on the server's port could otherwise pick any address: get around the login
    throttle's per-address count, or throttle the owner's address (the sessions attack run)."""
    from server.edge import admission

    assert admission.trusted_address(claimed, peer) == taken


@pytest.mark.parametrize("address, client", [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:5:10::1", "2001:db8:5:10::/64"),
    ("2001:0db8:0005:0010:ffff:ffff:ffff:fffe", "2001:db8:5:10::/64"),  # the same /64, written in full
    ("2001:db8:5:11::1", "2001:db8:5:11::/64"),
    ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client on a dual-stack socket
    ("envoy-health-check", "envoy-health-check"),
])
def test_an_ipv6_client_is_its_64(address, client):
    """The lanes' turns and the login and client-secret throttles count an IPv6 client by its /64:
    by its address, one host got 5 free guesses at a password from each of 2^64 addresses."""
    from server.edge import admission

    assert admission.client_network(address) == client


def test_calls_waiting_for_their_message_hold_no_thread():
    """Waiting is grpc's receive operation, not a thread: a thread per waiting call (a pool that
    grew to the bound) grew the server by 220 threads under an attack of header-only streams, and
    handing each message from that thread to the lane's took a quarter of the server's CPU."""
    with serving(1.0) as (port, lanes):
        receiver = lanes.health.receiver
        before = threading.active_count()
        attack = HeaderOnly(port, receiver.limit)
        try:
            wait_for(lambda: receiver.waiting == receiver.limit, timeout=2, interval=0.02, what="the receiver full")
            during = threading.active_count()
            assert len(attack.statuses(3.0)) == receiver.limit  # all ended at the deadline
        finally:
            attack.close()
        print(f"\nthreads: {before} before, {during} with {receiver.limit} calls waiting for their message")
        assert during == before
        assert check(port) < 0.5


def test_the_callers_remembered_for_fair_turns_cost_a_digest_each_not_their_token():
    """Tokens there are not verified yet: a client on the server's own port sent 6,000 of 15 KB,
    and the process grew by 63 MB while their text was kept."""
    import tracemalloc

    from server.edge import admission

    class Call:
        def __init__(self, token: str):
            self._metadata = (("authorization", "Bearer " + token),)

        def metadata(self):
            return self._metadata

    keys = admission.CallerKeys()
    padding = "x" * 15_000
    calls = [Call(f"e30.eyJzdWIiOiJ1c3JfYSJ9.{i}{padding}") for i in range(admission._KEYS_REMEMBERED)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert {keys(call) for call in calls} == {"sub:usr_a"}
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 2_000_000, held  # the tokens' text alone is 61 MB


def test_a_call_whose_turn_cannot_be_read_is_served_and_grpcs_polling_thread_lives_on(served):
    """A lane reads a call's key on grpc's one polling thread: a token whose payload was nested
    5,000 deep made json.loads raise RecursionError there, the thread ended, and the server took no
    call again (the attack on the thread-less receiver, on the server's own port)."""
    port, lanes = served

    def unreadable(call):
        raise RecursionError("maximum recursion depth exceeded")

    lanes.health._key = unreadable
    assert check(port) < 1.0  # served under a key of its own
    assert check(port) < 1.0  # and the server still takes calls


def test_a_tokens_subject_is_read_at_most_so_far_and_never_raises():
    from server.edge import admission

    nested = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    assert admission._unverified_subject(f"e30.{nested}.sig") == "?"
    huge = base64.urlsafe_b64encode(b'{"sub":"usr_a","x":"' + b"y" * 10_000 + b'"}').decode()
    assert admission._unverified_subject(f"e30.{huge}.sig") == "?"
    usual = base64.urlsafe_b64encode(b'{"sub":"usr_a"}').decode()
    assert admission._unverified_subject(f"e30.{usual}.sig") == "usr_a"
