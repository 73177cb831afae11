"""What a REST request's query string and body may set, through the real Envoy, on both databases
(envoy.yaml's Lua filter checks each request against gen/rest_bindings.lua, generated from the
proto's google.api.http bindings):

- a query parameter naming a path variable or a body field is refused (400 INVALID_REQUEST): the
  transcoder would let `?payment_id=B` on /v1/payments/A/refunds refund B;
- a body key that only a query parameter carries (`expected_refunded_amount` next to a refund's
  fields) is refused, not silently dropped;
- a JSON number with a fraction or an exponent is refused in any body, naming the field like the
  gateway's other type errors (the transcoder would round 99.99999999999999999 to 100).
"""

from __future__ import annotations

import re
import urllib.parse

import pytest
from google.api import annotations_pb2

from server.edge.pb import payments_pb2
from tests.support.rest import Client, loopback_address
from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD

MINOR_UNIT = "must be an integer count of the currency's minor unit (150000 for IDR 150,000; no decimals)"


def routes() -> list[tuple[str, str, str, str, list[str]]]:
    """(rpc, HTTP method, template, body, path variables) of every REST binding in the proto."""
    out = []
    for service in payments_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            for binding in [rule, *rule.additional_bindings]:
                verb = binding.WhichOneof("pattern")
                template = getattr(binding, verb)
                out.append((method.name, verb.upper(), template, binding.body, re.findall(r"\{([^}=]+)", template)))
    return out


WITH_PATH_VARIABLES = [r for r in routes() if r[4]]
WITH_BODY_FIELD = [r for r in routes() if r[3] and r[3] != "*"]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def any_stack(request):
    return request.getfixturevalue("stack" if request.param == "sqlite" else "pg_stack")


@pytest.fixture
def rest(any_stack) -> Client:
    return Client(any_stack.url).from_address(loopback_address())


@pytest.fixture
def admin_token(rest) -> str:
    login = rest.post("/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert login.status == 200, login.text
    return login.json["access_token"]


def settled(rest, token, amount=10_000) -> str:
    made = rest.post("/v1/payments", {"email": ADMIN_EMAIL, "amount": str(amount), "currency": "IDR"}, token=token)
    assert made.status == 200, made.text
    assert rest.post(f"/v1/payments/{made.json['id']}:confirm", {}, token=token).status == 200
    return made.json["id"]


def refused(r, words: str) -> None:
    assert r.status == 400, (r.status, r.text)
    assert r.error()[:2] == (3, "INVALID_REQUEST"), r.text
    assert words in r.json["message"], r.text


def fill(template: str) -> str:
    return re.sub(r"\{[^}]*\}", "pay_aaaaaaaaaaaaaaaaaaaaaaaaaa", template)


@pytest.mark.parametrize("rpc, verb, template, body, variables", WITH_PATH_VARIABLES,
                         ids=[f"{r[0]}:{r[2]}" for r in WITH_PATH_VARIABLES])
def test_a_query_parameter_naming_a_path_variable_is_refused_on_every_route(rest, admin_token, rpc, verb, template,
                                                                            body, variables):
    for variable in variables:
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), variable)
        for name in {variable, camel, urllib.parse.quote(variable, safe="").replace("_", "%5F")}:
            r = rest.request(verb, f"{fill(template)}?{name}=pay_bbbbbbbbbbbbbbbbbbbbbbbbbb",
                             {} if body else None, token=admin_token)
            refused(r, f"{urllib.parse.unquote(name)}: a query parameter may not set it")


@pytest.mark.parametrize("rpc, verb, template, body, variables", WITH_BODY_FIELD,
                         ids=[f"{r[0]}:{r[2]}" for r in WITH_BODY_FIELD])
def test_a_query_parameter_setting_a_body_field_is_refused(rest, admin_token, rpc, verb, template, body, variables):
    r = rest.request(verb, f"{fill(template)}?{body}.note=hi", {}, token=admin_token)
    refused(r, f"{body}.note: a query parameter may not set it")


def test_a_refund_goes_to_the_payment_the_path_names_or_nowhere(rest, admin_token):
    a, b = settled(rest, admin_token), settled(rest, admin_token)
    for query in (f"payment_id={b}", f"paymentId={b}", "refund.note=hi", "refund.request_id=zz"):
        r = rest.post(f"/v1/payments/{a}/refunds?{query}", {"amount": "7", "reason": "OTHER"}, token=admin_token)
        refused(r, ": a query parameter may not set it")
    r = rest.get(f"/v1/payments/{a}?id={b}", token=admin_token)
    refused(r, "id: a query parameter may not set it")
    for pid in (a, b):
        assert rest.get(f"/v1/payments/{pid}", token=admin_token).json.get("refunded_amount", "0") == "0"
    # The path alone, and a query parameter the route takes, still work.
    ok = rest.post(f"/v1/payments/{a}/refunds?expected_refunded_amount=0", {"amount": "7", "reason": "OTHER"},
                   token=admin_token)
    assert ok.status == 200 and ok.json["payment_id"] == a, ok.text
    assert rest.get(f"/v1/payments/{a}/refunds?page_size=1", token=admin_token).status == 200


