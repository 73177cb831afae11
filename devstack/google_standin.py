"""A local stand-in for Google's side of service-account ID tokens: RS256 keys published as a JWKS
(as https://www.googleapis.com/oauth2/v3/certs is, with a Cache-Control max-age), tokens with the
claims Google's metadata server puts in a service account's ID token (format=full: iss, aud, azp,
sub, email, email_verified, iat, exp), and that metadata server's identity endpoint, which answers
only with `Metadata-Flavor: Google`. Keys can be rotated as Google rotates them."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import urllib.parse
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://accounts.google.com"
CERTS_PATH = "/oauth2/v3/certs"
IDENTITY_PATH = "/computeMetadata/v1/instance/service-accounts/default/identity"


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes((n.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


class ServiceAccount:
    def __init__(self, name: str, project: str = "shop-project"):
        self.email = f"{name}@{project}.iam.gserviceaccount.com"
        self.sub = str(100000000000000000000 + uuid.uuid4().int % 10 ** 20)  # 21 digits, as Google's are


class GoogleStandIn:
    def __init__(self, max_age: int = 3600):
        self.max_age = max_age
        self.keys: list[tuple[str, rsa.RSAPrivateKey]] = []
        self.cert_fetches = 0
        self.identity_requests: list[dict] = []
        self.workload: ServiceAccount | None = None  # whose token the metadata endpoint hands out
        self.rotate()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def certs_url(self) -> str:
        return self.url + CERTS_PATH

    @property
    def identity_url(self) -> str:
        return self.url + IDENTITY_PATH

    def rotate(self) -> str:
        """A new signing key, published beside the previous one (Google keeps two); its kid."""
        kid = uuid.uuid4().hex
        self.keys = [(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))] + self.keys[:1]
        return kid

    def jwks(self) -> dict:
        return {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid, "e": _b64(k.public_key().public_numbers().e),
                          "n": _b64(k.public_key().public_numbers().n)} for kid, k in self.keys]}

    def mint(self, account: ServiceAccount, audience: str, *, lifetime: int = 3600, issued: float | None = None,
             key: rsa.RSAPrivateKey | None = None, kid: str | None = None, **overrides) -> str:
        iat = int(time.time() if issued is None else issued)
        claims = {"aud": audience, "azp": account.sub, "email": account.email, "email_verified": True,
                  "exp": iat + lifetime, "iat": iat, "iss": ISSUER, "sub": account.sub, **overrides}
        claims = {k: v for k, v in claims.items() if v is not None}
        own_kid, own_key = self.keys[0]
        return jwt.encode(claims, key or own_key, algorithm="RS256", headers={"kid": kid or own_kid, "typ": "JWT"})

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        standin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path, _, query = self.path.partition("?")
                if path == CERTS_PATH:
                    standin.cert_fetches += 1
                    return self._send(200, json.dumps(standin.jwks()).encode(),
                                      {"Cache-Control": f"public, max-age={standin.max_age}"})
                if path == IDENTITY_PATH:
                    asked = dict(urllib.parse.parse_qsl(query))
                    standin.identity_requests.append({"query": asked, "flavor": self.headers.get("Metadata-Flavor")})
                    if self.headers.get("Metadata-Flavor") != "Google" or not asked.get("audience") or not standin.workload:
                        return self._send(403, b"Missing Metadata-Flavor:Google header.")
                    return self._send(200, standin.mint(standin.workload, asked["audience"]).encode())
                self._send(404, b"")

            def _send(self, status: int, body: bytes, headers: dict | None = None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler
