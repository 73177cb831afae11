"""Every RPC and every error path over a real gRPC channel on loopback, on both databases."""

import concurrent.futures
import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.domain import errors
from server.edge.pb import payments_pb2 as pb
from tests.support import jwt_attacks
from tests.conftest import ADMIN_CALLER, ALICE, BOB, rich_status


def create(stubs, md, **kw):
    fields = dict(email="alice@example.com", amount=150000)
    fields.update(kw)
    return stubs.payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(**fields)), metadata=md)


def fails(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return rich_status(e.value)


# --- the happy paths ---------------------------------------------------------------------

def test_create_get_list_confirm_cancel_delete(stubs, auth_md):
    alice, admin = auth_md(ALICE), auth_md(ADMIN_CALLER)
    p = create(stubs, alice, description="Order 7", currency="USD", request_id="order-7")
    assert p.id.startswith("pay_") and p.status == pb.Payment.PENDING
    assert (p.currency, p.description, p.request_id, p.amount) == ("USD", "Order 7", "order-7", 150000)
    assert p.created_at.seconds and p.expires_at.ToDatetime() > p.created_at.ToDatetime()

    assert stubs.payments.GetPayment(pb.GetPaymentRequest(id=p.id), metadata=alice) == p
    listed = stubs.payments.ListPayments(pb.ListPaymentsRequest(), metadata=alice)
    assert [x.id for x in listed.payments] == [p.id] and listed.next_page_token == ""

    done = stubs.payments.ConfirmPayment(pb.ConfirmPaymentRequest(id=p.id), metadata=admin)
    assert done.status == pb.Payment.SUCCESS

    q = create(stubs, alice)
    cancelled = stubs.payments.CancelPayment(pb.CancelPaymentRequest(id=q.id), metadata=alice)
    assert (cancelled.status, cancelled.failure_reason) == (pb.Payment.FAILED, pb.Payment.CANCELLED)

    stubs.payments.DeletePayment(pb.DeletePaymentRequest(id=q.id), metadata=alice)
    code, info, _ = fails(stubs.payments.GetPayment, pb.GetPaymentRequest(id=q.id), metadata=alice)
    assert (code, info.reason) == (grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND")


def test_list_pages_with_tokens_and_filters(stubs, auth_md):
    admin = auth_md(ADMIN_CALLER)
    ids = [create(stubs, admin, email=("alice@example.com", "bob@example.com")[i % 2]).id for i in range(5)]
    first = stubs.payments.ListPayments(pb.ListPaymentsRequest(page_size=2), metadata=admin)
    second = stubs.payments.ListPayments(pb.ListPaymentsRequest(page_size=2, page_token=first.next_page_token), metadata=admin)
    third = stubs.payments.ListPayments(pb.ListPaymentsRequest(page_size=2, page_token=second.next_page_token), metadata=admin)
    assert [p.id for page in (first, second, third) for p in page.payments] == ids[::-1]
    assert third.next_page_token == ""
    only = stubs.payments.ListPayments(pb.ListPaymentsRequest(email="bob@example.com", status=pb.Payment.PENDING), metadata=admin)
    assert {p.email for p in only.payments} == {"bob@example.com"} and len(only.payments) == 2
    assert {p.owner_id for p in only.payments} == {BOB.subject}


def test_idempotent_create_over_the_wire(stubs, auth_md):
    alice = auth_md(ALICE)
    a = create(stubs, alice, request_id="r-1")
    b = create(stubs, alice, request_id="r-1")
    assert a == b
    code, info, _ = fails(create, stubs, alice, request_id="r-1", amount=1)
    assert (code, info.reason, info.metadata["request_id"]) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_CONFLICT", "r-1")


def test_concurrent_retries_with_one_request_id_make_one_payment(stubs, auth_md):
    alice = auth_md(ALICE)
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda _: create(stubs, alice, request_id="burst"), range(48)))
    assert len({r.id for r in results}) == 1
    listed = stubs.payments.ListPayments(pb.ListPaymentsRequest(page_size=100), metadata=alice)
    assert len(listed.payments) == 1


