"""Where to get the pinned swagger-ui-dist tarball, and whether a downloaded one is it.

openapi/ui/package-lock.json pins the version and its sha512 (npm's `integrity`). `make setup` installs
it with `npm ci`; the Swagger UI image has no Node, so its build downloads the registry's tarball and
checks it against the same lock with this script. Standard library only.

Usage: python3 swagger_ui_dist.py url LOCK          prints the tarball's registry URL
       python3 swagger_ui_dist.py verify LOCK FILE  exits 1 unless FILE has the pinned sha512
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys

PACKAGE = "swagger-ui-dist"
REGISTRY = "https://registry.npmjs.org"


def pinned(lock_path: str) -> tuple[str, bytes]:
    with open(lock_path, encoding="utf-8") as f:
        entry = json.load(f)["packages"][f"node_modules/{PACKAGE}"]
    algorithm, _, digest = entry["integrity"].partition("-")
    if algorithm != "sha512":
        raise SystemExit(f"{PACKAGE}: expected a sha512 integrity, got {algorithm}")
    return entry["version"], base64.b64decode(digest)


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "url":
        version, _ = pinned(argv[2])
        print(f"{REGISTRY}/{PACKAGE}/-/{PACKAGE}-{version}.tgz")
        return 0
    if len(argv) >= 4 and argv[1] == "verify":
        _, digest = pinned(argv[2])
        with open(argv[3], "rb") as f:
            actual = hashlib.sha512(f.read()).digest()
        if actual != digest:
            print(f"{argv[3]}: sha512 differs from {argv[2]}", file=sys.stderr)
            return 1
        return 0
    print(__doc__.strip().split("\n\n")[-1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
