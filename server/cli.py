"""Operator commands: `python -m server.cli keys` creates a signing key pair (or adds one for a
rotation); `python -m server.cli create-admin EMAIL` creates or promotes an admin, reading the
password from PAYMENTS_ADMIN_PASSWORD or a prompt (never from the command line, where it would
land in shell history and process lists); `disable-account EMAIL` stops an account's logins and
ends its sessions; `revoke-sessions EMAIL` ends its sessions only (both reach running servers
within PAYMENTS_REVOCATION_CHECK_SECONDS)."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from server.infra import config, storage, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="create the JWT signing key and add its public key to the JWKS")
    keys.add_argument("--if-missing", action="store_true", help="do nothing if the private key exists")
    admin = sub.add_parser("create-admin", help="create or promote an admin account")
    admin.add_argument("email")
    for name, text in (("disable-account", "no more logins or refreshes for an account, and end its sessions"),
                       ("revoke-sessions", "end every session of an account (it can log in again)")):
        sub.add_parser(name, help=text).add_argument("email")
    args = parser.parse_args(argv)
    settings = config.load()

    if args.command in ("disable-account", "revoke-sessions"):
        from server.domain.accounts import Accounts
        from server.domain.errors import InvalidArgument
        from server.domain.sessions import Sessions

        storage.open_database(settings)
        accounts = Accounts(None, sessions=Sessions(settings.refresh_ttl_seconds))
        try:
            if args.command == "disable-account":
                user = accounts.disable(args.email)
                print(f"disabled {user.email} ({user.id}); its sessions are revoked")
            else:
                print(f"revoked {accounts.revoke_sessions(args.email)} session(s) of {args.email}")
        except InvalidArgument as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 1
        return 0

    if args.command == "keys":
        key_file: Path = settings.jwt_private_key_file
        if args.if_missing and key_file.exists() and settings.jwks_file.exists():
            print(f"keys exist: {key_file}, {settings.jwks_file}")
            return 0
        kid = tokens.create_key_pair(key_file, settings.jwks_file)
        print(f"created signing key {kid}: {key_file} (private, keep secret), {settings.jwks_file} (public)")
        return 0

    password = settings.admin_password or getpass.getpass("admin password: ")
    from server.domain.accounts import Accounts
    from server.domain.errors import InvalidArgument

    storage.open_database(settings)
    issuer = tokens.TokenIssuer.from_settings(settings)
    try:
        user = Accounts(issuer).ensure_admin(args.email, password)
    except InvalidArgument as e:  # one line naming what is wrong, not a traceback
        problems = "; ".join(f"{field} {why}" for field, why in e.violations)
        print(f"error: {problems or e.message}", file=sys.stderr)
        return 1
    print(f"admin {user.email} ({user.id}) is ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
