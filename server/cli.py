"""Operator commands: `python -m server.cli keys` creates a signing key pair (or adds one for a
rotation); `python -m server.cli create-admin EMAIL` creates or promotes an admin, reading the
password from PAYMENTS_ADMIN_PASSWORD or a prompt (never from the command line, where it would
land in shell history and process lists)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from server import config, storage, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="create the JWT signing key and add its public key to the JWKS")
    keys.add_argument("--if-missing", action="store_true", help="do nothing if the private key exists")
    admin = sub.add_parser("create-admin", help="create or promote an admin account")
    admin.add_argument("email")
    args = parser.parse_args(argv)
    settings = config.load()

    if args.command == "keys":
        key_file: Path = settings.jwt_private_key_file
        if args.if_missing and key_file.exists() and settings.jwks_file.exists():
            print(f"keys exist: {key_file}, {settings.jwks_file}")
            return 0
        kid = tokens.create_key_pair(key_file, settings.jwks_file)
        print(f"created signing key {kid}: {key_file} (private, keep secret), {settings.jwks_file} (public)")
        return 0

    password = os.environ.get("PAYMENTS_ADMIN_PASSWORD") or getpass.getpass("admin password: ")
    from server.accounts import Accounts

    storage.open_database(settings)
    issuer = tokens.TokenIssuer(tokens.load_private_key(settings.jwt_private_key_file), issuer=settings.jwt_issuer,
                                audience=settings.jwt_audience, ttl_seconds=settings.jwt_ttl_seconds)
    user = Accounts(issuer).ensure_admin(args.email, password)
    print(f"admin {user.email} ({user.id}) is ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
