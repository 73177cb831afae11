"""A JSON value of the wrong type is refused by Envoy's transcoder before the server sees it; its
answer names the field in the API's error shape (envoy.yaml: the 400 local reply is marked, and
the Lua filter's envoy_on_response rewrites the transcoder's words into a google.rpc.BadRequest and a
sentence a person understands)."""

from __future__ import annotations

import re

import pytest
import yaml

from devstack.envoyconf import CONFIG
from server.edge.pb import payments_pb2 as pb

GRPC_INVALID_ARGUMENT = 3
MINOR_UNIT = "must be an integer count of the currency's minor unit (150000 for IDR 150,000; no decimals)"
STATUSES = "must be one of PENDING, SUCCESS or FAILED (upper case)"


def violations(body: dict) -> list[tuple[str, str]]:
    for detail in body.get("details", []):
        if detail.get("@type") == "type.googleapis.com/google.rpc.BadRequest":
            return [(v["field"], v["description"]) for v in detail["field_violations"]]
    return []


@pytest.mark.parametrize("body, field, why", [
    ({"email": "a@example.com", "amount": 1.5, "currency": "IDR"}, "payment.amount", MINOR_UNIT),
    ({"email": "a@example.com", "amount": "12.50", "currency": "IDR"}, "payment.amount", MINOR_UNIT),
    ({"email": "a@example.com", "amount": True, "currency": "IDR"}, "payment.amount", MINOR_UNIT),
    ({"email": "a@example.com", "amount": 100, "currency": 360}, "payment.currency", "must be a string, in double quotes"),
    ({"email": 7, "amount": 100, "currency": "IDR"}, "payment.email", "must be a string, in double quotes"),
    ({"email": "a@example.com", "amount": 100, "status": "pending"}, "payment.status", STATUSES),
])
def test_a_value_of_the_wrong_type_is_a_400_naming_the_field(api, make_user, body, field, why):
    user = make_user()
    r = api.post("/v1/payments", body, token=user.token)
    assert r.status == 400, r.text
    assert r.error()[:2] == (GRPC_INVALID_ARGUMENT, "INVALID_REQUEST")
    assert violations(r.json) == [(field, why)], r.text
    assert r.json["message"] == f"{field}: {why}"
    assert "TYPE_" not in r.text and "x-payments-local-reply" not in r.headers


@pytest.mark.parametrize("body, field, why", [
    ({"amount": 1.5, "reason": "OTHER"}, "refund.amount", MINOR_UNIT),
    ({"amount": "5", "reason": "returned"}, "refund.reason",
     "must be one of REQUESTED_BY_CUSTOMER, DUPLICATE, FRAUDULENT or OTHER (upper case)"),
])
def test_a_refund_value_of_the_wrong_type_is_a_400_naming_the_field(api, make_user, body, field, why):
    r = api.post("/v1/payments/pay_abc/refunds", body, token=make_user().token)
    assert r.status == 400, r.text
    assert violations(r.json) == [(field, why)], r.text


@pytest.mark.parametrize("query, field, why", [
    ("status=pending", "status", STATUSES),
    ("page_size=ten", "page_size", "must be a whole number"),
    ("page_size=2.5", "page_size", "must be a whole number"),
])
def test_a_query_parameter_of_the_wrong_type_names_the_parameter(api, make_user, query, field, why):
    user = make_user()
    r = api.get(f"/v1/payments?{query}", token=user.token)
    assert r.status == 400, r.text
    assert violations(r.json) == [(field, why)], r.text


def test_json_that_does_not_parse_is_described_without_quoting_the_body(api, make_user):
    """The parser's own words quote the text around the error (a password, in a login): the answer
    says what is wrong with the request and quotes none of it (tests/e2e/test_answers_quote_nothing.py)."""
    user = make_user()
    r = api.request("POST", "/v1/payments", raw=b'{"email": "quoted-nowhere@example.com" ', token=user.token,
                    headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert r.error()[:2] == (GRPC_INVALID_ARGUMENT, "INVALID_REQUEST")
    why = "could not be read: the body must be this method's request as JSON and the query its fields"
    assert violations(r.json) == [("request", why)] and r.json["message"] == f"request: {why}"
    assert "quoted-nowhere" not in r.text


def test_the_servers_own_field_errors_pass_unchanged(api, make_user):
    user = make_user()
    r = api.post("/v1/payments", {"email": user.email, "amount": -5, "currency": "IDR"}, token=user.token)
    assert r.status == 400
    assert r.error()[1] == "INVALID_PAYMENT"  # the server's reason, not the gateway's
    assert "metadata" not in r.json["details"][0]


def _enum_types_in_requests() -> set[str]:
    """Every enum a request message can carry, found from the descriptors."""
    found, seen = set(), set()

    def walk(message):
        if message.full_name in seen:
            return
        seen.add(message.full_name)
        for f in message.fields:
            if f.enum_type is not None:
                found.add(f"type.googleapis.com/{f.enum_type.full_name}")
            if f.message_type is not None:
                walk(f.message_type)

    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            walk(method.input_type)
    return found


def test_the_lua_filter_words_every_enum_a_request_can_carry():
    config = yaml.safe_load(CONFIG.read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    lua = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.lua")
    source = lua["typed_config"]["default_source_code"]["inline_string"]
    table = dict(re.findall(r'\["(type\.googleapis\.com/[\w.]+)"\] = "([^"]+)"', source))
    assert set(table) == _enum_types_in_requests()
    for name, words in table.items():
        enum = pb.DESCRIPTOR.pool.FindEnumTypeByName(name.split("/", 1)[1])
        values = [v.name for v in enum.values if v.number != 0]
        assert words == ", ".join(values[:-1]) + " or " + values[-1], name
