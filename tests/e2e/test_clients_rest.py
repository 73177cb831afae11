"""Service clients through the real Envoy, on SQLite and PostgreSQL, with the tools a new user
has: curl for the token endpoint (RFC 6749 4.4.2: a form; 5.1 and 5.2: the answers) and the REST
API, grpcurl for the same over native gRPC. Malformed grant requests get the RFC's errors, odd
bytes in every form field never a 5xx, and a call outside the client's permissions a clear 403."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.parse

import pytest

from tests.e2e.test_grpc_and_cors import grpcurl
from tests.support.rest import Client, loopback_address
from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def any_stack(request):
    return request.getfixturevalue("stack" if request.param == "sqlite" else "pg_stack")


@pytest.fixture
def rest(any_stack) -> Client:
    return Client(any_stack.url)


@pytest.fixture
def admin_token(rest) -> str:
    login = rest.from_address(loopback_address()).post("/v1/auth/login", {"email": ADMIN_EMAIL,
                                                                          "password": ADMIN_PASSWORD})
    assert login.status == 200, login.text
    return login.json["access_token"]


def new_client(rest, admin_token, *permissions) -> dict:
    made = rest.post("/v1/clients", {"name": "shopping", "permissions": list(permissions)}, token=admin_token)
    assert made.status == 200, made.text
    return made.json


def curl(stack, *args: str, path: str = "/oauth2/token", address: str | None = None) -> tuple[int, dict, str]:
    """(status, lower-case headers, body) of curl's answer; each call from an address of its own
    unless one is given (Envoy limits token requests per address, as logins)."""
    out = subprocess.run(["curl", "-s", "-i", "--max-time", "20", "--interface", address or loopback_address(),
                          *args, stack.url + path], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition("\n\n")  # text mode: "\r\n" read as "\n"
    lines = head.split("\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def token_via_curl(stack, client: dict, *extra: str) -> dict:
    status, headers, body = curl(stack, "-d", "grant_type=client_credentials", "-d", f"client_id={client['client']['id']}",
                                 "-d", f"client_secret={client['secret']}", *extra)
    assert status == 200, body
    assert headers.get("cache-control") == "no-store" and headers.get("pragma") == "no-cache", headers
    return json.loads(body)


def test_a_new_user_creates_a_client_gets_a_token_with_curl_and_calls_over_rest_and_grpc(any_stack, rest, admin_token):
    client = new_client(rest, admin_token, "payments.create", "payments.read")
    assert client["secret"].startswith("pmt_cs_") and "secret" not in client["client"]
    got = token_via_curl(any_stack, client)
    assert set(got) == {"access_token", "token_type", "expires_in", "scope"}
    assert (got["token_type"], got["expires_in"], got["scope"]) == ("Bearer", 300, "payments.create payments.read")
    # HTTP Basic (RFC 6749 2.3.1) works the same, with a narrower scope.
    status, _, body = curl(any_stack, "-u", f"{client['client']['id']}:{client['secret']}",
                           "-d", "grant_type=client_credentials", "-d", "scope=payments.read")
    assert status == 200 and json.loads(body)["scope"] == "payments.read"
    # REST with the token: create for a registered payer, read it back.
    payer = f"payer-{time.time_ns()}@example.com"
    assert rest.from_address(loopback_address()).post(
        "/v1/auth/register", {"email": payer, "password": "correct horse battery"}).status == 200
    created = rest.post("/v1/payments", {"email": payer, "amount": "150000", "request_id": "order-1"},
                        token=got["access_token"])
    assert created.status == 200, created.text
    assert rest.get(f"/v1/payments/{created.json['id']}", token=got["access_token"]).status == 200
    events = rest.get(f"/v1/payments/{created.json['id']}/events", token=got["access_token"]).json["events"]
    assert [(e["actor_id"], e["actor_role"]) for e in events] == [(client["client"]["id"], "client")]
    # Outside its permissions: a clear 403 naming what is missing.
    refused = rest.post(f"/v1/payments/{created.json['id']}:confirm", {}, token=got["access_token"])
    assert refused.status == 403
    code, reason, body = refused.error()
    assert reason == "PERMISSION_MISSING" and "payments.confirm" in body["message"]
    assert rest.get("/v1/clients", token=got["access_token"]).error()[1] == "PERSONS_ONLY"
    # grpcurl: the token over native gRPC through Envoy, and the grant itself over gRPC.
    out = grpcurl(any_stack, "-H", f"authorization: Bearer {got['access_token']}", "-d",
                  json.dumps({"id": created.json["id"]}), "payments.v1.PaymentService/GetPayment")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["id"] == created.json["id"]
    out = grpcurl(any_stack, "-H", f"authorization: Bearer {got['access_token']}", "-d",
                  json.dumps({"id": created.json["id"]}), "payments.v1.PaymentService/ConfirmPayment")
    assert out.returncode != 0 and "PermissionDenied" in out.stderr and "PERMISSION_MISSING" in out.stderr
    out = grpcurl(any_stack, "-H", f"authorization: Bearer {got['access_token']}", "-d", json.dumps(
        {"grant_type": "client_credentials", "client_id": client["client"]["id"], "client_secret": client["secret"]}),
        "payments.v1.TokenService/CreateToken")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_type"] == "Bearer"


def test_malformed_grant_requests_get_rfc_6749_errors(any_stack, rest, admin_token):
    client = new_client(rest, admin_token, "payments.read")
    cid, secret = client["client"]["id"], client["secret"]
    basic = base64.b64encode(f"{cid}:{secret}".encode()).decode()
    cases = [
        # (curl arguments, status, error)
        (["-d", f"client_id={cid}", "-d", f"client_secret={secret}"], 400, "invalid_request"),
        (["-d", "grant_type=password", "-d", f"client_id={cid}", "-d", f"client_secret={secret}"],
         400, "unsupported_grant_type"),
        (["-d", "grant_type=authorization_code", "-d", "code=x"], 400, "unsupported_grant_type"),
        (["-d", "grant_type=client_credentials", "-d", f"client_id={cid}", "-d", "client_secret=pmt_cs_wrong"],
         401, "invalid_client"),
        (["-d", "grant_type=client_credentials", "-d", "client_id=cli_nobody", "-d", f"client_secret={secret}"],
         401, "invalid_client"),
        (["-d", "grant_type=client_credentials"], 401, "invalid_client"),
        (["-d", "grant_type=client_credentials", "-d", f"client_id={cid}", "-d", f"client_secret={secret}",
          "-d", "scope=payments.confirm"], 400, "invalid_scope"),
        (["-d", "grant_type=client_credentials", "-d", "grant_type=client_credentials", "-d", f"client_id={cid}",
          "-d", f"client_secret={secret}"], 400, "invalid_request"),
        (["-H", "content-type: application/json", "-d", json.dumps({"grant_type": "client_credentials",
                                                                     "client_id": cid, "client_secret": secret})],
         400, "invalid_request"),
        (["-X", "POST"], 400, "invalid_request"),
        (["-H", f"authorization: Basic {basic}", "-d", "grant_type=client_credentials", "-d",
          f"client_secret={secret}"], 400, "invalid_request"),
        (["-H", "authorization: Basic !!!", "-d", "grant_type=client_credentials"], 401, "invalid_client"),
        (["-H", "authorization: Bearer x", "-d", "grant_type=client_credentials"], 401, "invalid_client"),
    ]
    for args, status, error in cases:
        got_status, headers, body = curl(any_stack, *args)
        assert (got_status, json.loads(body)["error"]) == (status, error), (args, got_status, body)
        assert set(json.loads(body)) == {"error", "error_description"} and headers["cache-control"] == "no-store"
        assert headers["content-type"] == "application/json"
        if status == 401:
            assert headers["www-authenticate"].startswith("Basic")
    assert curl(any_stack)[0] == 405  # GET


def test_the_token_endpoint_takes_credentials_only_as_rfc_6749_allows(any_stack, rest, admin_token):
    """RFC 6749 2.3.1: credentials in the form body or HTTP Basic, never the URL (any query string
    is refused, with or without a body); 3.2: no parameter twice, even empty; 4.4.2 and appendix B:
    exactly application/x-www-form-urlencoded, UTF-8. No refusal depends on what the server would
    have answered, and no description carries the internal JSON."""
    client = new_client(rest, admin_token, "payments.read")
    cid, secret = client["client"]["id"], client["secret"]
    grant = f"grant_type=client_credentials&client_id={cid}&client_secret={secret}"
    form = ["--data-binary", grant]
    refused = [
        # (curl arguments, path, error, words the description has)
        (["-X", "POST"], f"/oauth2/token?{grant}", "invalid_request", "query"),
        (["-X", "POST", "-H", "content-type: application/json"], f"/oauth2/token?{grant}", "invalid_request", "query"),
        (["-X", "POST", "-H", "authorization: Basic ###"], f"/oauth2/token?{grant}", "invalid_request", "query"),
        (["-d", "grant_type=client_credentials"], f"/oauth2/token?client_id={cid}&client_secret={secret}",
         "invalid_request", "query"),
        (form, "/oauth2/token?foo=1", "invalid_request", "query"),
        (form, "/oauth2/token?", "invalid_request", "query"),
        (["-u", f"{cid}:{secret}", "-d", "grant_type=client_credentials"], "/oauth2/token?scope=payments.read",
         "invalid_request", "query"),
        (["--data-binary", f"client_id=&{grant}"], "/oauth2/token", "invalid_request", "client_id is given more than once"),
        (["--data-binary", f"scope=&scope=payments.read&{grant}"], "/oauth2/token", "invalid_request",
         "scope is given more than once"),
        (["--data-binary", f"foo=1&foo=2&{grant}"], "/oauth2/token", "invalid_request", "more than once"),
        (["--data-binary", f"{grant}&grant_type="], "/oauth2/token", "invalid_request", "more than once"),
        (["-u", f"{cid}:{secret}", "-d", "grant_type=client_credentials", "-d", "client_id=cli_" + "a" * 26],
         "/oauth2/token", "invalid_request", "client_id"),
        (["-H", "content-type: application/x-www-form-urlencodedXYZ", *form], "/oauth2/token", "invalid_request",
         "x-www-form-urlencoded"),
        (["-H", "content-type: application/x-www-form-urlencoded; charset=ISO-8859-1", *form], "/oauth2/token",
         "invalid_request", "UTF-8"),
        (["-H", "content-type: application/x-www-form-urlencoded; boundary=x", *form], "/oauth2/token",
         "invalid_request", "UTF-8"),
        (["-H", "content-type: application/x-www-form-urlencoded", "-H", "content-type: text/plain", *form],
         "/oauth2/token", "invalid_request", "x-www-form-urlencoded"),
        (["--data-binary", f"grant_type=client_credentials&client_id=%c3%28&client_secret={secret}"], "/oauth2/token",
         "invalid_request", "client_id must be UTF-8"),
        (["--data-binary", f"grant_type=client_credentials&client_id={cid}&client_secret=%ed%a0%80"], "/oauth2/token",
         "invalid_request", "client_secret must be UTF-8"),
    ]
    for args, path, error, words in refused:
        status, headers, body = curl(any_stack, *args, path=path)
        answer = json.loads(body)
        assert (status, answer["error"]) == (400, error), (args, path, status, body)
        assert words in answer["error_description"], (args, path, body)
        assert "access_token" not in answer and secret not in body and '":' not in answer["error_description"]
        assert headers["cache-control"] == "no-store"
    accepted = [
        (["-H", "content-type: application/x-www-form-urlencoded; charset=utf-8", *form]),
        (["-H", 'content-type: Application/X-WWW-Form-Urlencoded ; Charset="UTF-8"', *form]),
        (["-u", f"{cid}:{secret}", "-d", "grant_type=client_credentials", "-d", f"client_id={cid}"]),
        (["--data-binary", f"{grant}&unknown=1"]),  # 3.2: unrecognised parameters are ignored
    ]
    for args in accepted:
        status, _, body = curl(any_stack, *args)
        assert status == 200 and json.loads(body)["token_type"] == "Bearer", (args, body)


def test_a_token_request_shed_for_load_is_a_503_to_retry_never_a_400(any_stack, rest, admin_token):
    """Load shedding (SERVER_BUSY: here Envoy's circuit breaker for sign-up, login and tokens, set to
    admit nothing) is the service's state: 503 temporarily_unavailable with Retry-After, which an
    OAuth client retries; the RFC's 400 invalid_request would tell it its request is wrong."""
    client = new_client(rest, admin_token, "payments.read")
    any_stack.envoy.set_runtime(circuit_breakers__payments_auth__default__max_requests="0")
    try:
        status, headers, body = curl(any_stack, "-d", "grant_type=client_credentials", "-d",
                                     f"client_id={client['client']['id']}", "-d", f"client_secret={client['secret']}")
        login = rest.from_address(loopback_address()).post("/v1/auth/login", {"email": "a@example.com",
                                                                              "password": "whatever-it-is"})
    finally:
        any_stack.envoy.set_runtime(circuit_breakers__payments_auth__default__max_requests="1024")  # envoy.yaml's
    assert (status, json.loads(body)) == (503, {"error": "temporarily_unavailable", "error_description":
                                                "the service is busy or unavailable; retry after the seconds in Retry-After"}), body
    assert int(headers["retry-after"]) >= 1 and headers["cache-control"] == "no-store"
    assert headers["content-type"] == "application/json"
    assert (login.status, login.error()[1]) == (429, "SERVER_BUSY")  # the breaker was what refused
    assert token_via_curl(any_stack, client)["token_type"] == "Bearer"  # and admits again


