"""Oversized and malformed input through Envoy: always a 4xx in the one JSON error shape with a
message that says what is wrong; never a 5xx, never a hang (every request has a deadline).

Unknown JSON body fields are the one deliberate exception (ignored, proto3 JSON forward
compatibility; see tests/e2e/test_rest.py) and only have to stay away from 5xx here.
"""

from __future__ import annotations

import json
import select
import socket

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from tests.conftest import ALICE, rich_status
from tests.support import attacks
from tests.support.rest import Response

GOOD = b'{"email": "alice@example.com", "amount": "1250"}'
LIMIT = attacks.configured_body_limit()  # envoy.yaml: the buffer filter's max_request_bytes

# (name, method, path, raw body, expected status, words the message must contain)
CASES = [
    ("invalid JSON", "POST", "/v1/payments", b'{"email": ', 400, "body must be this method's request as JSON"),
    ("JSON array body", "POST", "/v1/payments", b"[1, 2]", 400, "body must be this method's request as JSON"),
    ("amount as words", "POST", "/v1/payments", b'{"email": "alice@example.com", "amount": "lots"}', 400, "amount"),
    ("amount as object", "POST", "/v1/payments", b'{"email": "alice@example.com", "amount": {}}', 400, "payment"),
    ("amount fractional", "POST", "/v1/payments", b'{"email": "alice@example.com", "amount": 1.5}', 400, "amount"),
    ("amount beyond int64", "POST", "/v1/payments",
     b'{"email": "alice@example.com", "amount": "99999999999999999999999"}', 400, "amount"),
    ("email as number", "POST", "/v1/payments", b'{"email": 5, "amount": "5"}', 400, "email"),
    ("unknown enum value", "POST", "/v1/payments",
     b'{"email": "alice@example.com", "amount": "5", "status": "PAID"}', 400, "status"),
    ("non-UTF-8 body", "POST", "/v1/payments",
     b'{"email": "alice@example.com", "amount": "5", "description": "\xff\xfe"}', 400, "UTF-8"),
    ("non-UTF-8 login body", "POST", "/v1/auth/login", b'{"email": "\xff", "password": "x"}', 400, "UTF-8"),
    ("non-UTF-8 path", "GET", "/v1/payments/%FF%FE", None, 400, "UTF-8"),
    ("non-UTF-8 query", "GET", "/v1/payments?email=%FF", None, 400, "UTF-8"),
    ("huge page size", "GET", "/v1/payments?page_size=1000000", None, 400, "page_size"),
    ("page size beyond int32", "GET", "/v1/payments?page_size=99999999999", None, 400, "page_size"),
    ("negative page size", "GET", "/v1/payments?page_size=-1", None, 400, "page_size"),
    ("page size as words", "GET", "/v1/payments?page_size=many", None, 400, "page_size"),
    ("forged page token", "GET", "/v1/payments?page_token=%25%25%25", None, 400, "page_token"),
    ("empty create body", "POST", "/v1/payments", b"", 400, "payment.email"),
    ("very long id", "GET", "/v1/payments/" + "a" * 4000, None, 400, "at most 2048 characters"),
]


@pytest.mark.parametrize("name, method, path, raw, status, words", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_gets_a_clear_4xx_json_error(edge, token_for, name, method, path, raw, status, words):
    r = edge.api.request(method, path, raw=raw, token=token_for(ALICE),
                         headers={"Content-Type": "application/json"} if raw is not None else None)
    assert r.status == status, (r.status, r.text[:500])
    code, reason, body = r.error()
    assert words.lower() in body["message"].lower(), body["message"]


def upload(port: int, path: str, token: str, size: int) -> Response:
    """POST a body of `size` bytes the way a careful client does: keep sending until the server
    answers, then read the answer. (Envoy answers 413 once it has seen more than the limit and
    closes the connection; a client that insists on sending all of it gets a reset instead.)"""
    chunk = b"x" * 16384
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: payments\r\nAuthorization: Bearer {token}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode())
        sent = 0
        try:
            while sent < size and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunk[: size - sent])
                sent += len(chunk)
        except OSError:  # the server closed its side after answering; the answer is still readable
            pass
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
            part = sock.recv(65536)
            if not part:
                break
            data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Response(int(lines[0].split()[1]), headers, body.decode())


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


