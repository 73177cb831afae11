"""Arbitrary text in every string field of every RPC never yields INTERNAL, on both databases.

The fields are found from the request descriptors, not listed by hand, so a new RPC or a new
field is fuzzed without anyone remembering to. Each request is otherwise valid (an admin's
token, a real payment id where one is needed), so the text reaches the rules and the database.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from tests.conftest import ADMIN_CALLER, ALICE, rich_status

SERVICES = [pb.DESCRIPTOR.services_by_name[name] for name in ("PaymentService", "AuthService", "WebhookService",
                                                                "TokenService", "ClientService")]
# Codes an input may get; INTERNAL, UNKNOWN, UNAVAILABLE (a "database error") and the rest may not.
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
                 grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}


def string_fields(descriptor, prefix=()):
    """Paths of every string field of a message, nested messages included."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING and not field.is_repeated:
            yield prefix + (field.name,)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated \
                and field.message_type.full_name.startswith("payments."):
            yield from string_fields(field.message_type, prefix + (field.name,))


CASES = [(service.name, method.name, path) for service in SERVICES for method in service.methods
         for path in string_fields(method.input_type)]


def test_every_rpc_with_a_string_field_is_fuzzed():
    """The list above covers every RPC that has one (a check on the descriptor walk)."""
    methods = {m for _, m, _ in CASES}
    assert methods == {"CreatePayment", "ListPayments", "GetPayment", "DeletePayment", "ConfirmPayment",
                       "CancelPayment", "UndeletePayment", "ListPaymentEvents", "CreateRefund", "ListRefunds",
                       "GetRefund", "Register", "Login", "Refresh",
                       "CreateWebhookEndpoint", "ListWebhookEndpoints", "GetWebhookEndpoint", "UpdateWebhookEndpoint",
                       "DeleteWebhookEndpoint", "RotateWebhookSecret", "ListWebhookEvents", "GetWebhookEvent",
                       "RedeliverWebhookEvent", "CreateToken", "CreateClient", "ListClients", "GetClient",
                       "RotateClientSecret", "SetClientExpiry", "RevokeClient"}, methods
    assert ("PaymentService", "CreatePayment", ("payment", "description")) in CASES
    assert ("PaymentService", "CreateRefund", ("refund", "note")) in CASES


def baseline(method: str, payment_id: str, endpoint_id: str = "", client: pb.ClientWithSecret | None = None,
             settled_id: str = "") -> object:
    """A valid request for the method (the fuzzed field is then overwritten). A refund goes to a
    settled payment with room for every example's, so the text reaches the database."""
    if method == "CreateRefund":
        return pb.CreateRefundRequest(payment_id=settled_id, refund=pb.Refund(
            amount=1, reason=pb.Refund.OTHER, note="a note"))
    if method == "ListRefunds":
        return pb.ListRefundsRequest(payment_id=settled_id)
    if method == "GetRefund":
        return pb.GetRefundRequest(payment_id=settled_id, id="ref_" + "a" * 26)
    request_type = {
        "CreatePayment": lambda: pb.CreatePaymentRequest(payment=pb.Payment(email=ALICE.email, amount=1250,
                                                                            currency="IDR")),
        "ListPayments": pb.ListPaymentsRequest,
        "Register": lambda: pb.RegisterRequest(email="fuzz@example.com", password="a long enough password"),
        "Login": lambda: pb.LoginRequest(email="fuzz@example.com", password="a long enough password"),
        "CreateWebhookEndpoint": lambda: pb.CreateWebhookEndpointRequest(endpoint=pb.WebhookEndpoint(
            url="https://shop.example.com/hooks", event_types=["*"])),
        "UpdateWebhookEndpoint": lambda: pb.UpdateWebhookEndpointRequest(id=endpoint_id, url="https://a.example.com/h",
                                                                         description="d"),
        "ListWebhookEndpoints": pb.ListWebhookEndpointsRequest,
        "ListWebhookEvents": pb.ListWebhookEventsRequest,
        "CreateClient": lambda: pb.CreateClientRequest(client=pb.Client(name="shop", permissions=["payments.read"])),
        "ListClients": pb.ListClientsRequest,
    }.get(method)
    if request_type is not None:
        return request_type()
    if method == "Refresh":
        return pb.RefreshRequest(refresh_token="rt_" + "a" * 32)
    if method == "ListPaymentEvents":
        return pb.ListPaymentEventsRequest(payment_id=payment_id)
    if method in ("GetWebhookEndpoint", "DeleteWebhookEndpoint", "RotateWebhookSecret"):
        return getattr(pb, f"{method}Request")(id=endpoint_id)
    if method == "CreateToken":
        return pb.CreateTokenRequest(grant_type="client_credentials", client_id=client.client.id,
                                     client_secret=client.secret, scope="payments.read")
    if method in ("GetClient", "RotateClientSecret", "SetClientExpiry", "RevokeClient"):
        return getattr(pb, f"{method}Request")(id=client.client.id)
    if method == "RedeliverWebhookEvent":
        return pb.RedeliverWebhookEventRequest(id=payment_id, endpoint_id=endpoint_id)
    return getattr(pb, f"{method}Request")(id=payment_id)


TEXT = st.one_of(
    st.text(),  # every code point class: controls, NUL, combining marks, astral planes
    st.text(min_size=40, max_size=2100),
    st.builds(lambda s, tail: s + tail, st.text(alphabet="abc-._:@0123456789", min_size=1, max_size=80),
              st.sampled_from(["\n", "\r\n", "\x00", "\u2028", " ", "\t", ""])),
    st.sampled_from(["\x00", "a" * 64 + "\n", "x" * 65, "é" * 255, "\U0001F4B8" * 300, "pay_" + "a" * 26 + "\n"]),
)


