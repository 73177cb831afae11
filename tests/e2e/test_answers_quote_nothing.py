"""No answer quotes a value the request carried. Envoy's transcoder words its refusals with the
request's own text (both values of a field given in the URL and the body, the JSON around a byte
that is not UTF-8); callers log error messages, so a password, refresh token or client secret
would land in their logs. Through the real Envoy with curl, on both databases: each of the routes
that carry secrets, refused every way the transcoder refuses, answers the field and the problem
and never the secret (nor the URL's value)."""

from __future__ import annotations

import json
import secrets
import subprocess

import pytest

from tests.e2e.test_clients_rest import curl
from tests.support.rest import loopback_address


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def any_stack(request):
    return request.getfixturevalue("stack" if request.param == "sqlite" else "pg_stack")


SECRET_FIELDS = {"/v1/auth/login": "password", "/v1/auth/register": "password", "/v1/auth/refresh": "refresh_token"}


def raw(stack, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    out = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", "20", "--interface",
                          loopback_address(), "-H", f"content-type: {content_type}", "--data-binary", "@-",
                          stack.url + path], input=body, capture_output=True, timeout=60)
    text, _, status = out.stdout.decode("utf-8", "replace").rpartition("\n")
    return int(status), text


def json_requests(field: str, secret: str, in_url: str) -> list[tuple[str, bytes, str | None]]:
    """(query, body, the field the answer should name or None): each refused by the transcoder."""
    body = {"email": "someone@example.com", field: secret}
    good = json.dumps(body).encode()
    return [
        (f"?{field}={in_url}", good, field),                                  # given twice
        ("", good[:-1], None),                                                # truncated JSON
        ("", good.replace(b'"someone', b'"some\xc3\x28one'), None),           # not UTF-8, beside the secret
        ("", json.dumps({**body, field: [secret]}).encode(), None),           # wrong type, holding the secret
        ("", json.dumps({**body, field: {"x": secret}}).encode(), field),
        (f"?x{field}={secret}", good, "x" + field),                           # not a field, holding the secret
        ("", good.replace(b"}", b", " + json.dumps(secret).encode() + b"}"), None),  # a value without a name
    ]


def test_the_person_routes_answer_the_field_and_never_the_value(any_stack):
    for path, field in SECRET_FIELDS.items():
        for query, body, named in json_requests(field, secret := "s3cr3t-" + secrets.token_hex(12),
                                                in_url := "u" + secrets.token_hex(8)):
            status, text = raw(any_stack, path + query, body)
            assert status == 400, (path, query, body, status, text)
            assert secret not in text and in_url not in text, (path, query, body, text)
            answer = json.loads(text)
            violations = [d for d in answer["details"] if d["@type"].endswith("BadRequest")][0]["field_violations"]
            assert [d["reason"] for d in answer["details"] if "reason" in d] == ["INVALID_REQUEST"]
            if named:
                assert violations[0]["field"] == named, (path, query, text)
            assert answer["message"] == f"{violations[0]['field']}: {violations[0]['description']}"


def test_the_token_endpoint_never_quotes_the_secret(any_stack):
    secret, cid = "pmt_cs_" + secrets.token_hex(26), "cli_" + "a" * 26
    in_url = "u" + secrets.token_hex(8)
    form = f"grant_type=client_credentials&client_id={cid}&client_secret={secret}"
    cases = [
        (["-d", form], f"?client_secret={in_url}"),
        (["-d", "grant_type=client_credentials", "-u", f"{cid}:{secret}"], f"?client_secret={in_url}"),
        (["-d", "grant_type=client_credentials", "-u", f"{cid}:{secret}"], f"?client_id={in_url}"),
        (["--data-binary", f"grant_type=client_credentials&client_id=%c3%28&client_secret={secret}"], ""),
        (["--data-binary", f"grant_type=client_credentials&client_id={cid}&client_secret={secret}%ff"], ""),
        (["--data-binary", f"grant_type=client_credentials&client_id={cid}%c3&client_secret={secret}"], ""),
        (["--data-binary", f"grant_type=%ff&client_id={cid}&client_secret={secret}"], ""),
    ]
    for args, query in cases:
        status, headers, body = curl(any_stack, *args, path="/oauth2/token" + query)
        assert status in (400, 401), (args, query, status, body)
        assert secret not in body and in_url not in body and secret not in json.dumps(headers), (args, query, body)
        answer = json.loads(body)
        assert set(answer) == {"error", "error_description"}, body
        assert "payments.v1" not in body and "^" not in body  # no internal type, no parser excerpt


def test_the_servers_own_refusals_never_quote_a_secret_either(any_stack):
    """What reaches the server and is refused there: a wrong password, a password too short or too
    long, an unknown refresh token, a wrong client secret, a secret with a control character."""
    marker = "s3cr3t" + secrets.token_hex(8)
    cases = [
        ("/v1/auth/login", {"email": "nobody@example.com", "password": marker}),
        ("/v1/auth/register", {"email": f"{marker[:8]}@example.com", "password": marker[:9]}),
        ("/v1/auth/register", {"email": "long@example.com", "password": marker * 200}),
        ("/v1/auth/register", {"email": "ctl@example.com", "password": marker + "\u0007"}),
        ("/v1/auth/refresh", {"refresh_token": "rt_" + marker}),
        ("/v1/auth/refresh", {"refresh_token": marker + "\u2028"}),
    ]
    for path, body in cases:
        status, text = raw(any_stack, path, json.dumps(body).encode())
        assert status in (400, 401, 409), (path, status, text)
        assert marker not in text and marker[:9] not in text, (path, text)
    for form in (f"grant_type=client_credentials&client_id=cli_{'a' * 26}&client_secret=pmt_cs_{marker}",
                 f"grant_type=client_credentials&client_id=cli_{'a' * 26}&client_secret={marker}%07",
                 f"grant_type=password&client_id=cli_{'a' * 26}&client_secret={marker}"):
        status, _, body = curl(any_stack, "--data-binary", form)
        assert status in (400, 401) and marker not in body, (form, body)
