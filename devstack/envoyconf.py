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


def render(text: str, *, listen_port: int, admin_port: int, backend_port: int) -> str:
    for needle, port in ((LISTEN, listen_port), (ADMIN, admin_port), (BACKEND, backend_port)):
        if text.count(needle) != 1:
            raise ValueError(f"envoy.yaml must contain {needle!r} exactly once")
        text = text.replace(needle, f"port_value: {port}}}")
    return text
