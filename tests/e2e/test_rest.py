"""Every REST route through the real Envoy, with the status codes and JSON bodies a user sees."""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest

from tests.e2e.conftest import PASSWORD, new_email
from tests.support.rest import loopback_address

GRPC_INVALID_ARGUMENT, GRPC_NOT_FOUND, GRPC_ALREADY_EXISTS = 3, 5, 6
GRPC_PERMISSION_DENIED, GRPC_FAILED_PRECONDITION, GRPC_UNAUTHENTICATED = 7, 9, 16


def no_grpc_headers(r):
    leaked = {k for k in r.headers if k.startswith("grpc-")}
    assert not leaked, f"gRPC headers leaked to a REST client: {leaked}"


def create(api, user, **fields):
    body = {"email": user.email, "amount": "1500", **fields}
    r = api.post("/v1/payments", body, token=user.token)
    assert r.status == 200, r.text
    return r.json


# --- the whole journey ------------------------------------------------------------------------

def test_register_login_create_list_get_confirm_cancel_delete(api, admin):
    # curl, a real external client, for the public half of the journey.
    email = new_email("journey")
    out = subprocess.run(
        ["curl", "-sS", "-i", "-X", "POST", f"{api_url(api)}/v1/auth/register",
         "-H", "Content-Type: application/json",
         "--data", json.dumps({"email": email, "password": PASSWORD})],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")
    assert head.startswith("HTTP/1.1 200"), out
    assert "grpc-status" not in head.lower()
    registered = json.loads(body)
    assert registered["email"] == email and registered["role"] == "customer"
    assert registered["user_id"].startswith("usr_")

    login = json.loads(subprocess.run(
        ["curl", "-sS", "--fail-with-body", "-X", "POST", f"{api_url(api)}/v1/auth/login",
         "--data", json.dumps({"email": email, "password": PASSWORD})],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout)
    assert login["token_type"] == "Bearer" and int(login["expires_in"]) > 0
    token = login["access_token"]

    ids = []
    for i in range(3):
        r = api.post("/v1/payments", {"email": email, "amount": 1000 + i, "currency": "USD",
                                      "description": f"order {i}"}, token=token)
        assert r.status == 200, r.text
        no_grpc_headers(r)
        p = r.json
        assert p["status"] == "PENDING" and p["amount"] == str(1000 + i) and p["currency"] == "USD"
        assert p["id"].startswith("pay_") and p["created_at"].endswith("Z")
        assert "failure_reason" not in p  # proto3 JSON leaves default values out
        ids.append(p["id"])

    first = api.get("/v1/payments?page_size=2", token=token)
    assert first.status == 200, first.text
    assert [p["id"] for p in first.json["payments"]] == ids[::-1][:2]  # newest first
    assert first.json["next_page_token"]
    second = api.get(f"/v1/payments?page_size=2&page_token={first.json['next_page_token']}", token=token)
    assert second.status == 200, second.text
    assert [p["id"] for p in second.json["payments"]] == [ids[0]]
    assert "next_page_token" not in second.json  # last page

    got = api.get(f"/v1/payments/{ids[0]}", token=token)
    assert got.status == 200 and got.json["id"] == ids[0] and got.json["description"] == "order 0"

    confirmed = api.post(f"/v1/payments/{ids[0]}:confirm", {}, token=admin.token)
    assert confirmed.status == 200, confirmed.text
    assert confirmed.json["status"] == "SUCCESS"

    cancelled = api.post(f"/v1/payments/{ids[1]}:cancel", {}, token=token)
    assert cancelled.status == 200, cancelled.text
    assert cancelled.json["status"] == "FAILED" and cancelled.json["failure_reason"] == "CANCELLED"

    deleted = api.delete(f"/v1/payments/{ids[2]}", token=token)
    assert deleted.status == 200 and deleted.json == {}
    no_grpc_headers(deleted)
    gone = api.get(f"/v1/payments/{ids[2]}", token=token)
    assert gone.status == 404
    assert gone.error()[:2] == (GRPC_NOT_FOUND, "PAYMENT_NOT_FOUND")
    assert [p["id"] for p in api.get("/v1/payments", token=token).json["payments"]] == [ids[1], ids[0]]


def api_url(api) -> str:
    return f"http://{api.host}:{api.port}"


# --- auth routes ------------------------------------------------------------------------------

def test_register_rejects_bad_fields_with_violations(api):
    r = api.post("/v1/auth/register", {"email": "not-an-email", "password": "short"})
    assert r.status == 400
    assert r.error()[:2] == (GRPC_INVALID_ARGUMENT, "INVALID_REGISTRATION")
    assert set(r.violations()) == {"email", "password"}


def test_register_twice_is_409(api, make_user):
    user = make_user()
    r = api.post("/v1/auth/register", {"email": user.email, "password": PASSWORD})
    assert r.status == 409
    assert r.error()[:2] == (GRPC_ALREADY_EXISTS, "EMAIL_TAKEN")


def test_login_with_a_wrong_password_or_unknown_email_is_the_same_401(api, make_user):
    user = make_user()
    client = api.from_address(loopback_address())  # a client of its own to the per-address login limit
    wrong = client.post("/v1/auth/login", {"email": user.email, "password": "wrong password!"})
    unknown = client.post("/v1/auth/login", {"email": new_email("nobody"), "password": PASSWORD})
    assert wrong.status == unknown.status == 401
    assert wrong.error()[:2] == unknown.error()[:2] == (GRPC_UNAUTHENTICATED, "BAD_CREDENTIALS")
    assert wrong.json["message"] == unknown.json["message"]


# --- payments ---------------------------------------------------------------------------------

def test_create_with_invalid_fields_names_each_field(api, make_user):
    user = make_user()
    r = api.post("/v1/payments", {"email": "nope", "amount": -5, "currency": "usd"}, token=user.token)
    assert r.status == 400
    assert r.error()[:2] == (GRPC_INVALID_ARGUMENT, "INVALID_PAYMENT")
    assert set(r.violations()) == {"payment.email", "payment.amount", "payment.currency"}


def test_unknown_body_fields_are_ignored_but_a_misspelt_required_field_is_not(api, make_user):
    user = make_user()
    ok = api.post("/v1/payments", {"email": user.email, "amount": 10, "note": "ignored"}, token=user.token)
    assert ok.status == 200, ok.text
    assert "note" not in ok.json
    typo = api.post("/v1/payments", {"email": user.email, "ammount": 10}, token=user.token)
    assert typo.status == 400
    assert "payment.amount" in typo.violations()


def test_customer_cannot_create_for_another_email(api, make_user):
    user = make_user()
    r = api.post("/v1/payments", {"email": new_email("other"), "amount": 10}, token=user.token)
    assert r.status == 403
    assert r.error()[:2] == (GRPC_PERMISSION_DENIED, "EMAIL_NOT_CALLERS")


def test_request_id_replays_and_conflicts(api, make_user):
    user = make_user()
    rid = f"order-{uuid.uuid4().hex[:8]}"
    first = create(api, user, request_id=rid)
    again = create(api, user, request_id=rid)
    assert again["id"] == first["id"]
    conflict = api.post("/v1/payments", {"email": user.email, "amount": "999", "request_id": rid}, token=user.token)
    assert conflict.status == 409
    code, reason, body = conflict.error()
    assert (code, reason) == (GRPC_ALREADY_EXISTS, "REQUEST_ID_CONFLICT")


def test_illegal_transitions_are_failed_precondition_400(api, make_user, admin):
    user = make_user()
    p = create(api, user)
    first = api.post(f"/v1/payments/{p['id']}:cancel", {}, token=user.token)
    assert first.status == 200
    # The same cancel again, as after a lost answer: the caller's own change, answered as before.
    again = api.post(f"/v1/payments/{p['id']}:cancel", {}, token=user.token)
    assert (again.status, again.json) == (200, first.json)
    for action, token in ((":cancel", admin.token), (":confirm", admin.token)):
        r = api.post(f"/v1/payments/{p['id']}{action}", {}, token=token)
        assert r.status == 400, r.text
        code, reason, body = r.error()
        assert (code, reason) == (GRPC_FAILED_PRECONDITION, "PAYMENT_NOT_PENDING")
        assert "failed" in body["message"]


def test_only_admins_confirm(api, make_user):
    user = make_user()
    p = create(api, user)
    r = api.post(f"/v1/payments/{p['id']}:confirm", {}, token=user.token)
    assert r.status == 403
    assert r.error()[:2] == (GRPC_PERMISSION_DENIED, "ADMIN_ONLY")


def test_list_validation_and_filters(api, make_user, admin):
    user = make_user()
    p = create(api, user)
    bad = api.get("/v1/payments?page_size=1000", token=user.token)
    assert bad.status == 400
    assert "page_size" in bad.violations()
    pending = api.get("/v1/payments?status=PENDING", token=user.token)
    assert [x["id"] for x in pending.json["payments"]] == [p["id"]]
    # An empty page is {}: proto3 JSON leaves out empty lists and empty strings.
    assert api.get("/v1/payments?status=SUCCESS", token=user.token).json == {}
    other = api.get(f"/v1/payments?email={new_email('x')}", token=user.token)
    assert other.status == 403
    assert other.error()[:2] == (GRPC_PERMISSION_DENIED, "EMAIL_FILTER_FORBIDDEN")
    by_admin = api.get(f"/v1/payments?email={user.email}", token=admin.token)
    assert [x["id"] for x in by_admin.json["payments"]] == [p["id"]]


def test_unknown_query_parameter_is_400_json(api, make_user):
    user = make_user()
    r = api.get("/v1/payments?colour=blue", token=user.token)
    assert r.status == 400
    code, reason, body = r.error()
    assert (code, reason) == (GRPC_INVALID_ARGUMENT, "INVALID_REQUEST")
    assert "colour" in body["message"]


# --- other customers' payments ----------------------------------------------------------------

def test_probing_another_customers_payment_is_404_everywhere(api, make_user):
    alice, bob = make_user("alice"), make_user("bob")
    p = create(api, alice)
    missing = api.get("/v1/payments/pay_" + "a" * 26, token=bob.token)
    probes = [
        api.get(f"/v1/payments/{p['id']}", token=bob.token),
        api.delete(f"/v1/payments/{p['id']}", token=bob.token),
        api.post(f"/v1/payments/{p['id']}:cancel", {}, token=bob.token),
    ]
    for r in probes + [missing]:
        assert r.status == 404, r.text
        assert r.error()[:2] == (GRPC_NOT_FOUND, "PAYMENT_NOT_FOUND")
    assert api.get(f"/v1/payments/{p['id']}", token=alice.token).json["status"] == "PENDING"


def test_query_parameter_overriding_the_path_id_cannot_read_someone_elses_payment(api, make_user):
    alice, bob = make_user("alice"), make_user("bob")
    alices = create(api, alice)
    bobs = create(api, bob)
    r = api.get(f"/v1/payments/{bobs['id']}?id={alices['id']}", token=bob.token)
    # The transcoder would let ?id= win over the path: the gateway refuses it (tests/e2e/test_rest_bindings.py).
    assert r.status == 400, r.text
    assert r.error()[1] == "INVALID_REQUEST" and r.json["message"].startswith("id: a query parameter may not set it")
    assert alice.email not in r.text


# --- errors Envoy makes itself ----------------------------------------------------------------

def test_malformed_json_body_is_400_json(api, make_user):
    user = make_user()
    r = api.request("POST", "/v1/payments", raw=b'{"email": ', token=user.token,
                    headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert r.error()[:2] == (GRPC_INVALID_ARGUMENT, "INVALID_REQUEST")


@pytest.mark.parametrize("path", ["/v1/payments", "/v1/auth/login"])
def test_header_names_grpc_cannot_carry_are_400_json(api, make_user, path):
    user = make_user()
    r = api.request("POST", path, {"email": user.email, "amount": 1}, token=user.token,
                    headers={"#": "x", "X-Fine_Header": "y"})
    assert r.status == 400, r.text
    assert r.error()[:2] == (GRPC_INVALID_ARGUMENT, "INVALID_REQUEST")


def test_body_over_the_limit_is_413_json(api, make_user, tmp_path):
    # curl, because Envoy answers 413 and closes while the client may still be sending: curl
    # reads that early answer, where a client that writes the whole body first can get a reset.
    user = make_user()
    body = tmp_path / "big.json"
    body.write_text(json.dumps({"email": user.email, "amount": 1, "description": "x" * 70_000}))
    out = subprocess.run(
        ["curl", "-sS", "-o", str(tmp_path / "answer.json"), "-w", "%{http_code} %{content_type}",
         "-X", "POST", f"{api_url(api)}/v1/payments", "-H", "Content-Type: application/json",
         "-H", f"Authorization: Bearer {user.token}", "--data-binary", f"@{body}"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert out == "413 application/json", out
    answer = json.loads((tmp_path / "answer.json").read_text())
    assert answer["code"] == GRPC_INVALID_ARGUMENT and "too large" in answer["message"]
    assert answer["details"][0]["reason"] == "BODY_TOO_LARGE"


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/nothing-here"),
    ("GET", "/"),
    ("GET", "/v1/auth/nothing-here"),  # known paths with a method they do not have: 405, below
])
def test_unknown_routes_are_404_json_with_a_token(api, make_user, method, path):
    user = make_user()
    r = api.request(method, path, token=user.token)
    assert r.status == 404
    assert r.error()[:2] == (GRPC_NOT_FOUND, "ROUTE_NOT_FOUND")


def test_unknown_routes_without_a_token_are_401_fail_closed(api):
    r = api.get("/v1/nothing-here")
    assert r.status == 401
    assert r.error()[:2] == (GRPC_UNAUTHENTICATED, "MISSING_TOKEN")


def test_success_responses_carry_no_grpc_headers(api, make_user):
    user = make_user()
    p = create(api, user)
    for r in (api.get(f"/v1/payments/{p['id']}", token=user.token),
              api.get("/v1/payments", token=user.token),
              api.post("/v1/auth/login", {"email": user.email, "password": PASSWORD})):
        assert r.status == 200
        assert r.headers["content-type"] == "application/json"
        no_grpc_headers(r)


def test_readiness_route(api):
    r = api.get("/ready")
    assert r.status == 200


def test_settled_payments_stay_and_admins_undelete_over_rest(api, make_user, admin):
    user = make_user("undelete")
    paid = api.post("/v1/payments", {"email": user.email, "amount": "500"}, token=user.token).json
    assert paid["owner_id"] == user.user_id
    assert api.post(f"/v1/payments/{paid['id']}:confirm", {}, token=admin.token).status == 200
    refused = api.delete(f"/v1/payments/{paid['id']}", token=user.token)
    assert refused.status == 400 and refused.error()[:2] == (GRPC_FAILED_PRECONDITION, "PAYMENT_SETTLED")

    gone = api.post("/v1/payments", {"email": user.email, "amount": "600"}, token=user.token).json
    assert api.delete(f"/v1/payments/{gone['id']}", token=user.token).status == 200
    listed = api.get(f"/v1/payments?show_deleted=true&email={user.email}", token=admin.token)
    assert listed.status == 200, listed.text
    [deleted] = [p for p in listed.json["payments"] if p["id"] == gone["id"]]
    assert deleted["deleted_at"]
    assert api.get("/v1/payments?show_deleted=true", token=user.token).error()[:2] == (
        GRPC_PERMISSION_DENIED, "SHOW_DELETED_FORBIDDEN")
    assert api.post(f"/v1/payments/{gone['id']}:undelete", {}, token=user.token).status == 403
    back = api.post(f"/v1/payments/{gone['id']}:undelete", {}, token=admin.token)
    assert back.status == 200 and "deleted_at" not in back.json, back.text
    assert api.get(f"/v1/payments/{gone['id']}", token=user.token).status == 200


def test_an_admins_payment_for_an_unregistered_email_is_400_no_account(api, admin):
    r = api.post("/v1/payments", {"email": "not-registered-yet@example.com", "amount": "5"}, token=admin.token)
    assert r.status == 400 and r.error()[:2] == (GRPC_FAILED_PRECONDITION, "NO_ACCOUNT")


def test_a_payments_history_over_rest(api, make_user, admin):
    user = make_user("history")
    paid = api.post("/v1/payments", {"email": user.email, "amount": "900"}, token=user.token).json
    assert api.post(f"/v1/payments/{paid['id']}:confirm", {}, token=admin.token).status == 200
    events = api.get(f"/v1/payments/{paid['id']}/events", token=user.token)
    assert events.status == 200, events.text
    assert [(e["action"], e["actor_role"], e["to_status"]) for e in events.json["events"]] == [
        ("CREATED", "customer", "PENDING"), ("CONFIRMED", "admin", "SUCCESS")]
    assert events.json["events"][1]["from_status"] == "PENDING"
    other = make_user("history-other")
    assert api.get(f"/v1/payments/{paid['id']}/events", token=other.token).status == 404


# --- what a newcomer gets wrong first ----------------------------------------------------------

@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/v1/payments", "GET, POST"),
    ("PATCH", "/v1/payments/pay_abc", "GET, DELETE"),
    ("POST", "/v1/payments/pay_abc/events", "GET"),
    ("DELETE", "/v1/payments/pay_abc/refunds", "GET, POST"),
    ("POST", "/v1/payments/pay_abc/refunds/ref_abc", "GET"),
    ("GET", "/v1/payments/pay_abc:confirm", "POST"),
    ("GET", "/v1/auth/login", "POST"),
])
def test_a_method_a_path_does_not_take_is_405_with_allow(api, make_user, method, path, allow):
    r = api.request(method, path, token=make_user().token)
    assert r.status == 405 and r.headers.get("allow") == allow, (r.status, r.headers, r.text)
    code, reason, body = r.error()
    assert (code, reason) == (12, "METHOD_NOT_ALLOWED") and "takes" in body["message"]


def test_a_token_without_bearer_is_told_how_to_send_it(api, make_user):
    r = api.request("GET", "/v1/payments", headers={"Authorization": make_user().token})
    assert r.status == 401
    code, reason, body = r.error()
    assert reason == "INVALID_TOKEN" and "'Bearer <token>'" in body["message"]


def test_a_mistyped_auth_route_is_not_found_not_a_token_problem(api):
    r = api.post("/v1/auth/signup", {"email": "x@example.com", "password": "correct horse battery"})
    assert r.status == 404, r.text
    code, reason, body = r.error()
    assert code == 5 and "token" not in body["message"].lower()


def test_logout_still_needs_its_token(api):
    r = api.post("/v1/auth/logout", {})
    assert r.status == 401 and r.error()[1] == "MISSING_TOKEN"


# --- refunds ---------------------------------------------------------------------------------

def test_refunds_over_rest(api, make_user, admin):
    """A refund through the real Envoy: the body is the refund, the precondition a query parameter,
    the payment and its history show it, a replay answers the first refund, every refusal is named."""
    user = make_user("refunds")
    paid = create(api, user, amount="150000", currency="IDR")
    refunds = f"/v1/payments/{paid['id']}/refunds"
    body = {"amount": "50000", "reason": "REQUESTED_BY_CUSTOMER", "note": "one item back", "request_id": "ret-1"}
    not_yet = api.post(refunds, body, token=admin.token)
    assert not_yet.status == 400 and not_yet.error()[:2] == (GRPC_FAILED_PRECONDITION, "PAYMENT_NOT_SETTLED")
    assert api.post(f"/v1/payments/{paid['id']}:confirm", {}, token=admin.token).status == 200

    customer = api.post(refunds, body, token=user.token)
    assert customer.status == 403 and customer.error()[:2] == (GRPC_PERMISSION_DENIED, "ADMIN_ONLY")
    made = api.post(refunds + "?expected_refunded_amount=0", body, token=admin.token)
    assert made.status == 200, made.text
    no_grpc_headers(made)
    refund = made.json
    assert refund["id"].startswith("ref_") and refund["payment_id"] == paid["id"]
    assert (refund["amount"], refund["currency"], refund["reason"], refund["note"], refund["refunded_amount_after"]) == \
           ("50000", "IDR", "REQUESTED_BY_CUSTOMER", "one item back", "50000")
    assert refund["created_by"].startswith("usr_") and refund["created_at"].endswith("Z")
    replay = api.post(refunds + "?expected_refunded_amount=0", body, token=admin.token)
    assert replay.status == 200 and replay.json == refund

    stale = api.post(refunds + "?expected_refunded_amount=0", {**body, "request_id": "ret-2"}, token=admin.token)
    assert stale.status == 400 and stale.error()[:2] == (GRPC_FAILED_PRECONDITION, "REFUNDED_AMOUNT_CHANGED")
    too_much = api.post(refunds, {"amount": "100001", "reason": "OTHER"}, token=admin.token)
    assert too_much.status == 400 and too_much.error()[:2] == (GRPC_FAILED_PRECONDITION, "REFUND_EXCEEDS_REMAINING")
    assert too_much.error()[2]["details"][0]["metadata"]["remaining"] == "100000"
    conflict = api.post(refunds, {**body, "amount": "1"}, token=admin.token)
    assert conflict.status == 409 and conflict.error()[:2] == (GRPC_ALREADY_EXISTS, "REQUEST_ID_CONFLICT")
    for bad, field in (({"amount": "0", "reason": "OTHER"}, "refund.amount"),
                       ({"amount": "5", "reason": "OTHER", "currency": "USD"}, "refund.currency"),
                       ({"amount": "5"}, "refund.reason")):
        r = api.post(refunds, bad, token=admin.token)
        assert r.status == 400 and r.error()[0] == GRPC_INVALID_ARGUMENT and field in r.violations(), r.text
    fractional = api.post(refunds, {"amount": 1.5, "reason": "OTHER"}, token=admin.token)
    assert fractional.status == 400, fractional.text
    rest = api.post(refunds, {"amount": 100000, "reason": "DUPLICATE"}, token=admin.token)  # a JSON number too
    assert rest.status == 200 and rest.json["refunded_amount_after"] == "150000"

    payment = api.get(f"/v1/payments/{paid['id']}", token=user.token).json
    assert (payment["status"], payment["refunded_amount"], payment["fully_refunded"]) == ("SUCCESS", "150000", True)
    listed = api.get(refunds + "?page_size=1", token=user.token)
    assert listed.status == 200 and [r["id"] for r in listed.json["refunds"]] == [refund["id"]]
    second = api.get(f"{refunds}?page_size=1&page_token={listed.json['next_page_token']}", token=user.token)
    assert [r["id"] for r in second.json["refunds"]] == [rest.json["id"]] and "next_page_token" not in second.json
    assert api.get(f"{refunds}/{refund['id']}", token=user.token).json == refund
    assert api.get(f"{refunds}/ref_{'a' * 26}", token=user.token).error()[:2] == (GRPC_NOT_FOUND, "REFUND_NOT_FOUND")
    assert api.get(refunds, token=make_user("refunds-other").token).status == 404
    events = api.get(f"/v1/payments/{paid['id']}/events", token=user.token).json["events"]
    assert [(e["action"], e.get("refund_id"), e.get("refunded_amount")) for e in events[2:]] == [
        ("REFUNDED", refund["id"], "50000"), ("REFUNDED", rest.json["id"], "150000")]
