"""Running envoy/envoy.yaml on other ports.

The file is the one deployed everywhere, with fixed ports (8080 API, 9901 admin, 50051 the
server). Tests run next to `make run` and each other, so they substitute exactly those three
port numbers and nothing else; test_envoy_config.py proves that is the only difference.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "envoy" / "envoy.yaml"

# The literal text of each port in envoy.yaml; each must occur exactly once.
LISTEN = "port_value: 8080}"
ADMIN = "port_value: 9901}"
BACKEND = "port_value: 50051}"


# The API listener's address: all interfaces, as a container needs.
LISTEN_ADDRESS = "{address: 0.0.0.0, port_value: 8080}"


def render(text: str, *, listen_port: int, admin_port: int, backend_port: int, loopback_only: bool = False) -> str:
    """The ports substituted; with `loopback_only`, the API listener on 127.0.0.1 instead of all
    interfaces (make run: a dev stack, with a dev admin, is nobody else's business on the LAN)."""
    if loopback_only:
        if text.count(LISTEN_ADDRESS) != 1:
            raise ValueError(f"envoy.yaml must contain {LISTEN_ADDRESS!r} exactly once")
        text = text.replace(LISTEN_ADDRESS, "{address: 127.0.0.1, port_value: 8080}")
    for needle, port in ((LISTEN, listen_port), (ADMIN, admin_port), (BACKEND, backend_port)):
        if text.count(needle) != 1:
            raise ValueError(f"envoy.yaml must contain {needle!r} exactly once")
        text = text.replace(needle, f"port_value: {port}}}")
    return text