# --- error paths -------------------------------------------------------------------------

def test_invalid_payment_names_each_field(stubs, auth_md):
    code, info, bad = fails(create, stubs, auth_md(ALICE), email="nope", amount=0, currency="XYZ", description="d" * 501)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.reason, info.domain) == ("INVALID_PAYMENT", "payments.v1")
    assert {v.field for v in bad.field_violations} == {"payment.email", "payment.amount", "payment.currency", "payment.description"}
    assert all(v.description for v in bad.field_violations)


@pytest.mark.parametrize("request_kw, field", [
    (dict(page_size=101), "page_size"), (dict(page_size=-3), "page_size"),
    (dict(page_token="forged.token"), "page_token"), (dict(email="bad"), "email"), (dict(status=42), "status"),
])
def test_invalid_list_arguments(stubs, auth_md, request_kw, field):
    code, info, bad = fails(stubs.payments.ListPayments, pb.ListPaymentsRequest(**request_kw), metadata=auth_md(ADMIN_CALLER))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad.field_violations] == [field]


@pytest.mark.parametrize("rpc, request_type", [("GetPayment", pb.GetPaymentRequest), ("DeletePayment", pb.DeletePaymentRequest),
                                               ("ConfirmPayment", pb.ConfirmPaymentRequest), ("CancelPayment", pb.CancelPaymentRequest)])