def test_odd_bytes_in_any_form_field_are_never_a_server_error(any_stack, rest, admin_token):
    client = new_client(rest, admin_token, "payments.read")
    good = {"grant_type": "client_credentials", "client_id": client["client"]["id"],
            "client_secret": client["secret"], "scope": "payments.read"}
    odd = ["%00", "%FF%FE", "a" * 5000, "%E2%80%AE", "\u00e9\u0301", "%0d%0a", "%22%5c", "=", "&", " ", "%2B"]
    for field in good:
        for value in odd:
            form = "&".join(f"{k}={value if k == field else urllib.parse.quote(v, safe='')}" for k, v in good.items())
            status, _, body = curl(any_stack, "--data-binary", form, "-H",
                                   "content-type: application/x-www-form-urlencoded", address=loopback_address())
            assert status in (200, 400, 401, 429), (field, value, status, body)
            assert "error" in json.loads(body) or status == 200

def test_a_form_larger_than_the_gateway_takes_is_a_413(any_stack, tmp_path):
    """The 413 says "at most 16384 bytes", and so it is at the token endpoint too (whose form the
    Lua filter reads before the buffer filter): 16,384 bytes are read (and refused for a field's
    length, 400), 16,385 are a 413."""
    huge = tmp_path / "form"
    start = "grant_type=client_credentials&client_id=cli_x&client_secret="
    for size, status_wanted in ((10_000, 400), (16_384, 400), (16_385, 413), (16_400, 413), (17_000, 413), (20_000, 413), (33_000, 413), (200_000, 413)):
        huge.write_text(start + "a" * (size - len(start)))
        status, _, body = curl(any_stack, "--data-binary", f"@{huge}", "-H",
                               "content-type: application/x-www-form-urlencoded")
        assert status == status_wanted, (size, status, body)
        if status == 413:
            assert json.loads(body)["details"][0]["reason"] == "BODY_TOO_LARGE"
            assert "at most 16384 bytes" in json.loads(body)["message"]
        else:
            assert json.loads(body) == {"error": "invalid_request",
                                        "error_description": "client_secret must be at most 2048 characters"}


