"""No number of idle streams stops payment calls (server/edge/capacity.py, the stream clusters in
envoy/envoy.yaml).

Several hundred idle streams on every public streaming method (server reflection v1 and
v1alpha, health Watch), without a token, both through Envoy and straight to the server's port;
while they are open, payment calls over REST and gRPC and a login all succeed within their
normal deadline. The streams the lanes did not admit were refused at once, not queued.
"""

from __future__ import annotations

import time

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from tests.conftest import ALICE
from tests.support.rest import loopback_address
from tests.faults.conftest import create_request, payment_stub
from tests.support.idle_streams import REFLECTION_V1, REFLECTION_V1ALPHA, WATCH, IdleStreams

DEADLINE = 5.0  # seconds: an ordinary call's deadline; every call below must finish within it
STREAMS = 300  # per method and per path


def payment_calls_succeed(edge, token: str, tag: str) -> None:
    """REST and gRPC (direct and via Envoy) payment calls and a REST login, each within DEADLINE."""
    md = (("authorization", f"Bearer {token}"),)
    for target in (f"127.0.0.1:{edge.server.port}", f"127.0.0.1:{edge.envoy.port}"):
        channel, stub = payment_stub(target)
        with channel:
            for i in range(5):
                started = time.monotonic()
                created = stub.CreatePayment(create_request(ALICE.email, f"{tag}-{target[-5:]}-{i}"), metadata=md,
                                             timeout=DEADLINE)
                stub.GetPayment(pb.GetPaymentRequest(id=created.id), metadata=md, timeout=DEADLINE)
                stub.ListPayments(pb.ListPaymentsRequest(page_size=5), metadata=md, timeout=DEADLINE)
                assert time.monotonic() - started < DEADLINE
    api = edge.api
    for _ in range(5):
        started = time.monotonic()
        got = api.post("/v1/payments", {"email": ALICE.email, "amount": "700"}, token=token)
        assert got.status == 200, got.text
        assert api.get(f"/v1/payments/{got.json['id']}", token=token).status == 200
        assert time.monotonic() - started < DEADLINE
    started = time.monotonic()
    login = api.from_address(loopback_address()).post("/v1/auth/login", {"email": "nobody@example.com",
                                                                        "password": "not the password"})
    assert login.status == 401, login.text  # the server answered (a hash was spent), promptly
    assert time.monotonic() - started < DEADLINE


@pytest.mark.parametrize("path", ["envoy", "direct"])
def test_hundreds_of_idle_public_streams_do_not_stop_payment_calls(edge, token_for, path):
    token = token_for(ALICE)
    payment_calls_succeed(edge, token, f"before-{path}")  # warm: connections, prepared queries
    target = f"127.0.0.1:{edge.envoy.port if path == 'envoy' else edge.server.port}"
    with IdleStreams(target, count=STREAMS) as streams:
        payment_calls_succeed(edge, token, f"during-{path}")
        outcomes = streams.outcomes()
    # What happened to the streams themselves: refused at once or held, never queued for threads.
    for method in (REFLECTION_V1, REFLECTION_V1ALPHA, WATCH):
        assert sum(outcomes[method].values()) == STREAMS
    if path == "envoy":
        # Reflection needs a token at the edge; health Watch is public but one address may open
        # only 4 at once (tests/faults/test_watch_hold.py: that, the Watch cluster's breaker of
        # 64, and what addresses enough to fill it do not take).
        assert outcomes[REFLECTION_V1]["UNAUTHENTICATED"] == STREAMS
        assert outcomes[REFLECTION_V1ALPHA]["UNAUTHENTICATED"] == STREAMS
        assert 1 <= outcomes[WATCH]["open"] <= 4, outcomes[WATCH]
        assert outcomes[WATCH]["RESOURCE_EXHAUSTED"] == STREAMS - outcomes[WATCH]["open"]
    else:
        assert outcomes[REFLECTION_V1]["UNIMPLEMENTED"] == STREAMS  # grpcio-reflection serves v1alpha only
        held = outcomes[REFLECTION_V1ALPHA]["open"]
        assert 1 <= held <= 8, outcomes[REFLECTION_V1ALPHA]  # PAYMENTS_MAX_STREAMS
        assert outcomes[REFLECTION_V1ALPHA]["RESOURCE_EXHAUSTED"] == STREAMS - held
        assert 1 <= outcomes[WATCH]["open"] <= 64, outcomes[WATCH]  # capacity.MAX_WATCHES
        assert outcomes[WATCH]["RESOURCE_EXHAUSTED"] == STREAMS - outcomes[WATCH]["open"]
    # And once they are gone, reflection serves the next operator again.
    channel = grpc.insecure_channel(f"127.0.0.1:{edge.server.port}")
    with channel:
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        deadline = time.monotonic() + 10
        while True:
            try:
                answers = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=DEADLINE))
                break
            except grpc.RpcError as e:  # the lane frees as the cancelled streams end
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, e
                time.sleep(0.2)
    assert "payments.v1.PaymentService" in str(answers)