def test_unknown_ids_are_not_found(stubs, auth_md, rpc, request_type):
    code, info, _ = fails(getattr(stubs.payments, rpc), request_type(id="pay_aaaaaaaaaaaaaaaaaaaaaaaaaa"), metadata=auth_md(ADMIN_CALLER))
    assert (code, info.reason) == (grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND")


def test_illegal_transition_is_failed_precondition_naming_the_status(stubs, auth_md):
    admin = auth_md(ADMIN_CALLER)
    p = create(stubs, admin)
    stubs.payments.CancelPayment(pb.CancelPaymentRequest(id=p.id), metadata=admin)
    with pytest.raises(grpc.RpcError) as e:
        stubs.payments.ConfirmPayment(pb.ConfirmPaymentRequest(id=p.id), metadata=admin)
    code, info, _ = rich_status(e.value)
    assert (code, info.reason, info.metadata["status"]) == (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_PENDING", "failed")
    assert "is failed (cancelled), not pending" in e.value.details()


def test_customers_are_confined_to_their_own_payments(stubs, auth_md):
    alice, bob = auth_md(ALICE), auth_md(BOB)
    p = create(stubs, alice)
    for rpc, req in (("GetPayment", pb.GetPaymentRequest), ("CancelPayment", pb.CancelPaymentRequest),
                     ("DeletePayment", pb.DeletePaymentRequest)):
        code, _, _ = fails(getattr(stubs.payments, rpc), req(id=p.id), metadata=bob)
        assert code == grpc.StatusCode.NOT_FOUND
    assert stubs.payments.ListPayments(pb.ListPaymentsRequest(), metadata=bob).payments == []
    code, info, _ = fails(create, stubs, bob, email="alice@example.com")
    assert (code, info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "EMAIL_NOT_CALLERS")
    code, _, _ = fails(stubs.payments.ConfirmPayment, pb.ConfirmPaymentRequest(id=p.id), metadata=alice)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _, _ = fails(stubs.payments.ListPayments, pb.ListPaymentsRequest(email="alice@example.com"), metadata=bob)
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_unexpected_errors_are_internal_without_a_stack_trace(stubs, auth_md, running_server, monkeypatch):
    def boom(*a, **kw):
        raise ZeroDivisionError("secret internals")

    monkeypatch.setattr(running_server.rules, "get", boom)
    with pytest.raises(grpc.RpcError) as e:
        stubs.payments.GetPayment(pb.GetPaymentRequest(id="pay_x"), metadata=auth_md(ALICE))
    code, info, _ = rich_status(e.value)
    assert (code, info.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
    assert "secret" not in e.value.details() and "Traceback" not in e.value.details()


# --- authentication at the server itself ---------------------------------------------------

def test_payment_calls_need_a_token(stubs):
    code, info, _ = fails(stubs.payments.ListPayments, pb.ListPaymentsRequest())
    assert (code, info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")
    code, _, _ = fails(stubs.payments.ListPayments, pb.ListPaymentsRequest(), metadata=(("authorization", "Basic abc"),))
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("attack", ["expired", "not_yet_valid", "wrong_signature", "unknown_kid", "alg_none",
                                    "hs256_with_public_key", "wrong_iss", "wrong_aud", "tampered_payload", "garbage"])
def test_forged_tokens_are_refused_by_the_server(stubs, keys_dir, attack):
    token = jwt_attacks.attacks((keys_dir / "jwt-private.pem").read_bytes(),
                                json.loads((keys_dir / "jwks.json").read_text()))[attack]
    code, _, _ = fails(stubs.payments.ListPayments, pb.ListPaymentsRequest(), metadata=(("authorization", f"Bearer {token}"),))
    expected = grpc.StatusCode.PERMISSION_DENIED if attack == "wrong_aud" else grpc.StatusCode.UNAUTHENTICATED
    assert code == expected


def test_register_login_and_use_the_token(stubs):
    reg = stubs.auth.Register(pb.RegisterRequest(email="Carol@example.com", password="correct horse battery"))
    assert (reg.email, reg.role) == ("carol@example.com", "customer")
    login = stubs.auth.Login(pb.LoginRequest(email="carol@example.com", password="correct horse battery"))
    assert login.token_type == "Bearer" and login.expires_in > 0
    md = (("authorization", f"Bearer {login.access_token}"),)
    p = create(stubs, md, email="carol@example.com")
    assert stubs.payments.GetPayment(pb.GetPaymentRequest(id=p.id), metadata=md).email == "carol@example.com"
    code, info, _ = fails(stubs.auth.Login, pb.LoginRequest(email="carol@example.com", password="wrong password"))
    assert (code, info.reason) == (grpc.StatusCode.UNAUTHENTICATED, "BAD_CREDENTIALS")
    code, info, _ = fails(stubs.auth.Register, pb.RegisterRequest(email="carol@example.com", password="correct horse battery"))
    assert (code, info.reason) == (grpc.StatusCode.ALREADY_EXISTS, "EMAIL_TAKEN")
    code, _, bad = fails(stubs.auth.Register, pb.RegisterRequest(email="x", password="short"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and {v.field for v in bad.field_violations} == {"email", "password"}


# --- health, reflection, codes ---------------------------------------------------------------

def test_health_serves_overall_and_per_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "payments.v1.PaymentService", "payments.v1.AuthService", "payments.v1.WebhookService"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING


def test_health_goes_not_serving_when_stopping(running_server, channel):
    health = health_pb2_grpc.HealthStub(channel)
    running_server.health.enter_graceful_shutdown()
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_the_services(channel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"payments.v1.PaymentService", "payments.v1.AuthService", "payments.v1.WebhookService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("error, code", [
    (errors.InvalidArgument([("f", "bad")], reason="R"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound("x"), grpc.StatusCode.NOT_FOUND),
    (errors.FailedPrecondition("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
    (errors.PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
    (errors.ResourceExhausted("x", reason="SERVER_BUSY"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
    (errors.Internal("x"), grpc.StatusCode.INTERNAL),
])
def test_a_rule_s_error_reaches_the_client_as_its_status_code(stubs, auth_md, running_server, monkeypatch, error, code):
    """The rules raise domain errors; the interceptor alone turns them into what a client reads."""
    def failing(*a, **kw):
        raise error

    monkeypatch.setattr(running_server.rules, "get", failing)
    with pytest.raises(grpc.RpcError) as e:
        stubs.payments.GetPayment(pb.GetPaymentRequest(id="pay_x"), metadata=auth_md(ALICE))
    got, info, _ = rich_status(e.value)
    assert (got, e.value.details(), info.reason) == (code, error.message, error.reason)