@pytest.mark.parametrize("size", [LIMIT + 1024, 4 << 20], ids=["just over the limit", "megabytes"])
def test_a_body_over_the_limit_is_413_json(edge, token_for, size):
    r = upload(edge.envoy.port, "/v1/payments", token_for(ALICE), size)
    assert r.status == 413, r.text
    code, reason, body = r.error()
    assert (code, reason) == (3, "BODY_TOO_LARGE") and "too large" in body["message"]
    assert f"at most {LIMIT} bytes" in body["message"], "the answer must state the limit Envoy enforces"


def largest_bodies() -> dict[str, bytes]:
    """The largest bodies the API takes, as a client that escapes every non-ASCII character
    (json.dumps' default) writes them: 500-character descriptions of astral characters (12 bytes
    each escaped), a URL of 2,048 characters, a request_id of 64."""
    description = "\U0001F4B3" * 500
    return {
        "/v1/payments": json.dumps({"email": "alice@example.com", "amount": "1250", "currency": "IDR",
                                    "description": description, "request_id": "r" * 64}).encode(),
        "/v1/webhookEndpoints": json.dumps({"url": "https://shop.example.com/" + "h" * (2048 - 25),
                                            "event_types": ["payment.created", "payment.succeeded", "payment.failed",
                                                            "payment.deleted", "payment.restored"],
                                            "enabled": True, "description": description}).encode(),
    }


@pytest.mark.parametrize("path", list(largest_bodies()))
def test_the_largest_bodies_the_api_takes_are_under_the_limit(edge, token_for, path):
    body = largest_bodies()[path]
    print(f"\n{path}: {len(body)} bytes (limit {LIMIT})")
    r = edge.api.request("POST", path, raw=body, token=token_for(ALICE), headers={"Content-Type": "application/json"})
    assert r.status != 413, r.text
    if path == "/v1/payments":
        assert r.status == 200, r.text


def test_unknown_body_fields_never_5xx(edge, token_for):
    r = edge.api.request("POST", "/v1/payments", raw=b'{"email": "alice@example.com", "amount": "5", "bogus": {"x": 1}}',
                         token=token_for(ALICE), headers={"Content-Type": "application/json"})
    assert r.status == 200, r.text


def test_undecodable_grpc_request_is_invalid_argument_not_internal(edge, token_for):
    """Native gRPC clients get the same answer as REST ones for bytes that are not a message."""
    with grpc.insecure_channel(f"127.0.0.1:{edge.server.port}") as channel:
        call = channel.unary_unary("/payments.v1.PaymentService/GetPayment",
                                   request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        with pytest.raises(grpc.RpcError) as e:
            call(b"\x0a\x02\xff\xfe", metadata=(("authorization", f"Bearer {token_for(ALICE)}"),), timeout=10)
    code, info, bad = rich_status(e.value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and info.reason == "MALFORMED_REQUEST"
    assert "UTF-8" in e.value.details()


def test_the_server_is_still_fine_after_all_of_it(edge, token_for):
    r = edge.api.request("POST", "/v1/payments", raw=GOOD, token=token_for(ALICE),
                         headers={"Content-Type": "application/json"})
    assert r.status == 200, r.text
    assert edge.server.proc.poll() is None


def test_a_grpc_message_over_the_limit_is_refused_by_envoy(edge, token_for):
    """The buffer filter's limit holds for native gRPC too: the message is refused at Envoy (its
    413 becomes a gRPC status), before anything reaches the server."""
    request = pb.CreatePaymentRequest(payment=pb.Payment(email="alice@example.com", amount=1250, currency="IDR",
                                                         description="x" * LIMIT))
    with grpc.insecure_channel(f"127.0.0.1:{edge.envoy.port}") as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.PaymentServiceStub(channel).CreatePayment(
                request, metadata=(("authorization", f"Bearer {token_for(ALICE)}"),), timeout=10)
    print(f"\n{e.value.code()}: {e.value.details()!r}")
    assert e.value.code() == grpc.StatusCode.UNKNOWN and "Payload Too Large" in e.value.details()
