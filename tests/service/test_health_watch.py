"""Health Watch calls ending while others run (server/edge/health.py): grpc_health's servicer sent
a Watch's messages while holding the lock its close callbacks take on grpc's one event thread, and
two Watch calls at once, one ending, stopped the whole server for good."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def health_stub(channel):
    return health_pb2_grpc.HealthStub(channel)


def test_watch_calls_cancelled_while_others_run_leave_the_server_answering(running_server, channel, health_stub):
    def watch_once(_) -> str:
        answers = health_stub.Watch(health_pb2.HealthCheckRequest(), timeout=3)
        try:
            first = next(answers)
        except grpc.RpcError as e:
            return e.code().name
        answers.cancel()  # the client goes away: its close callback runs on grpc's event thread
        return "SERVING" if first.status == SERVING else str(first.status)

    with futures.ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(watch_once, range(48)))
    assert outcomes == ["SERVING"] * 48, outcomes
    started = time.monotonic()
    assert health_stub.Check(health_pb2.HealthCheckRequest(), timeout=3).status == SERVING
    with pytest.raises(grpc.RpcError) as no_token:
        pb_grpc.PaymentServiceStub(channel).GetPayment(pb.GetPaymentRequest(id="pay_x"), timeout=3)
    assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert time.monotonic() - started < 3


def test_a_watch_ends_on_the_current_status_when_it_changes_as_the_watch_begins(running_server, health_stub):
    """Sends keep their order: a Watch's first message and a status change never cross."""
    watches = [health_stub.Watch(health_pb2.HealthCheckRequest(), timeout=5) for _ in range(8)]
    running_server.health.enter_graceful_shutdown()
    for answers in watches:
        last = None
        try:
            for message in answers:
                last = message.status
                if last == NOT_SERVING:
                    break
        finally:
            answers.cancel()
        assert last == NOT_SERVING