def test_rotation_grace_and_revocation_over_rest(any_stack, rest, admin_token):
    client = new_client(rest, admin_token, "payments.read")
    cid = client["client"]["id"]
    rotated = rest.post(f"/v1/clients/{cid}:rotateSecret", {"previous_secret_ttl_seconds": 60}, token=admin_token)
    assert rotated.status == 200 and rotated.json["secret"] != client["secret"]
    old = token_via_curl(any_stack, client)  # the previous secret, in its grace
    new = token_via_curl(any_stack, {"client": client["client"], "secret": rotated.json["secret"]})
    listed = rest.get("/v1/clients", token=admin_token).json["clients"]
    mine = [c for c in listed if c["id"] == cid][0]
    assert mine["secret_prefix"] == rotated.json["secret"][:12] and "last_used_at" in mine
    assert client["secret"] not in json.dumps(listed) and rotated.json["secret"] not in json.dumps(listed)
    revoked = rest.post(f"/v1/clients/{cid}:revoke", {}, token=admin_token)
    assert revoked.status == 200 and revoked.json["revoked_at"]
    status, _, body = curl(any_stack, "-d", "grant_type=client_credentials", "-d", f"client_id={cid}",
                           "-d", f"client_secret={client['secret']}")
    assert (status, json.loads(body)["error"]) == (401, "invalid_client")  # revoked during its grace
    deadline = time.monotonic() + 5 + 3  # PAYMENTS_REVOCATION_CHECK_SECONDS and a margin
    for t in (old["access_token"], new["access_token"]):
        while (answer := rest.get("/v1/payments", token=t)).status == 200:
            assert time.monotonic() < deadline, "a revoked client's token still works past the bound"
            time.sleep(0.2)
        assert answer.status == 401 and answer.error()[1] == "TOKEN_REVOKED"


