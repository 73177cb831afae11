"""Requests Envoy will not serve as they are still get an answer a client can read.

- A 10 MB REST body (Content-Length or chunked), on a route that needs a token and on one that
  does not: 413 JSON `BODY_TOO_LARGE`, readable by a client that is still sending (the answer
  arrives, and the connection is not reset under it), not a bare connection reset.
- HTTP/1.0 (old tools, some health checkers): served like HTTP/1.1, or, where the request cannot
  be served, an error in the JSON shape that says why; never 426 Upgrade Required.
"""

from __future__ import annotations

import selectors
import socket
import time

import pytest

from tests.conftest import ALICE
from tests.support import attacks
from tests.support.rest import Response

BIG = 10 * 1024 * 1024
CHUNK = 64 * 1024


def send_while_reading(port: int, head: bytes, body_size: int, chunked: bool = False,
                       timeout: float = 20.0) -> tuple[Response | None, int, str | None]:
    """Send `head` and a body of `body_size` bytes while reading the answer, as curl does; stop
    sending once a whole answer is in. Returns (the answer or None, bytes of body sent, the error
    that ended the exchange, if any)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    pending = bytearray(head)
    left, sent_body, received, error = body_size, 0, bytearray(), None
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while time.monotonic() < deadline:
                if not pending and left > 0:
                    n = min(CHUNK, left)
                    pending += (f"{n:x}\r\n".encode() + b"x" * n + b"\r\n") if chunked else b"x" * n
                    left -= n
                    if chunked and left == 0:
                        pending += b"0\r\n\r\n"
                    sent_body += n
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0)
                sel.modify(sock, want)
                for _, mask in sel.select(0.5):
                    if mask & selectors.EVENT_READ:
                        try:
                            data = sock.recv(65536)
                        except OSError as e:
                            error = f"reading: {e}"
                            data = b""
                        if not data:
                            return _answer(received), sent_body, error or ("closed" if not _answer(received) else None)
                        received += data
                        answer = _answer(received)
                        if answer is not None and complete(answer):
                            return answer, sent_body, None
                    if mask & selectors.EVENT_WRITE and pending:
                        try:
                            n = sock.send(pending)
                            del pending[:n]
                        except BlockingIOError:
                            pass
                        except OSError as e:  # Envoy stopped reading; the answer may still be there
                            error = f"sending: {e}"
                            pending.clear()
                            left = 0
        return _answer(received), sent_body, error or "timed out"
    finally:
        sock.close()


def complete(answer: Response) -> bool:
    return len(answer.text.encode()) >= int(answer.headers.get("content-length", -1))


def _answer(data: bytes) -> Response | None:
    parsed = attacks.parse_http_response(data)
    if parsed is None:
        return None
    status, headers, body = parsed
    return Response(status, headers, body.decode(errors="replace"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path,needs_token", [("/v1/payments", True), ("/v1/auth/login", False)])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_ten_megabyte_body_gets_a_readable_413(edge, token_for, path, needs_token, chunked):
    port = edge.envoy.port
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            + (f"Authorization: Bearer {token_for(ALICE)}\r\n" if needs_token else "")
            + ("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {BIG}\r\n") + "\r\n").encode()
    answer, sent, error = send_while_reading(port, head, BIG, chunked)
    print(f"\n{path} ({'chunked' if chunked else 'content-length'}): answer "
          f"{answer.status if answer else None} after {sent / 1024 / 1024:.1f} MB sent; ended by {error}; "
          f"{answer.text[:160] if answer else ''}")
    assert answer is not None, f"no answer, only {error}"
    assert answer.status == 413, answer.text
    code, reason, _ = answer.error()
    assert (code, reason) == (3, "BODY_TOO_LARGE"), answer.text
    assert edge.api.get("/ready").status == 200


def http10(port: int, request: bytes) -> Response | None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):  # HTTP/1.0: the answer ends with the connection
            data += chunk
    return _answer(data)


def test_http_1_0_is_served_like_http_1_1(edge, token_for):
    port, token = edge.envoy.port, token_for(ALICE)
    ready = http10(port, f"GET /ready HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    listed = http10(port, f"GET /v1/payments?page_size=1 HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
                          f"Authorization: Bearer {token}\r\n\r\n".encode())
    body = b'{"email": "nobody@example.com", "password": "not the password"}'
    login = http10(port, f"POST /v1/auth/login HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    print(f"\nHTTP/1.0: /ready {ready and ready.status}, list {listed and listed.status}, "
          f"login {login and login.status}")
    assert ready is not None and ready.status == 200, ready
    assert listed is not None and listed.status == 200, listed
    assert isinstance(listed.json, dict)
    assert login is not None and login.status == 401, login
    assert login.error()[:2] == (16, "BAD_CREDENTIALS"), login.text


def test_http_1_0_without_a_host_gets_a_clear_answer(edge, token_for):
    """HTTP/1.0 has no Host header: the request is served, or refused with a JSON error that says
    what is wrong, never 426 Upgrade Required nor an error that explains nothing."""
    port = edge.envoy.port
    answers = {
        "ready": http10(port, b"GET /ready HTTP/1.0\r\n\r\n"),
        "list": http10(port, f"GET /v1/payments?page_size=1 HTTP/1.0\r\nAuthorization: Bearer {token_for(ALICE)}"
                             f"\r\n\r\n".encode()),
    }
    for name, answer in answers.items():
        print(f"\nHTTP/1.0 without Host, {name}: {answer and answer.status} {answer and answer.text[:200]}")
        assert answer is not None, name
        assert answer.status != 426, (name, answer.text)
        if answer.status != 200:
            code, reason, body = answer.error()
            said = body["message"].split(":", 1)[-1].strip()
            assert said, f"{name}: {answer.status} {reason} says nothing of what is wrong: {body['message']!r}"
