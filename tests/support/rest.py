"""A small REST client for the tests (http.client: what the JSON API looks like on the wire)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import random
import ssl
from pathlib import Path
from urllib.parse import urlsplit


def loopback_address() -> str:
    """A random address of 127.0.0.0/8 (all of it is loopback on Linux): a client of its own to
    Envoy's per-address sign-up and login limits."""
    return f"127.{random.randrange(1, 255)}.{random.randrange(256)}.{random.randrange(1, 255)}"


@dataclasses.dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    text: str

    @property
    def json(self):
        return json.loads(self.text)

    def error(self) -> tuple[int, str, dict]:
        """(gRPC code, ErrorInfo reason, body) of an error in the one documented shape."""
        assert self.headers.get("content-type", "").startswith("application/json"), (self.status, self.headers, self.text)
        assert not [k for k in self.headers if k.startswith("grpc-")], self.headers
        body = self.json
        assert set(body) >= {"code", "message", "details"}, body
        assert isinstance(body["code"], int) and isinstance(body["message"], str) and body["message"], body
        infos = [d for d in body["details"] if d.get("@type") == "type.googleapis.com/google.rpc.ErrorInfo"]
        assert len(infos) == 1, body
        assert infos[0]["domain"] == "payments.v1", body
        return body["code"], infos[0]["reason"], body

    def violations(self) -> dict[str, str]:
        """field -> description from the google.rpc.BadRequest detail."""
        bad = [d for d in self.json["details"] if d.get("@type") == "type.googleapis.com/google.rpc.BadRequest"]
        assert len(bad) == 1, self.json
        return {v["field"]: v["description"] for v in bad[0]["field_violations"]}


class Client:
    """`source`: the local address requests come from (default: the kernel's choice, 127.0.0.1);
    `ca`: for an https base URL, the certificate that signed the server's (tests/support/tls.py)."""

    def __init__(self, base_url: str, source: str | None = None, ca: Path | None = None):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port
        self.source = source
        self.tls = ssl.create_default_context(cafile=str(ca)) if parts.scheme == "https" else None

    def from_address(self, source: str) -> "Client":
        client = Client(f"http://{self.host}:{self.port}", source)
        client.tls = self.tls
        return client

    def request(self, method: str, path: str, body=None, *, token: str | None = None,
                headers: dict[str, str] | None = None, raw: bytes | None = None) -> Response:
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        source = (self.source, 0) if self.source else None
        conn = (http.client.HTTPSConnection(self.host, self.port, timeout=15, source_address=source, context=self.tls)
                if self.tls else http.client.HTTPConnection(self.host, self.port, timeout=15, source_address=source))
        try:
            conn.request(method, path, body=data, headers=hdrs)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def delete(self, path, **kw):
        return self.request("DELETE", path, **kw)
