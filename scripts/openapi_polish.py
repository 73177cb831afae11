"""The last step of `make gen` (scripts/gen.sh): what protoc-gen-openapiv2 cannot be told.

1. Every error response gets an example in the real error shape (google.rpc.Status with one
   ErrorInfo), so Swagger UI never shows its placeholders ("message": "string",
   "additionalProp1"). A response whose description names its reason ("reason PAYMENT_NOT_FOUND")
   gets that reason; the others get the usual one for their status. Examples written in the proto
   are kept as they are.
2. Model names lose the generator's prefixes (v1Payment -> Payment, googleRpcStatus -> Status,
   protobufAny -> Any, PaymentServiceCancelPaymentBody -> CancelPaymentBody, WebhookServiceRotateWebhookSecretBody -> RotateWebhookSecretBody).
3. The OAuth 2.0 token endpoint (POST /oauth2/token) takes a form, not JSON (RFC 6749 4.4.2;
   Envoy's Lua filter turns it into CreateToken's JSON): its body parameter becomes formData
   fields, and its errors the RFC's {"error", "error_description"} (OAuthError).

Usage: scripts/openapi_polish.py DOCUMENT (rewritten in place).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# status -> (gRPC code, usual reason, message) for responses that name no reason of their own.
USUAL = {
    "400": (3, "INVALID_REQUEST", "invalid request: the body is not valid JSON for this call"),
    "401": (16, "MISSING_TOKEN", "missing bearer token: send 'Authorization: Bearer <token>'"),
    "403": (7, "WRONG_AUDIENCE", "the token was issued for another API"),
    "404": (5, "PAYMENT_NOT_FOUND", "payment 'pay_4whsgy2kdmbtcpjouxjdvfnwzy' not found"),
    "409": (6, "EMAIL_TAKEN", "an account with this email already exists"),
    "413": (3, "BODY_TOO_LARGE", "request body too large (at most 16384 bytes)"),
    "429": (8, "RATE_LIMITED", "too many sign-up or login requests; retry in a few seconds"),
    "503": (14, "BACKEND_UNAVAILABLE", "the payments service is unavailable; retry shortly"),
    "default": (14, "DATABASE_UNAVAILABLE", "the payments database is unavailable; retry shortly"),
}
CODES = {"INVALID_ARGUMENT": 3, "FAILED_PRECONDITION": 9, "UNAUTHENTICATED": 16, "PERMISSION_DENIED": 7,
         "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "RESOURCE_EXHAUSTED": 8, "UNAVAILABLE": 14}
PREFIXES = ("googleRpc", "protobuf", "PaymentService", "WebhookService", "ClientService", "v1")
TOKEN_PATH = "/oauth2/token"
OAUTH_ERROR = {
    "type": "object",
    "description": "An OAuth 2.0 error answer (RFC 6749 section 5.2).",
    "properties": {
        "error": {"type": "string", "description": "invalid_request, invalid_client, unsupported_grant_type, "
                  "invalid_scope, or slow_down (429)."},
        "error_description": {"type": "string", "description": "What was wrong, for a person."},
    },
    "required": ["error"],
}


def example(status: str, description: str) -> dict:
    code, reason, message = USUAL.get(status, USUAL["default"])
    named = re.search(r"reason `?([A-Z][A-Z_]+)`?", description)
    if named:
        reason = named[1]
        message = description.split(" (")[0].rstrip(".")
        message = message[:1].lower() + message[1:]
        word = re.search(r"\(([A-Z_]+),", description)
        code = CODES.get(word[1], code) if word else code
    return {"code": code, "message": message,
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                         "domain": "payments.v1", "metadata": {}}]}


def short_name(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix) and name[len(prefix):][:1].isupper():
            return name[len(prefix):]
    return name


def form_token_endpoint(doc: dict) -> None:
    op = doc["paths"].get(TOKEN_PATH, {}).get("post")
    if op is None:
        return
    fields = doc["definitions"]["v1CreateTokenRequest"]
    required = set(fields.get("required", []))
    op["parameters"] = [
        {"name": name, "in": "formData", "type": "string", "required": name in required,
         **({"description": spec["description"]} if "description" in spec else {})}
        for name, spec in fields["properties"].items()
    ]
    op["consumes"] = ["application/x-www-form-urlencoded"]
    doc["definitions"]["OAuthError"] = OAUTH_ERROR
    for status, response in op["responses"].items():
        if status in ("400", "401", "429"):
            response["schema"] = {"$ref": "#/definitions/OAuthError"}


def polish(doc: dict) -> dict:
    form_token_endpoint(doc)
    for item in doc["paths"].values():
        for op in item.values():
            for status, response in op.get("responses", {}).items():
                if status != "200" and not response.get("examples"):
                    response["examples"] = {"application/json": example(status, response.get("description", ""))}
    names = {old: short_name(old) for old in doc.get("definitions", {})}
    if len(set(names.values())) != len(names):
        raise SystemExit(f"model names would collide: {names}")
    text = json.dumps(doc)
    for old, new in names.items():
        text = text.replace(f'"#/definitions/{old}"', f'"#/definitions/{new}"')
    doc = json.loads(text)
    doc["definitions"] = {names[k]: v for k, v in doc.get("definitions", {}).items()}
    return doc


def main(path: str) -> None:
    file = Path(path)
    file.write_text(json.dumps(polish(json.loads(file.read_text())), indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
