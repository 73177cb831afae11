"""The committed OpenAPI documents: generated from the proto (fresh), valid OpenAPI 2.0 and 3.0, the
3.0 one route for route the 2.0 one, and saying what the gateway serves.

The document is only ever written by `make gen` (protoc-gen-openapiv2, then
scripts/openapi_polish.py); these tests catch a
proto change without `make gen`, a hand edit, or generator flags/options that drift from what
Envoy's transcoder actually does (paths, field names, int64 and enum encoding, the error shape).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from google.api import annotations_pb2
from jsonschema import Draft4Validator
from openapi_spec_validator import OpenAPIV2SpecValidator, OpenAPIV30SpecValidator, validate

from server.edge.pb import payments_pb2

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "openapi" / "payments.swagger.json"
DOCUMENT_3 = ROOT / "openapi" / "payments.openapi.json"  # tools/openapi3 converts the 2.0 one
STATUS_REF = "#/definitions/Status"

PUBLIC_OPERATIONS = {"Register", "Login", "Refresh", "CreateToken"}
# Answered in RFC 6749's shape, {"error", "error_description"}, not google.rpc.Status.
OAUTH_ERRORS = {("CreateToken", "400"), ("CreateToken", "401"), ("CreateToken", "429")}
# The error statuses each operation really answers (besides 503 and default, on every operation).
ERRORS = {
    "CreatePayment": {"400", "401", "403", "409", "413"},
    "ListPayments": {"400", "401", "403"},
    "GetPayment": {"400", "401", "403", "404"},
    "DeletePayment": {"400", "401", "403", "404"},
    "ConfirmPayment": {"400", "401", "403", "404", "413"},
    "CancelPayment": {"400", "401", "403", "404", "413"},
    "UndeletePayment": {"400", "401", "403", "404", "413"},
    "ListPaymentEvents": {"400", "401", "403", "404"},
    "CreateRefund": {"400", "401", "403", "404", "409", "413"},
    "ListRefunds": {"400", "401", "403", "404"},
    "GetRefund": {"400", "401", "403", "404"},
    "Register": {"400", "409", "413", "429"},  # 429: Envoy's rate limit on the auth route
    "Login": {"400", "401", "413", "429"},
    "Refresh": {"400", "401", "413", "429"},
    "Logout": {"400", "401", "403", "413", "429"},
    "CreateWebhookEndpoint": {"400", "401", "403", "413"},
    "ListWebhookEndpoints": {"400", "401", "403"},
    "GetWebhookEndpoint": {"400", "401", "403", "404"},
    "UpdateWebhookEndpoint": {"400", "401", "403", "404", "413"},
    "DeleteWebhookEndpoint": {"400", "401", "403", "404"},
    "RotateWebhookSecret": {"400", "401", "403", "404", "413"},
    "ListWebhookEvents": {"400", "401", "403"},
    "GetWebhookEvent": {"400", "401", "403", "404"},
    "RedeliverWebhookEvent": {"400", "401", "403", "404", "413"},
    "CreateToken": {"400", "401", "413", "429"},
    "CreateClient": {"400", "401", "403", "413"},
    "ListClients": {"400", "401", "403"},
    "GetClient": {"400", "401", "403", "404"},
    "RotateClientSecret": {"400", "401", "403", "404", "413"},
    "SetClientExpiry": {"400", "401", "403", "404", "413"},
    "RevokeClient": {"400", "401", "403", "404", "413"},
}


@pytest.fixture(scope="module")
def doc() -> dict:
    return json.loads(DOCUMENT.read_text())


def operations(doc: dict):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield path, method, op


def test_committed_document_is_what_make_gen_writes(tmp_path):
    subprocess.run([str(ROOT / "scripts" / "gen.sh"), str(tmp_path)], check=True, capture_output=True, cwd=ROOT)
    for document in (DOCUMENT, DOCUMENT_3):
        fresh = (tmp_path / "openapi" / document.name).read_bytes()
        assert fresh == document.read_bytes(), f"openapi/{document.name} is stale or was edited: run `make gen`"


def test_vendored_option_protos_are_the_pinned_grpc_gateway_modules():
    """proto/vendor/grpc-gateway (what the images compile with, having no Go) is the module tools/go.mod
    pins; `make gen` copies it there."""
    module = Path(subprocess.run(["go", "list", "-m", "-f", "{{.Dir}}", "github.com/grpc-ecosystem/grpc-gateway/v2"],
                                 cwd=ROOT / "tools", check=True, capture_output=True, text=True).stdout.strip())
    vendor = ROOT / "proto" / "vendor" / "grpc-gateway"
    vendored = sorted(p.relative_to(vendor).as_posix() for p in vendor.rglob("*") if p.is_file())
    assert vendored == ["LICENSE", "protoc-gen-openapiv2/options/annotations.proto",
                        "protoc-gen-openapiv2/options/openapiv2.proto"]
    for name in vendored:
        assert (vendor / name).read_bytes() == (module / name).read_bytes(), f"{name} is stale: run `make gen`"


def test_document_is_valid_openapi_2(doc):
    validate(doc, cls=OpenAPIV2SpecValidator)


@pytest.fixture(scope="module")
def doc3() -> dict:
    return json.loads(DOCUMENT_3.read_text())


def test_the_openapi_3_document_is_valid_openapi_3_0(doc3):
    assert doc3["openapi"].startswith("3.0.")
    validate(doc3, cls=OpenAPIV30SpecValidator)


def test_the_openapi_3_document_matches_the_2_0_one_route_for_route(doc, doc3):
    def routes(d: dict) -> dict:
        return {(path, method): (op["operationId"], sorted(op["responses"]), op.get("security"), op.get("tags"))
                for path, method, op in operations(d)}

    assert routes(doc3) == routes(doc)
    assert doc3["security"] == doc["security"]
    assert doc3["components"]["securitySchemes"] == doc["securityDefinitions"]
    assert doc3["info"] == doc["info"] and "servers" not in doc3  # the page's own origin, as 2.0 has no host
    for path, method, op in operations(doc):  # request bodies and their schemas survive the move
        body = [p for p in op.get("parameters", []) if p["in"] == "body"]
        form = [p["name"] for p in op.get("parameters", []) if p["in"] == "formData"]
        converted = doc3["paths"][path][method]
        assert ("requestBody" in converted) == bool(body or form), (path, method)
        if form:  # the token endpoint's form (RFC 6749 4.4.2)
            schema = converted["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
            assert sorted(schema["properties"]) == sorted(form)
        if body:
            schema = converted["requestBody"]["content"]["application/json"]["schema"]
            assert json.dumps(schema).replace("#/components/schemas/", "#/definitions/") == json.dumps(body[0]["schema"])


def test_paths_and_methods_are_the_proto_http_rules(doc):
    rules = set()
    for service in payments_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            verb = rule.WhichOneof("pattern")
            rules.add((getattr(rule, verb), verb, method.name))
    documented = {(path, method, op["operationId"]) for path, method, op in operations(doc)}
    assert documented == rules


def test_no_host_so_one_document_serves_every_environment(doc):
    assert not {"host", "basePath", "schemes"} & doc.keys()


def test_payment_calls_need_a_bearer_token_and_auth_calls_do_not(doc):
    scheme = doc["securityDefinitions"]["bearer"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "Authorization")
    assert "Bearer <access_token>" in scheme["description"]
    assert doc["security"] == [{"bearer": []}]
    for _, _, op in operations(doc):
        if op["operationId"] in PUBLIC_OPERATIONS:
            assert op["security"] == [], op["operationId"]
        else:
            assert "security" not in op, op["operationId"]  # inherits the document's bearer requirement


def test_every_operation_is_documented(doc):
    tags = {t["name"] for t in doc["tags"]}
    assert tags == {"Payments", "Auth", "Webhooks", "Service clients"}
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert sorted(ids) == sorted(ERRORS)
    for _, _, op in operations(doc):
        assert op["summary"] and op["description"], op["operationId"]
        assert len(op["tags"]) == 1 and op["tags"][0] in tags


def test_error_responses_are_the_real_ones_in_the_google_rpc_status_shape(doc):
    status = doc["definitions"]["Status"]["properties"]
    assert (status["code"]["type"], status["message"]["type"], status["details"]["type"]) == ("integer", "string", "array")
    for _, _, op in operations(doc):
        codes = set(op["responses"])
        assert codes == {"200", "503", "default"} | ERRORS[op["operationId"]], op["operationId"]
        for code, response in op["responses"].items():
            assert response["description"]
            if code != "200" and (op["operationId"], code) not in OAUTH_ERRORS:
                assert response["schema"] == {"$ref": STATUS_REF}, (op["operationId"], code)


def test_json_encoding_matches_the_transcoder(doc):
    payment = doc["definitions"]["Payment"]["properties"]
    # Proto field names, exactly (print_options.preserve_proto_field_names).
    assert set(payment) == {f.name for f in payments_pb2.Payment.DESCRIPTOR.fields}
    # int64 is a JSON string; enums are their names, without the zero value (never printed).
    assert (payment["amount"]["type"], payment["amount"]["format"]) == ("string", "int64")
    assert doc["definitions"]["LoginResponse"]["properties"]["expires_in"]["type"] == "string"
    status = doc["definitions"]["PaymentStatus"]
    assert (status["type"], status["enum"]) == ("string", ["PENDING", "SUCCESS", "FAILED"])
    assert doc["definitions"]["PaymentFailureReason"]["enum"] == ["CANCELLED", "EXPIRED"]
    assert payment["created_at"]["format"] == "date-time"


def test_output_only_fields_are_read_only(doc):
    payment = doc["definitions"]["Payment"]
    read_only = {name for name, prop in payment["properties"].items() if prop.get("readOnly")}
    assert read_only == {"id", "status", "failure_reason", "created_at", "updated_at", "expires_at", "owner_id",
                         "deleted_at", "refunded_amount", "fully_refunded"}
    assert payment["required"] == ["email", "amount"]
    refund = doc["definitions"]["Refund"]
    read_only = {name for name, prop in refund["properties"].items() if prop.get("readOnly")}
    assert read_only == {"id", "payment_id", "created_by", "created_at", "refunded_amount_after"}
    assert refund["required"] == ["amount", "reason"]
    assert doc["definitions"]["RefundReason"]["enum"] == ["REQUESTED_BY_CUSTOMER", "DUPLICATE", "FRAUDULENT", "OTHER"]


def test_request_bodies_are_what_a_client_sends(doc):
    # body: "payment" -> the JSON body IS the payment, not {"payment": {...}}.
    (create_body,) = [p for p in doc["paths"]["/v1/payments"]["post"]["parameters"] if p["in"] == "body"]
    assert create_body["schema"] == {"$ref": "#/definitions/Payment"}
    # body: "*" with the id in the path -> an empty JSON object.
    for action in ("confirm", "cancel"):
        params = doc["paths"][f"/v1/payments/{{id}}:{action}"]["post"]["parameters"]
        assert [p["in"] for p in params] == ["path", "body"]
        body_ref = params[1]["schema"]["$ref"].rsplit("/", 1)[1]
        assert doc["definitions"][body_ref] == {"type": "object"}
    # body: "refund" -> the body IS the refund; the precondition is a query parameter beside it.
    params = {p["name"]: p for p in doc["paths"]["/v1/payments/{payment_id}/refunds"]["post"]["parameters"]}
    assert params["refund"]["in"] == "body" and params["refund"]["schema"] == {"$ref": "#/definitions/Refund"}
    assert (params["expected_refunded_amount"]["in"], params["expected_refunded_amount"]["format"]) == ("query", "int64")


def test_response_examples_match_their_schemas(doc):
    checked = 0
    for _, _, op in operations(doc):
        for code, response in op["responses"].items():
            example = response.get("examples", {}).get("application/json")
            if example is None:
                continue
            schema = {**response["schema"], "definitions": doc["definitions"]}
            errors = [e.message for e in Draft4Validator(schema).iter_errors(example)]
            assert errors == [], (op["operationId"], code, errors)
            checked += 1
    assert checked >= 10


HTTP_OF_CODE = {3: {"400", "413"}, 5: {"404"}, 6: {"409"}, 7: {"403"}, 8: {"429"}, 9: {"400"}, 14: {"503", "default"},
                16: {"401"}}


def test_every_error_example_is_a_real_error_shape(doc):
    """Swagger UI shows these: a google.rpc.Status whose code fits the HTTP status, with one ErrorInfo
    of this API's domain and a reason the service really sends, and never a generated placeholder."""
    reasons = set(re.findall(r"`([A-Z][A-Z_]+)`", (ROOT / "docs" / "api.md").read_text()
                             + (ROOT / "envoy" / "README.md").read_text()))
    reasons -= {"INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED",
                "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "INTERNAL"}  # codes, not reasons
    seen = 0
    for _, _, op in operations(doc):
        for status, response in op["responses"].items():
            if status == "200" or (op["operationId"], status) in OAUTH_ERRORS:
                continue
            example = response["examples"]["application/json"]
            assert set(example) == {"code", "message", "details"} and example["message"], (op["operationId"], status)
            assert status in HTTP_OF_CODE[example["code"]], (op["operationId"], status, example["code"])
            [info] = [d for d in example["details"] if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
            assert info["domain"] == "payments.v1" and info["reason"] in reasons, (op["operationId"], status, info)
            assert "additionalProp1" not in json.dumps(example) and example["message"] != "string"
            seen += 1
    assert seen > 60


def test_models_carry_no_generator_prefixes(doc):
    assert not [name for name in doc["definitions"]
                if name.startswith(("v1", "googleRpc", "protobuf", "PaymentService"))]


def test_the_token_endpoint_takes_the_oauth_form_and_answers_oauth_errors(doc):
    """RFC 6749 4.4.2 and 5.2, as Envoy's Lua filter serves them (tests/e2e/test_clients_rest.py)."""
    op = doc["paths"]["/oauth2/token"]["post"]
    assert op["consumes"] == ["application/x-www-form-urlencoded"] and op["security"] == []
    assert {p["name"]: (p["in"], p["required"]) for p in op["parameters"]} == {
        "grant_type": ("formData", True), "client_id": ("formData", True), "client_secret": ("formData", True),
        "scope": ("formData", False)}
    for status in ("400", "401", "429"):
        assert op["responses"][status]["schema"] == {"$ref": "#/definitions/OAuthError"}
        assert set(op["responses"][status]["examples"]["application/json"]) == {"error", "error_description"}