@pytest.mark.parametrize("key", ["expected_refunded_amount", "expectedRefundedAmount"])
def test_the_refunds_expectation_in_the_body_is_refused_not_dropped(rest, admin_token, key):
    pid = settled(rest, admin_token)
    assert rest.post(f"/v1/payments/{pid}/refunds", {"amount": "5", "reason": "OTHER"}, token=admin_token).status == 200
    r = rest.post(f"/v1/payments/{pid}/refunds", {"amount": "1", "reason": "OTHER", key: "3"}, token=admin_token)
    refused(r, f"{key}: POST /v1/payments/{{payment_id}}/refunds takes {key} as a query parameter")
    assert rest.get(f"/v1/payments/{pid}", token=admin_token).json["refunded_amount"] == "5"


@pytest.mark.parametrize("literal", ["99.99999999999999999", "100.0000000000000001", "1e2", "1E2", "0.1e3", "100.0",
                                     "1.5", "-1.5e3"])
def test_a_number_with_a_fraction_or_an_exponent_is_refused_naming_the_field(rest, admin_token, literal):
    pid = settled(rest, admin_token)
    raw = ('{"amount":%s,"reason":"OTHER"}' % literal).encode()
    r = rest.request("POST", f"/v1/payments/{pid}/refunds", raw=raw, token=admin_token,
                     headers={"content-type": "application/json"})
    assert r.status == 400, r.text
    assert r.error()[:2] == (3, "INVALID_REQUEST") and r.json["message"] == f"refund.amount: {MINOR_UNIT}", r.text
    assert "TYPE_" not in r.text
    assert rest.get(f"/v1/payments/{pid}", token=admin_token).json.get("refunded_amount", "0") == "0"
    raw = ('{"email":"%s","amount":%s,"currency":"IDR"}' % (ADMIN_EMAIL, literal)).encode()
    r = rest.request("POST", "/v1/payments", raw=raw, token=admin_token, headers={"content-type": "application/json"})
    assert r.status == 400 and r.json["message"] == f"payment.amount: {MINOR_UNIT}", r.text
    # Nested and in an unknown field too; strings holding such text are not numbers.
    raw = b'{"amount":"100","reason":"OTHER","note":"1.5e3 and 2.5","extra":{"x":[1,2.5]}}'
    r = rest.request("POST", f"/v1/payments/{pid}/refunds", raw=raw, token=admin_token,
                     headers={"content-type": "application/json"})
    assert r.status == 400 and r.json["message"].startswith("refund.extra.x:"), r.text


def test_integers_as_numbers_and_as_strings_still_pass(rest, admin_token):
    pid = settled(rest, admin_token)
    raw = b'{"amount": 100, "reason": "OTHER", "note": "a 1.5 kg parcel"}'
    r = rest.request("POST", f"/v1/payments/{pid}/refunds", raw=raw, token=admin_token,
                     headers={"content-type": "application/json"})
    assert r.status == 200 and r.json["amount"] == "100", r.text
    r = rest.post(f"/v1/payments/{pid}/refunds", {"amount": "-0", "reason": "OTHER"}, token=admin_token)
    assert r.status == 400  # the server's own refusal of a zero amount, not the gateway's
    assert r.error()[1] == "INVALID_REFUND", r.text


def test_the_lua_filter_logs_no_script_error_on_these_requests(any_stack, rest, admin_token):
    """A Lua error is only logged and the request goes on half-handled: the refusals above, a REST
    body passed on, and a token request leave no script error in Envoy's log."""
    pid = settled(rest, admin_token)
    refused(rest.post(f"/v1/payments/{pid}/refunds?payment_id={pid}", {"amount": "1", "reason": "OTHER"},
                      token=admin_token), "payment_id: a query parameter may not set it")
    assert rest.post(f"/v1/payments/{pid}/refunds", {"amount": "1", "reason": "OTHER"}, token=admin_token).status == 200
    rest.request("POST", "/oauth2/token", raw=b"grant_type=client_credentials",
                 headers={"content-type": "application/x-www-form-urlencoded"})
    errors = [line for line in any_stack.envoy.log.read_text().splitlines() if "[lua]" in line]
    assert errors == []
