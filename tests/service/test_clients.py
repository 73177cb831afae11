"""Service clients through the real server, on both databases: an admin creates a client, the
client gets a token with its id and secret (the client credentials grant over gRPC) and calls
within its permissions only; rotation keeps the old secret for its grace; revocation and expiry
end access within the revocation bound (PAYMENTS_REVOCATION_CHECK_SECONDS, 0.5 s in the tests'
settings); a client's payment belongs to the payer's account and its history names the client.
REST through Envoy: tests/e2e/test_clients_rest.py."""

from __future__ import annotations

import datetime as dt
import time

import grpc
import jwt
import pytest
from google.protobuf import timestamp_pb2

from server.domain import permissions
from server.infra import storage
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from tests.conftest import ADMIN_CALLER, ALICE, BOB, rich_status


@pytest.fixture
def s(channel, auth_md):
    class Stubs:
        payments = pb_grpc.PaymentServiceStub(channel)
        auth = pb_grpc.AuthServiceStub(channel)
        webhooks = pb_grpc.WebhookServiceStub(channel)
        tokens = pb_grpc.TokenServiceStub(channel)
        clients = pb_grpc.ClientServiceStub(channel)
        admin = auth_md(ADMIN_CALLER)

    return Stubs


def md(token: str):
    return (("authorization", f"Bearer {token}"),)


def create(s, *perms, name="shopping") -> pb.ClientWithSecret:
    return s.clients.CreateClient(pb.CreateClientRequest(client=pb.Client(name=name, permissions=list(perms))),
                                  metadata=s.admin)


def token(s, made: pb.ClientWithSecret, scope: str = "", secret: str | None = None) -> pb.Token:
    return s.tokens.CreateToken(pb.CreateTokenRequest(grant_type="client_credentials", client_id=made.client.id,
                                                      client_secret=made.secret if secret is None else secret,
                                                      scope=scope))


def refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), rich_status(e.value)[1].reason


def test_a_client_gets_a_token_in_the_contracts_shape(s):
    made = create(s, "payments.create", "payments.read")
    assert made.secret.startswith("pmt_cs_") and made.client.id.startswith("cli_")
    assert made.client.permissions == ["payments.create", "payments.read"]
    got = token(s, made)
    assert (got.token_type, got.expires_in, got.scope) == ("Bearer", 300, "payments.create payments.read")
    header = jwt.get_unverified_header(got.access_token)
    claims = jwt.decode(got.access_token, options={"verify_signature": False})
    assert header["typ"] == "at+jwt"
    assert claims["sub"] == claims["client_id"] == made.client.id
    assert claims["role"] == "client" and claims["scope"] == "payments.create payments.read"
    assert claims["exp"] - claims["iat"] == 300 and "sid" not in claims and "email" not in claims
    narrower = token(s, made, scope="payments.read")
    assert narrower.scope == "payments.read"


def test_the_secret_is_shown_once_and_stored_only_as_a_keyed_hash(s):
    made = create(s, "payments.read")
    row = storage.ServiceClient.get_by_id(made.client.id)
    stored = " ".join(str(v) for v in row.__data__.values())
    assert made.secret not in stored and made.secret[7:] not in stored
    assert len(row.secret_hash) == 64 and row.secret_prefix == made.secret[:12]
    listed = s.clients.ListClients(pb.ListClientsRequest(), metadata=s.admin)
    assert made.secret not in str(listed) and made.secret[:12] == listed.clients[0].secret_prefix
    assert listed.clients[0].created_by == ADMIN_CALLER.subject and listed.clients[0].HasField("created_at")
    got = s.clients.GetClient(pb.GetClientRequest(id=made.client.id), metadata=s.admin)
    assert made.secret not in str(got) and not got.HasField("last_used_at")
    token(s, made)
    used = s.clients.GetClient(pb.GetClientRequest(id=made.client.id), metadata=s.admin)
    assert used.HasField("last_used_at")


