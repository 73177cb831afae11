"""Copy the OpenAPI document with `host` and `schemes` set to where browsers reach the API.

The committed document names no host, so Swagger UI would send "Try it out" calls to the origin
that served the page. The Swagger UI containers (docker compose, Kubernetes) are served from their
own origin, so this writes the copy they serve: API_HOST is host[:port] of the API as the browser
sees it, API_SCHEME is http (default) or https. Standard library only: it runs in the server image.

Usage: API_HOST=localhost:8080 python scripts/openapi_host.py SOURCE DEST
"""

from __future__ import annotations

import json
import os
import re
import sys

HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    host = os.environ.get("API_HOST", "").strip()
    scheme = os.environ.get("API_SCHEME", "http").strip() or "http"
    if not HOST.match(host):
        print(f"API_HOST must be host[:port], got {host!r}", file=sys.stderr)
        return 2
    if scheme not in ("http", "https"):
        print(f"API_SCHEME must be http or https, got {scheme!r}", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as f:
        document = json.load(f)
    document["host"] = host
    document["schemes"] = [scheme]
    tmp = argv[2] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2)
    os.replace(tmp, argv[2])
    print(f"wrote {argv[2]}: API at {scheme}://{host}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
