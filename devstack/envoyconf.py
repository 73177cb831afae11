"""Running envoy/envoy.yaml on other ports.

The file is the one deployed everywhere, with fixed ports (8080 API, 9901 admin, 50051 to 50054
the server's processes). Tests run next to `make run` and each other, so they substitute exactly
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
BACKENDS = tuple(f"port_value: {50051 + i}}}" for i in range(4))
ENDPOINT = "        - endpoint:\n            address:\n              socket_address: {{address: 127.0.0.1, {port}\n"


# The API listener's address: all interfaces, as a container needs.
LISTEN_ADDRESS = "{address: 0.0.0.0, port_value: 8080}"


def render(text: str, *, listen_port: int, admin_port: int, backend_port: int | list[int],
           loopback_only: bool = False) -> str:
    """The ports substituted (`backend_port`: the server's, one per process, at most four); with
    `loopback_only`, the API listener on 127.0.0.1 instead of all interfaces (make run: a dev
    stack, with a dev admin, is nobody else's business on the LAN)."""
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
        if text.count(LISTEN_ADDRESS) != 1:
            raise ValueError(f"envoy.yaml must contain {LISTEN_ADDRESS!r} exactly once")
        text = text.replace(LISTEN_ADDRESS, "{address: 127.0.0.1, port_value: 8080}")
    for needle, port in ((LISTEN, listen_port), (ADMIN, admin_port)):
        if text.count(needle) != 1:
            raise ValueError(f"envoy.yaml must contain {needle!r} exactly once")
        text = text.replace(needle, f"port_value: {port}}}")
    return text