def test_permissions_are_enforced_per_method(s):
    reader = create(s, "payments.read")
    t = token(s, reader).access_token
    s.payments.ListPayments(pb.ListPaymentsRequest(), metadata=md(t))
    code, reason = refused(lambda: s.payments.CreatePayment(
        pb.CreatePaymentRequest(payment=pb.Payment(email="alice@example.com", amount=1)), metadata=md(t)))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")
    for call in (lambda: s.payments.ConfirmPayment(pb.ConfirmPaymentRequest(id="pay_x"), metadata=md(t)),
                 lambda: s.webhooks.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest(), metadata=md(t))):
        assert refused(call) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")
    # Person-only methods, whatever the client holds.
    everything = create(s, *permissions.PERMISSIONS)
    t_all = token(s, everything).access_token
    for call in (lambda: s.payments.DeletePayment(pb.DeletePaymentRequest(id="pay_x"), metadata=md(t_all)),
                 lambda: s.payments.UndeletePayment(pb.UndeletePaymentRequest(id="pay_x"), metadata=md(t_all)),
                 lambda: s.auth.Logout(pb.LogoutRequest(), metadata=md(t_all)),
                 lambda: s.clients.ListClients(pb.ListClientsRequest(), metadata=md(t_all)),
                 lambda: s.clients.CreateClient(pb.CreateClientRequest(client=pb.Client(
                     name="x", permissions=["payments.read"])), metadata=md(t_all))):
        assert refused(call) == (grpc.StatusCode.PERMISSION_DENIED, "PERSONS_ONLY")
    s.webhooks.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest(), metadata=md(t_all))
    # A token asked with a narrower scope carries only that.
    narrow = token(s, everything, scope="payments.read").access_token
    assert refused(lambda: s.webhooks.ListWebhookEndpoints(pb.ListWebhookEndpointsRequest(), metadata=md(narrow))) \
        == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")


def test_customers_and_admins_cannot_manage_clients_but_admins_can(s, auth_md):
    for caller in (ALICE, BOB):
        assert refused(lambda: s.clients.ListClients(pb.ListClientsRequest(), metadata=auth_md(caller))) \
            == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_ONLY")
    assert refused(lambda: s.clients.ListClients(pb.ListClientsRequest())) \
        == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")


def test_a_clients_payment_belongs_to_the_payers_account_and_its_history_names_the_client(s, auth_md):
    made = create(s, "payments.create", "payments.read", "payments.confirm", "payments.cancel")
    t = md(token(s, made).access_token)
    draft = pb.Payment(email="alice@example.com", amount=150000, request_id="order-1")
    paid = s.payments.CreatePayment(pb.CreatePaymentRequest(payment=draft), metadata=t)
    assert paid.owner_id == ALICE.subject
    # The payer sees it as their own; another customer does not.
    assert s.payments.GetPayment(pb.GetPaymentRequest(id=paid.id), metadata=auth_md(ALICE)).id == paid.id
    assert refused(lambda: s.payments.GetPayment(pb.GetPaymentRequest(id=paid.id), metadata=auth_md(BOB)))[0] \
        == grpc.StatusCode.NOT_FOUND
    confirmed = s.payments.ConfirmPayment(pb.ConfirmPaymentRequest(id=paid.id), metadata=t)
    assert confirmed.status == pb.Payment.SUCCESS
    history = s.payments.ListPaymentEvents(pb.ListPaymentEventsRequest(payment_id=paid.id), metadata=t).events
    assert [(e.actor_id, e.actor_role) for e in history] == [(made.client.id, "client")] * 2
    # Idempotency is the client's own: a replay gets the first answer, another caller's same
    # request_id is another payment.
    again = s.payments.CreatePayment(pb.CreatePaymentRequest(payment=draft), metadata=t)
    assert again.id == paid.id and again.status == pb.Payment.PENDING
    admins = s.payments.CreatePayment(pb.CreatePaymentRequest(payment=draft), metadata=s.admin)
    assert admins.id != paid.id
    other = create(s, "payments.create")
    theirs = s.payments.CreatePayment(pb.CreatePaymentRequest(payment=draft), metadata=md(token(s, other).access_token))
    assert theirs.id not in (paid.id, admins.id)
    # Within its permissions a client reaches every account's payments, a customer's own included.
    bobs = s.payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email=BOB.email, amount=5)),
                                    metadata=auth_md(BOB))
    assert s.payments.GetPayment(pb.GetPaymentRequest(id=bobs.id), metadata=t).owner_id == BOB.subject
    assert s.payments.CancelPayment(pb.CancelPaymentRequest(id=bobs.id), metadata=t).status == pb.Payment.FAILED
    listed = s.payments.ListPayments(pb.ListPaymentsRequest(email=BOB.email), metadata=t).payments
    assert [p.id for p in listed] == [bobs.id]
    # Nobody holds the email: the payer registers first.
    assert refused(lambda: s.payments.CreatePayment(pb.CreatePaymentRequest(
        payment=pb.Payment(email="stranger@example.com", amount=1)), metadata=t)) \
        == (grpc.StatusCode.FAILED_PRECONDITION, "NO_ACCOUNT")