@pytest.fixture
def payment_id(stubs, auth_md) -> str:
    created = stubs.payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=ALICE.email, amount=99)),
                                           metadata=auth_md(ADMIN_CALLER))
    return created.id


@pytest.fixture
def settled_id(stubs, auth_md) -> str:
    created = stubs.payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(
        email=ALICE.email, amount=999_999_999_999)), metadata=auth_md(ADMIN_CALLER))
    stubs.payments.ConfirmPayment(pb.ConfirmPaymentRequest(id=created.id), metadata=auth_md(ADMIN_CALLER))
    return created.id


@pytest.fixture
def endpoint_id(channel, auth_md) -> str:
    made = pb_grpc.WebhookServiceStub(channel).CreateWebhookEndpoint(pb.CreateWebhookEndpointRequest(
        endpoint=pb.WebhookEndpoint(url="https://shop.example.com/hooks", event_types=["*"])),
        metadata=auth_md(ADMIN_CALLER))
    return made.endpoint.id


@pytest.fixture
def client(channel, auth_md) -> pb.ClientWithSecret:
    return pb_grpc.ClientServiceStub(channel).CreateClient(pb.CreateClientRequest(
        client=pb.Client(name="shop", permissions=["payments.read"])), metadata=auth_md(ADMIN_CALLER))


# One server per database for all examples (hypothesis runs them inside one test call).
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), text=TEXT)
def test_arbitrary_text_in_any_string_field_is_never_a_server_error(channel, auth_md, payment_id, endpoint_id, client,
                                                                    settled_id, case, text):
    service, method, path = case
    request = baseline(method, payment_id, endpoint_id, client, settled_id)
    target = request
    for name in path[:-1]:
        target = getattr(target, name)
    setattr(target, path[-1], text)
    call = channel.unary_unary(f"/payments.v1.{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=lambda b: b)
    try:
        call(request, metadata=auth_md(ADMIN_CALLER), timeout=10)
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS, (method, path, repr(text)[:200], e.code(), e.details())
        rich_status(e)  # and in the documented shape: an ErrorInfo with a reason



@pytest.mark.parametrize("field,value", [
    ("request_id", "a" * 64 + "\n"), ("request_id", "order-1\n"), ("description", "before\x00after"),
    ("email", "alice@example.com\n"), ("currency", "IDR\n")])
def test_the_probes_from_the_attack_run_are_invalid_argument_naming_the_field(stubs, auth_md, field, value):
    fields = dict(email=ALICE.email, amount=1250, currency="IDR")
    fields[field] = value
    with pytest.raises(grpc.RpcError) as e:
        stubs.payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(**fields)), metadata=auth_md(ALICE))
    code, info, bad = rich_status(e.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad.field_violations] == [f"payment.{field}"]


@pytest.mark.parametrize("character", ["\u2028", "\u2029", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",
                                       "\u2066", "\u2067", "\u2068", "\u2069"])
@pytest.mark.parametrize("field", ["description", "request_id", "email"])
def test_line_separators_and_bidirectional_overrides_are_refused_in_every_field(stubs, auth_md, field, character):
    fields = dict(email=ALICE.email, amount=1250, currency="IDR", description="a refund", request_id="order-7")
    fields[field] = fields[field][:3] + character + fields[field][3:]
    with pytest.raises(grpc.RpcError) as e:
        stubs.payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(**fields)), metadata=auth_md(ALICE))
    code, info, bad = rich_status(e.value)
    assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TEXT")
    assert [v.field for v in bad.field_violations] == [f"payment.{field}"]
    assert f"U+{ord(character):04X}" in bad.field_violations[0].description


@pytest.mark.parametrize("text", ["Zahlung für Bücher", "支付 👩\u200d💻", "\u200fدفعة\u200f", "naïve café"])
def test_text_people_write_passes_the_text_check(stubs, auth_md, text):
    created = stubs.payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(
        email=ALICE.email, amount=1250, currency="IDR", description=text)), metadata=auth_md(ALICE))
    assert created.description == text


def test_a_nul_in_a_login_email_is_invalid_argument(stubs):
    with pytest.raises(grpc.RpcError) as e:
        stubs.auth.Login(pb.LoginRequest(email="a\x00@example.com", password="whatever password"))
    code, info, bad = rich_status(e.value)
    assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_TEXT")
    assert [v.field for v in bad.field_violations] == ["email"]


@pytest.mark.parametrize("field,value", [("note", "one item\u202eback"), ("note", "x" * 501), ("request_id", "ret-1\n"),
                                         ("currency", "IDR\n")])
def test_a_refunds_text_is_checked_as_every_other_field(stubs, auth_md, settled_id, field, value):
    refund = pb.Refund(amount=1, reason=pb.Refund.OTHER)
    setattr(refund, field, value)
    with pytest.raises(grpc.RpcError) as e:
        stubs.payments.CreateRefund(pb.CreateRefundRequest(payment_id=settled_id, refund=refund),
                                    metadata=auth_md(ADMIN_CALLER))
    code, info, bad = rich_status(e.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.reason in ("INVALID_TEXT", "INVALID_REFUND")
    assert [v.field for v in bad.field_violations] == [f"refund.{field}"]
    made = stubs.payments.CreateRefund(pb.CreateRefundRequest(payment_id=settled_id, refund=pb.Refund(
        amount=1, reason=pb.Refund.OTHER, note="Rückgabe 支付 \u200fدفعة\u200f")), metadata=auth_md(ADMIN_CALLER))
    assert made.note == "Rückgabe 支付 \u200fدفعة\u200f"
