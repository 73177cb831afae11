"""Running envoy/envoy.yaml on other ports.

The file is the one deployed everywhere, with fixed ports (8080 API, 9901 admin, 9902 metrics,
50051 to 50054 the server's processes). Tests run next to `make run` and each other, so they substitute exactly
those port numbers, and list only the server ports that a process of theirs listens on (another
test's server may be on the next port); test_envoy_config.py proves that is the only difference.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "envoy" / "envoy.yaml"

# The literal text of each port in envoy.yaml; each must occur exactly once.
LISTEN = "port_value: 8080}"
ADMIN = "port_value: 9901}"
METRICS = "port_value: 9902}"
ADMIN_UPSTREAM = "{port_value: 9901, address: 127.0.0.1}"  # the metrics listener's way to the admin port
BACKENDS = tuple(f"port_value: {50051 + i}}}" for i in range(4))
ENDPOINT = "        - endpoint:\n            address:\n              socket_address: {{address: 127.0.0.1, {port}\n"


# The API's and the metrics' listener addresses: all interfaces, as a container needs.
LISTEN_ADDRESS = "{address: 0.0.0.0, port_value: 8080}"
METRICS_ADDRESS = "{address: 0.0.0.0, port_value: 9902}"


# Where Envoy fetches Google's keys (jwt_authn's google provider): the tests put a local stand-in
# (plain HTTP on loopback) in its place; each must occur exactly once.
GOOGLE_JWKS_URI = "uri: https://www.googleapis.com/oauth2/v3/certs\n"
GOOGLE_JWKS_ADDRESS = "socket_address: {address: www.googleapis.com, port_value: 443}\n"
GOOGLE_JWKS_TLS = """    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: www.googleapis.com
        common_tls_context:
          validation_context:
            trusted_ca: {filename: /etc/ssl/certs/ca-certificates.crt}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {exact: www.googleapis.com}
"""


def with_google_keys_at(text: str, url: str) -> str:
    """envoy.yaml fetching Google's keys from `url` (http://127.0.0.1:<port>/...) instead."""
    port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    for needle in (GOOGLE_JWKS_URI, GOOGLE_JWKS_ADDRESS, GOOGLE_JWKS_TLS):
        if text.count(needle) != 1:
            raise ValueError(f"envoy.yaml must contain {needle.strip()!r} exactly once")
    return (text.replace(GOOGLE_JWKS_URI, f"uri: {url}\n")
            .replace(GOOGLE_JWKS_ADDRESS, f"socket_address: {{address: 127.0.0.1, port_value: {port}}}\n")
            .replace(GOOGLE_JWKS_TLS, ""))


def render(text: str, *, listen_port: int, admin_port: int, backend_port: int | list[int],
           metrics_port: int = 0, loopback_only: bool = False) -> str:
    """The ports substituted (`backend_port`: the server's, one per process, at most four;
    `admin_port` must be a real port, not 0: the metrics listener forwards to it); with
    `loopback_only`, the API and metrics listeners on 127.0.0.1 instead of all interfaces (make
    run: a dev stack is nobody else's business on the LAN)."""
    if not admin_port:
        raise ValueError("admin_port must be a port number: the metrics listener forwards to it")
    ports = [backend_port] if isinstance(backend_port, int) else list(backend_port)
    if not 1 <= len(ports) <= len(BACKENDS):
        raise ValueError(f"one to {len(BACKENDS)} server ports, got {ports}")
    endpoints = [ENDPOINT.format(port=needle) for needle in BACKENDS]
    for endpoint in endpoints:  # all found before any is replaced: a new port may be an old one's number
        if text.count(endpoint) != 1:
            raise ValueError(f"envoy.yaml must contain the endpoint {endpoint.strip()!r} exactly once")
    listed = "".join(endpoints)
    if text.count(listed) != 1:
        raise ValueError("envoy.yaml must list its server endpoints together, in order")
    text = text.replace(listed, "".join(ENDPOINT.format(port=f"port_value: {port}}}") for port in ports))
    if loopback_only:
        for address in (LISTEN_ADDRESS, METRICS_ADDRESS):
            if text.count(address) != 1:
                raise ValueError(f"envoy.yaml must contain {address!r} exactly once")
            text = text.replace(address, address.replace("0.0.0.0", "127.0.0.1"))
    if text.count(ADMIN_UPSTREAM) != 1:
        raise ValueError(f"envoy.yaml must contain {ADMIN_UPSTREAM!r} exactly once")
    text = text.replace(ADMIN_UPSTREAM, ADMIN_UPSTREAM.replace("9901", str(admin_port)))
    for needle, port in ((LISTEN, listen_port), (ADMIN, admin_port), (METRICS, metrics_port)):
        if text.count(needle) != 1:
            raise ValueError(f"envoy.yaml must contain {needle!r} exactly once")
        text = text.replace(needle, f"port_value: {port}}}")
    return text