@pytest.mark.parametrize("request_fields, code, reason", [
    ({}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
    ({"grant_type": "password"}, grpc.StatusCode.INVALID_ARGUMENT, "UNSUPPORTED_GRANT_TYPE"),
    ({"grant_type": "client_credentials"}, grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT"),
    ({"grant_type": "client_credentials", "client_id": "cli_nobody", "client_secret": "pmt_cs_x"},
     grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT"),
    ({"grant_type": "client_credentials", "client_id": "x" * 1000, "client_secret": "y" * 1000},
     grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT"),
    ({"grant_type": "client_credentials", "scope": "a  b"}, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SCOPE"),
])
def test_malformed_grant_requests_get_the_contracts_errors(s, request_fields, code, reason):
    assert refused(lambda: s.tokens.CreateToken(pb.CreateTokenRequest(**request_fields))) == (code, reason)


def test_wrong_secret_and_a_scope_not_held(s):
    made = create(s, "payments.read")
    assert refused(lambda: token(s, made, secret=made.secret[:-1] + ("b" if made.secret[-1] == "a" else "a"))) \
        == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT")
    assert refused(lambda: token(s, made, scope="payments.read payments.confirm")) \
        == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SCOPE")
    assert refused(lambda: token(s, made, scope="payments.everything")) \
        == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SCOPE")


def test_wrong_secrets_are_throttled_like_logins(s):
    made = create(s, "payments.read")
    answers = []
    for _ in range(7):
        answers.append(refused(lambda: token(s, made, secret="pmt_cs_wrong"))[1])
    assert answers[:5] == ["INVALID_CLIENT"] * 5 and "TOO_MANY_ATTEMPTS" in answers[5:]


def refused_within_the_bound(s, t: str, settings) -> str:
    deadline = time.monotonic() + settings.revocation_check_seconds + 2
    while True:
        try:
            s.payments.ListPayments(pb.ListPaymentsRequest(), metadata=md(t))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED
            return rich_status(e)[1].reason
        assert time.monotonic() < deadline, "still accepted past the revocation bound"
        time.sleep(0.05)


def test_rotation_keeps_the_old_secret_for_its_grace_and_revocation_ends_everything(s, settings):
    made = create(s, "payments.read")
    rotated = s.clients.RotateClientSecret(pb.RotateClientSecretRequest(id=made.client.id), metadata=s.admin)
    assert rotated.secret != made.secret and rotated.client.HasField("previous_secret_expires_at")
    old, new = token(s, made), token(s, made, secret=rotated.secret)
    # Without a grace the previous secret stops at once.
    third = s.clients.RotateClientSecret(pb.RotateClientSecretRequest(id=made.client.id,
                                                                      previous_secret_ttl_seconds=0),
                                         metadata=s.admin)
    assert refused(lambda: token(s, made, secret=rotated.secret)) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT")
    token(s, made, secret=third.secret)
    s.payments.ListPayments(pb.ListPaymentsRequest(), metadata=md(old.access_token))
    revoked = s.clients.RevokeClient(pb.RevokeClientRequest(id=made.client.id), metadata=s.admin)
    assert revoked.HasField("revoked_at")
    assert s.clients.RevokeClient(pb.RevokeClientRequest(id=made.client.id), metadata=s.admin).revoked_at \
        == revoked.revoked_at  # a retry answers as the first did
    for t in (old.access_token, new.access_token):
        assert refused_within_the_bound(s, t, settings) == "TOKEN_REVOKED"
    assert refused(lambda: token(s, made, secret=third.secret)) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT")
    assert refused(lambda: s.clients.RotateClientSecret(pb.RotateClientSecretRequest(id=made.client.id),
                                                        metadata=s.admin)) \
        == (grpc.StatusCode.FAILED_PRECONDITION, "CLIENT_REVOKED")


def test_a_revoked_clients_old_secret_does_not_work_during_its_grace(s):
    made = create(s, "payments.read")
    s.clients.RotateClientSecret(pb.RotateClientSecretRequest(id=made.client.id), metadata=s.admin)
    token(s, made)  # in its grace
    s.clients.RevokeClient(pb.RevokeClientRequest(id=made.client.id), metadata=s.admin)
    assert refused(lambda: token(s, made)) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT")


def test_an_expired_client_gets_no_token_and_its_tokens_stop_within_the_bound(s, settings):
    made = create(s, "payments.read")
    t = token(s, made).access_token
    soon = timestamp_pb2.Timestamp()
    soon.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1))
    s.clients.SetClientExpiry(pb.SetClientExpiryRequest(id=made.client.id, expire_time=soon), metadata=s.admin)
    time.sleep(1.1)
    assert refused(lambda: token(s, made)) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT")
    assert refused_within_the_bound(s, t, settings) == "TOKEN_REVOKED"
    past = timestamp_pb2.Timestamp(seconds=1)
    assert refused(lambda: s.clients.SetClientExpiry(pb.SetClientExpiryRequest(id=made.client.id, expire_time=past),
                                                     metadata=s.admin))[0] == grpc.StatusCode.INVALID_ARGUMENT
    s.clients.SetClientExpiry(pb.SetClientExpiryRequest(id=made.client.id), metadata=s.admin)  # cleared
    time.sleep(settings.revocation_check_seconds)  # what the server remembers of it is that old at most
    s.payments.ListPayments(pb.ListPaymentsRequest(), metadata=md(token(s, made).access_token))


def test_bad_management_input_gets_clear_errors(s):
    for client, field in ((pb.Client(name="", permissions=["payments.read"]), "client.name"),
                          (pb.Client(name="x" * 101, permissions=["payments.read"]), "client.name"),
                          (pb.Client(name="ok", permissions=[]), "client.permissions"),
                          (pb.Client(name="ok", permissions=["payments.all"]), "client.permissions")):
        with pytest.raises(grpc.RpcError) as e:
            s.clients.CreateClient(pb.CreateClientRequest(client=client), metadata=s.admin)
        code, info, bad = rich_status(e.value)
        assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CLIENT_REQUEST")
        assert [v.field for v in bad.field_violations] == [field]
    for junk in ("", "cli_nobody", "x" * 500, "cli_" + "a" * 26):
        assert refused(lambda: s.clients.GetClient(pb.GetClientRequest(id=junk), metadata=s.admin)) \
            == (grpc.StatusCode.NOT_FOUND, "CLIENT_NOT_FOUND")
    made = create(s, "payments.read")
    for ttl in (-1, 7 * 86400 + 1):
        assert refused(lambda: s.clients.RotateClientSecret(pb.RotateClientSecretRequest(
            id=made.client.id, previous_secret_ttl_seconds=ttl), metadata=s.admin)) \
            == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CLIENT_REQUEST")
    week = s.clients.RotateClientSecret(pb.RotateClientSecretRequest(id=made.client.id,
                                                                     previous_secret_ttl_seconds=7 * 86400),
                                        metadata=s.admin).client
    day = s.clients.RotateClientSecret(pb.RotateClientSecretRequest(id=made.client.id), metadata=s.admin).client
    assert week.previous_secret_expires_at.seconds - week.created_at.seconds >= 7 * 86400 - 5
    assert abs(day.previous_secret_expires_at.ToDatetime() - dt.datetime.utcnow() - dt.timedelta(days=1)) \
        < dt.timedelta(minutes=1)  # a day by default


def test_listing_pages_newest_first(s):
    ids = [create(s, "payments.read", name=f"c{i}").client.id for i in range(5)]
    seen, page_token = [], ""
    while True:
        page = s.clients.ListClients(pb.ListClientsRequest(page_size=2, page_token=page_token), metadata=s.admin)
        seen += [c.id for c in page.clients]
        if not (page_token := page.next_page_token):
            break
    assert seen == list(reversed(ids))  # newest first


def test_every_method_of_the_api_enforces_the_permission_table(s, channel):
    """Through the server's own port, every method, called by a client holding every permission
    but the one it needs: refused with the table's reason before any handler runs."""
    all_but = {p: md(token(s, create(s, *(q for q in permissions.PERMISSIONS if q != p))).access_token)
               for p in permissions.PERMISSIONS}
    checked = 0
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            name = f"/{service.full_name}/{method.name}"
            need = permissions.required(name)
            if need == permissions.PUBLIC:
                continue
            call = channel.unary_unary(name, request_serializer=lambda m: m, response_deserializer=lambda b: b)
            # Each permission it needs, withheld in turn (a person-only method: any client).
            for missing in permissions.permissions_needed(name) or (None,):
                with pytest.raises(grpc.RpcError) as e:
                    call(b"", metadata=all_but[missing or permissions.PAYMENTS_READ], timeout=10)
                code, info, _ = rich_status(e.value)
                assert code == grpc.StatusCode.PERMISSION_DENIED, name
                if need == permissions.PERSONS_ONLY:
                    assert info.reason == "PERSONS_ONLY", name
                else:
                    assert (info.reason, info.metadata["permission"]) == ("PERMISSION_MISSING", missing), name
            checked += 1
    assert checked == len([m for m in permissions.METHODS.values() if m != permissions.PUBLIC])


def test_a_client_never_lists_deleted_payments(s):
    t = md(token(s, create(s, "payments.read")).access_token)
    assert refused(lambda: s.payments.ListPayments(pb.ListPaymentsRequest(show_deleted=True), metadata=t)) \
        == (grpc.StatusCode.PERMISSION_DENIED, "SHOW_DELETED_FORBIDDEN")


def test_rotations_at_once_chain_as_one_serial_order(s):
    """Eight rotations at once: each answer's secret is one of a chain, so afterwards exactly two of
    them work (the last applied, and the one before it in its grace), the original none, and the
    listing shows the prefix of the one that is current."""
    import concurrent.futures

    made = create(s, "payments.read")
    rotate = lambda _: s.clients.RotateClientSecret(pb.RotateClientSecretRequest(id=made.client.id),  # noqa: E731
                                                    metadata=s.admin).secret
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        secrets = list(pool.map(rotate, range(8)))
    assert len(set(secrets)) == 8

    # Read from the row (the secrets' hashes), not by asking for tokens: six failed attempts in a
    # row from one address would be throttled.
    from server.domain.clients import secret_hash

    row = storage.ServiceClient.get_by_id(made.client.id)
    stored = {row.secret_hash: "current", row.previous_secret_hash: "previous"}
    working = {stored[secret_hash(made.client.id, x)]: x for x in secrets if secret_hash(made.client.id, x) in stored}
    assert set(working) == {"current", "previous"} and secret_hash(made.client.id, made.secret) not in stored
    current = s.clients.GetClient(pb.GetClientRequest(id=made.client.id), metadata=s.admin).secret_prefix
    assert working["current"].startswith(current)
    token(s, made, secret=working["current"])
    token(s, made, secret=working["previous"])


def test_a_revocation_racing_rotations_leaves_no_secret_working(s):
    import concurrent.futures

    made = create(s, "payments.read")

    def rotate(_):
        try:
            return s.clients.RotateClientSecret(pb.RotateClientSecretRequest(id=made.client.id),
                                                metadata=s.admin).secret
        except grpc.RpcError as e:
            assert rich_status(e)[1].reason == "CLIENT_REVOKED"
            return None

    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        rotations = [pool.submit(rotate, i) for i in range(4)]
        s.clients.RevokeClient(pb.RevokeClientRequest(id=made.client.id), metadata=s.admin)
        secrets = [f.result() for f in rotations]
    for secret in [made.secret] + [x for x in secrets if x]:
        assert refused(lambda: token(s, made, secret=secret)) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT")


def test_a_client_holding_payments_refund_refunds_and_the_history_names_it(s):
    """Refunds are the `payments.refund` permission's: a client holding it refunds a settled
    payment, reads the refund with `payments.read`, and the history records the client."""
    settle = md(token(s, create(s, "payments.create", "payments.confirm")).access_token)
    paid = s.payments.CreatePayment(pb.CreatePaymentRequest(payment=pb.Payment(email="alice@example.com", amount=900)),
                                    metadata=settle)
    s.payments.ConfirmPayment(pb.ConfirmPaymentRequest(id=paid.id), metadata=settle)
    refunder = create(s, "payments.refund", "payments.read")
    t = md(token(s, refunder).access_token)
    refund = s.payments.CreateRefund(pb.CreateRefundRequest(
        payment_id=paid.id, refund=pb.Refund(amount=300, reason=pb.Refund.REQUESTED_BY_CUSTOMER)), metadata=t)
    assert (refund.amount, refund.currency) == (300, "IDR")
    assert s.payments.GetRefund(pb.GetRefundRequest(payment_id=paid.id, id=refund.id), metadata=t).id == refund.id
    listed = s.payments.ListRefunds(pb.ListRefundsRequest(payment_id=paid.id), metadata=t).refunds
    assert [r.id for r in listed] == [refund.id]
    assert s.payments.GetPayment(pb.GetPaymentRequest(id=paid.id), metadata=t).refunded_amount == 300
    last = s.payments.ListPaymentEvents(pb.ListPaymentEventsRequest(payment_id=paid.id), metadata=t).events[-1]
    assert (last.action, last.actor_id, last.actor_role) == (pb.PaymentEvent.REFUNDED, refunder.client.id, "client")
    # Without the permission: refused by the table, whatever else the client holds.
    assert refused(lambda: s.payments.CreateRefund(pb.CreateRefundRequest(
        payment_id=paid.id, refund=pb.Refund(amount=1, reason=pb.Refund.OTHER)), metadata=settle)) \
        == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")


# Out of google.protobuf.Timestamp's range (0001-01-01 .. 9999-12-31, nanos 0..999,999,999): a gRPC
# caller can send them; ToDatetime cannot read them.
OUT_OF_RANGE_TIMES = (timestamp_pb2.Timestamp(seconds=253402300800), timestamp_pb2.Timestamp(seconds=2**62),
                      timestamp_pb2.Timestamp(seconds=-2**62), timestamp_pb2.Timestamp(seconds=-62135596801),
                      timestamp_pb2.Timestamp(seconds=2000000000, nanos=-5),
                      timestamp_pb2.Timestamp(seconds=2000000000, nanos=1_000_000_000))


def test_a_time_outside_timestamps_range_is_invalid_argument_naming_the_field(s):
    """Every Timestamp a request carries (tests/unit/test_request_times.py finds them in the proto)."""
    made = create(s, "payments.read")
    for when in OUT_OF_RANGE_TIMES:
        with pytest.raises(grpc.RpcError) as e:
            s.clients.CreateClient(pb.CreateClientRequest(client=pb.Client(name="x", permissions=["payments.read"],
                                                                           expire_time=when)), metadata=s.admin)
        code, info, bad = rich_status(e.value)
        assert (code, info.reason, [v.field for v in bad.field_violations]) \
            == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CLIENT_REQUEST", ["client.expire_time"]), when
        with pytest.raises(grpc.RpcError) as e:
            s.clients.SetClientExpiry(pb.SetClientExpiryRequest(id=made.client.id, expire_time=when), metadata=s.admin)
        code, info, bad = rich_status(e.value)
        assert (code, info.reason, [v.field for v in bad.field_violations]) \
            == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CLIENT_REQUEST", ["expire_time"]), when
    # The edges of the range are times like any other.
    last = timestamp_pb2.Timestamp(seconds=253402300799, nanos=999_999_999)
    assert s.clients.SetClientExpiry(pb.SetClientExpiryRequest(id=made.client.id, expire_time=last),
                                     metadata=s.admin).expire_time.seconds == 253402300799
    first = timestamp_pb2.Timestamp(seconds=-62135596800)
    assert refused(lambda: s.clients.SetClientExpiry(pb.SetClientExpiryRequest(id=made.client.id, expire_time=first),
                                                     metadata=s.admin)) \
        == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CLIENT_REQUEST")  # in range, but not in the future


def _invalid_requests(made_id: str, endpoint_id: str, event_id: str) -> dict:
    """For each admin-only method, requests a validation would refuse (or that name nothing)."""
    bad_time = timestamp_pb2.Timestamp(seconds=2**62)
    past = timestamp_pb2.Timestamp(seconds=1)
    return {
        "/payments.v1.ClientService/CreateClient": [
            pb.CreateClientRequest(), pb.CreateClientRequest(client=pb.Client(name="", permissions=["nope"])),
            pb.CreateClientRequest(client=pb.Client(name="x", permissions=["payments.read"], expire_time=bad_time))],
        "/payments.v1.ClientService/ListClients": [pb.ListClientsRequest(page_size=-1),
                                                   pb.ListClientsRequest(page_token="junk")],
        "/payments.v1.ClientService/GetClient": [pb.GetClientRequest(id=""), pb.GetClientRequest(id="x" * 500)],
        "/payments.v1.ClientService/RotateClientSecret": [
            pb.RotateClientSecretRequest(id=made_id, previous_secret_ttl_seconds=-1),
            pb.RotateClientSecretRequest(id="cli_" + "a" * 26, previous_secret_ttl_seconds=10**9)],
        "/payments.v1.ClientService/SetClientExpiry": [
            pb.SetClientExpiryRequest(id=made_id, expire_time=past),
            pb.SetClientExpiryRequest(id=made_id, expire_time=bad_time)],
        "/payments.v1.ClientService/RevokeClient": [pb.RevokeClientRequest(id=""), pb.RevokeClientRequest(id="junk")],
        "/payments.v1.WebhookService/CreateWebhookEndpoint": [
            pb.CreateWebhookEndpointRequest(),
            pb.CreateWebhookEndpointRequest(endpoint=pb.WebhookEndpoint(url="ftp://x", event_types=["nope"]))],
        "/payments.v1.WebhookService/ListWebhookEndpoints": [pb.ListWebhookEndpointsRequest(page_size=-1)],
        "/payments.v1.WebhookService/GetWebhookEndpoint": [pb.GetWebhookEndpointRequest(id="")],
        "/payments.v1.WebhookService/UpdateWebhookEndpoint": [
            pb.UpdateWebhookEndpointRequest(id=endpoint_id, url="ftp://x"),
            pb.UpdateWebhookEndpointRequest(id="")],
        "/payments.v1.WebhookService/DeleteWebhookEndpoint": [pb.DeleteWebhookEndpointRequest(id="")],
        "/payments.v1.WebhookService/RotateWebhookSecret": [
            pb.RotateWebhookSecretRequest(id=endpoint_id, previous_secret_ttl_seconds=-1),
            pb.RotateWebhookSecretRequest(id="", previous_secret_ttl_seconds=10**9)],
        "/payments.v1.WebhookService/ListWebhookEvents": [pb.ListWebhookEventsRequest(payment_id="junk", type="nope"),
                                                          pb.ListWebhookEventsRequest(page_size=-1)],
        "/payments.v1.WebhookService/GetWebhookEvent": [pb.GetWebhookEventRequest(id="")],
        "/payments.v1.WebhookService/RedeliverWebhookEvent": [
            pb.RedeliverWebhookEventRequest(id=event_id, endpoint_id=""),
            pb.RedeliverWebhookEventRequest(id="")],
    }


def test_a_customer_gets_admin_only_before_any_input_is_validated(s, channel, auth_md):
    """Every method of ClientService and WebhookService, with input each would refuse: a customer
    is answered ADMIN_ONLY, never a validation error that says what a valid request looks like."""
    made = create(s, "payments.read")
    endpoint = s.webhooks.CreateWebhookEndpoint(pb.CreateWebhookEndpointRequest(endpoint=pb.WebhookEndpoint(
        url="https://shop.example.com/hook", event_types=["*"], enabled=False)), metadata=s.admin).endpoint
    requests = _invalid_requests(made.client.id, endpoint.id, "evt_" + "a" * 26)
    methods = {f"/{svc}/{m.name}" for svc in ("payments.v1.ClientService", "payments.v1.WebhookService")
               for m in pb.DESCRIPTOR.services_by_name[svc.rsplit(".", 1)[1]].methods}
    assert set(requests) == methods  # a method added to either service needs a line above
    for name, bodies in requests.items():
        call = channel.unary_unary(name, request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=lambda b: b)
        for body in bodies:
            # The admin's answer to the same request is a refusal (a validation error or not found).
            with pytest.raises(grpc.RpcError) as e:
                call(body, metadata=s.admin, timeout=10)
            assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (name, body)
            for customer in (ALICE, BOB):
                with pytest.raises(grpc.RpcError) as e:
                    call(body, metadata=auth_md(customer), timeout=10)
                code, info, _ = rich_status(e.value)
                assert (code, info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_ONLY"), (name, body)


def test_a_rotation_without_a_grace_ends_the_tokens_issued_before_it(s, settings):
    """After a leak an admin rotates with previous_secret_ttl_seconds 0: the old secret stops at
    once, and the access tokens issued before the rotation (whole seconds: iat) are refused within
    the revocation bound, as a revoked client's are; tokens issued after it keep working. With a
    grace, tokens already issued live out their lifetime."""
    made = create(s, "payments.read")
    graced = token(s, made).access_token
    time.sleep(1.05)  # into the next second: a token's iat has whole seconds
    with_grace = s.clients.RotateClientSecret(pb.RotateClientSecretRequest(
        id=made.client.id, previous_secret_ttl_seconds=60), metadata=s.admin)
    time.sleep(settings.revocation_check_seconds + 0.2)
    s.payments.ListPayments(pb.ListPaymentsRequest(), metadata=md(graced))  # a grace ends no token
    leaked = token(s, made, secret=with_grace.secret).access_token
    time.sleep(1.05)
    rotated = s.clients.RotateClientSecret(pb.RotateClientSecretRequest(
        id=made.client.id, previous_secret_ttl_seconds=0), metadata=s.admin)
    fresh = token(s, made, secret=rotated.secret).access_token  # at once, in the rotation's own second
    for old in (leaked, graced):
        assert refused_within_the_bound(s, old, settings) == "TOKEN_REVOKED"
    assert refused(lambda: token(s, made, secret=with_grace.secret)) == (grpc.StatusCode.UNAUTHENTICATED,
                                                                         "INVALID_CLIENT")
    time.sleep(settings.revocation_check_seconds + 0.2)
    s.payments.ListPayments(pb.ListPaymentsRequest(), metadata=md(fresh))
    later = token(s, made, secret=rotated.secret).access_token
    s.payments.ListPayments(pb.ListPaymentsRequest(), metadata=md(later))