def test_token_requests_are_limited_per_address_like_logins(any_stack, rest, admin_token):
    client = new_client(rest, admin_token, "payments.read")
    address = loopback_address()
    answers = []
    for _ in range(30):
        status, headers, body = curl(any_stack, "-d", "grant_type=client_credentials", "-d",
                                     f"client_id={client['client']['id']}", "-d", "client_secret=pmt_cs_wrong",
                                     address=address)
        answers.append((status, json.loads(body)["error"]))
        if status == 429:
            assert headers["retry-after"]
    assert answers[0] == (401, "invalid_client")
    assert (429, "slow_down") in answers


def test_the_lua_filter_never_fails_on_a_token_request(any_stack, rest, admin_token):
    """A Lua error is only logged and the request goes on half-handled (an earlier version lost the
    CORS marking that way): every token request above and these leave no script error in Envoy's log."""
    client = new_client(rest, admin_token, "payments.read")
    for args in (["-H", "Origin: https://docs.payments.example", "-d", "grant_type=client_credentials"],
                 ["-u", f"{client['client']['id']}:{client['secret']}", "-d", "grant_type=client_credentials"],
                 ["-X", "POST"], ["-H", "content-type: text/plain", "-d", "x"]):
        curl(any_stack, *args)
    status, headers, _ = curl(any_stack, "-H", "Origin: https://docs.payments.example", "-d",
                              "grant_type=client_credentials")
    assert headers.get("access-control-allow-origin") == "https://docs.payments.example"
    errors = [line for line in any_stack.envoy.log.read_text().splitlines() if "[lua]" in line]
    assert errors == []
