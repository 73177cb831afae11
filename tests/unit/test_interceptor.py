"""The call wrapper (server/edge/interceptor.py) on its own: built once per method, the token before the body,
the caller handed to the handler and taken back, every outcome logged. The same wrapper over a
real channel is covered by tests/service/test_service.py, tests/service/test_turns.py and tests/service/test_process.py."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import grpc
import pytest

from server.domain import errors
from server.edge import auth, decoding, status
from server.edge.interceptor import CallInterceptor
from server.infra import config, logs, sqlite_turns, tokens
from server.edge.pb import payments_pb2 as pb
from tests.conftest import ALICE, session_id_of

GET = "/payments.v1.PaymentService/GetPayment"
LOGIN = "/payments.v1.AuthService/Login"
Details = collections.namedtuple("Details", "method invocation_metadata")


class Aborted(Exception):
    pass


class FakeContext:
    """What the wrapper uses of grpc.ServicerContext."""

    def __init__(self, metadata=()):
        self.metadata, self.status = tuple(metadata), None

    def invocation_metadata(self):
        return self.metadata

    def code(self):
        return self.status.code if self.status is not None else None

    def abort_with_status(self, status):
        self.status = status
        raise Aborted(status.code)


@pytest.fixture
def verifier(keys_dir):
    s = config.Settings()
    return tokens.TokenVerifier.from_file(keys_dir / "jwks.json", issuer=s.jwt_issuer, audience=s.jwt_audience)


def unary(behavior):
    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=pb.GetPaymentRequest.FromString,
                                               response_serializer=pb.Payment.SerializeToString)


def wrapped(interceptor, method, handler):
    return interceptor.intercept_service(lambda details: handler, Details(method, ()))


def test_each_method_is_wrapped_once_and_unknown_methods_are_not_remembered(verifier):
    interceptor = CallInterceptor(verifier)
    looked_up = []

    def continuation(details):
        looked_up.append(details.method)
        return unary(lambda request, context: pb.Payment()) if details.method == GET else None

    first = interceptor.intercept_service(continuation, Details(GET, ()))
    assert interceptor.intercept_service(continuation, Details(GET, ())) is first
    assert interceptor.intercept_service(continuation, Details("/x.Y/Z", ())) is None
    assert interceptor.intercept_service(continuation, Details("/x.Y/Z", ())) is None
    assert looked_up == [GET, "/x.Y/Z", "/x.Y/Z"]


def test_a_protected_stream_is_refused_and_a_public_one_served_as_it_is(verifier):
    interceptor = CallInterceptor(verifier)
    stream = grpc.stream_stream_rpc_method_handler(lambda requests, context: iter(()))
    with pytest.raises(RuntimeError, match="not unary"):
        wrapped(interceptor, "/payments.v1.PaymentService/Watch", stream)
    assert wrapped(interceptor, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", stream) is stream


def test_the_handler_sees_the_verified_caller_and_the_next_call_does_not(verifier, token_for):
    seen = []
    handler = wrapped(CallInterceptor(verifier), GET, unary(lambda request, context: seen.append(auth.caller())
                                                                    or pb.Payment(id="pay_x")))
    ctx = FakeContext([("authorization", f"Bearer {token_for(ALICE)}")])
    assert handler.unary_unary(pb.GetPaymentRequest(), ctx) == pb.Payment(id="pay_x")
    assert seen == [dataclasses.replace(ALICE, session_id=session_id_of(ALICE))]
    with pytest.raises(LookupError):
        auth.caller()  # taken back when the call ended


def test_the_token_is_judged_before_the_body(verifier, token_for):
    handler = wrapped(CallInterceptor(verifier), GET, unary(lambda request, context: pb.Payment()))
    garbage = handler.request_deserializer(b"\xff\xff\xff")
    assert garbage is decoding.UNDECODABLE
    no_token = FakeContext()
    with pytest.raises(Aborted):
        handler.unary_unary(garbage, no_token)
    assert no_token.code() == grpc.StatusCode.UNAUTHENTICATED
    with_token = FakeContext([("authorization", f"Bearer {token_for(ALICE)}")])
    with pytest.raises(Aborted):
        handler.unary_unary(garbage, with_token)
    assert with_token.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_public_methods_need_no_token_and_payment_calls_hold_a_turn(verifier, token_for):
    database_turns = sqlite_turns.Turns(2)
    free_during = []

    def behavior(request, context):
        free_during.append(database_turns.free())
        return pb.Payment()

    interceptor = CallInterceptor(verifier, database_turns)
    login = wrapped(interceptor, LOGIN, unary(behavior))
    assert login.unary_unary(pb.GetPaymentRequest(), FakeContext()) == pb.Payment()  # no token needed
    get = wrapped(interceptor, GET, unary(behavior))
    get.unary_unary(pb.GetPaymentRequest(), FakeContext([("authorization", f"Bearer {token_for(ALICE)}")]))
    assert free_during == [2, 1]  # a login takes no turn; a payment call holds one
    assert database_turns.free() == 2  # and hands it back


@pytest.mark.parametrize("behavior, code", [
    (lambda request, context: pb.Payment(), "OK"),
    (lambda request, context: status.abort(context, errors.NotFound("gone")), "NOT_FOUND"),
    (lambda request, context: 1 / 0, "INTERNAL"),  # anything unexpected: INTERNAL, mapped here, logged once
])
def test_every_call_is_logged_with_its_outcome(verifier, token_for, monkeypatch, caplog, behavior, code):
    monkeypatch.setattr(logs, "_batching", None)
    caplog.set_level(logging.INFO, logger=logs.ACCESS)
    handler = wrapped(CallInterceptor(verifier), GET, unary(behavior))
    started = time.perf_counter()
    try:
        handler.unary_unary(pb.GetPaymentRequest(), FakeContext([("authorization", f"Bearer {token_for(ALICE)}")]))
    except (Aborted, ZeroDivisionError):
        pass
    took_ms = (time.perf_counter() - started) * 1000
    (record,) = [r for r in caplog.records if r.name == logs.ACCESS]
    assert (record.method, record.code) == (GET, code)
    assert 0 <= record.duration_ms <= took_ms + 0.01  # milliseconds, and of this call (rounded to 0.01)
