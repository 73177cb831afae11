"""Operator commands: `python -m server.cli keys` creates a signing key pair (or adds one for a
rotation); `python -m server.cli create-admin EMAIL` creates an admin, or gives an existing admin
a new password, reading the password from PAYMENTS_ADMIN_PASSWORD or a prompt (never from the
command line, where it would land in shell history and process lists); an email a customer holds
is refused unless `--promote-existing` says to make that account an admin (sign-up is open, so
whoever registered the email first would get admin rights otherwise); `set-role EMAIL ROLE`
changes an account's role (promoting a customer also needs `--promote-existing`);
`disable-account EMAIL` stops an account's logins; `revoke-sessions EMAIL` ends its sessions only.
A promotion, a role change, a new password and disabling all end every session of the account,
in the same transaction; running servers refuse its tokens within
PAYMENTS_REVOCATION_CHECK_SECONDS."""

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
    admin = sub.add_parser("create-admin", help="create an admin account (or set an existing admin's password)")
    admin.add_argument("email")
    admin.add_argument("--promote-existing", action="store_true",
                       help="if a customer holds the email, make that account an admin (its password is "
                            "replaced and its sessions end)")
    role = sub.add_parser("set-role", help="change an account's role (its sessions end)")
    role.add_argument("email")
    role.add_argument("role", choices=["customer", "admin"])
    role.add_argument("--promote-existing", action="store_true",
                      help="needed to make a customer an admin: it keeps the password whoever registered it chose")
    for name, text in (("disable-account", "no more logins or refreshes for an account, and end its sessions"),
                       ("revoke-sessions", "end every session of an account (it can log in again)")):
        sub.add_parser(name, help=text).add_argument("email")
    args = parser.parse_args(argv)
    settings = config.load()

    if args.command in ("disable-account", "revoke-sessions", "set-role"):
        from server.domain.errors import InvalidArgument

        storage.open_database(settings)
        accounts = _accounts(settings, None)
        try:
            if args.command == "disable-account":
                user = accounts.disable(args.email)
                print(f"disabled {user.email} ({user.id}); its sessions are revoked")
            elif args.command == "set-role":
                return _set_role(accounts, args)
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
    from server.domain.errors import FailedPrecondition, InvalidArgument

    storage.open_database(settings)
    accounts = _accounts(settings, tokens.TokenIssuer.from_settings(settings))
    try:
        user = accounts.ensure_admin(args.email, password, promote_existing=args.promote_existing)
    except InvalidArgument as e:  # one line naming what is wrong, not a traceback
        problems = "; ".join(f"{field} {why}" for field, why in e.violations)
        print(f"error: {problems or e.message}", file=sys.stderr)
        return 1
    except FailedPrecondition:
        from server.domain.validation import normalize_email

        print(_EXISTING_CUSTOMER.format(email=normalize_email(args.email),
                                        effect="its password is replaced by the one given here"), file=sys.stderr)
        return 1
    print(f"admin {user.email} ({user.id}) is ready" + _disabled_note(user))
    return 0


_EXISTING_CUSTOMER = (
    "error: {email} is an existing customer account. Anyone can sign up, and emails are not verified, so it "
    "may have been registered by someone else before you; making it an admin would give that person admin "
    "rights.\n"
    "If you are sure the account is yours, run the same command with --promote-existing: it becomes an admin, "
    "{effect}, and every session it had ends. Otherwise choose another email.")


def _accounts(settings, issuer):
    """The account rules on the opened database, each port handed over as the server's assembly
    does (the same clock too: the database's time on PostgreSQL)."""
    from server.domain.accounts import Accounts
    from server.domain.sessions import Sessions
    from server.infra import clock as clocks
    from server.infra import passwords

    clock = clocks.for_database(storage.db.obj)
    return Accounts(issuer, clock,
                    sessions=Sessions(settings.refresh_ttl_seconds, clock, store=storage.SessionQueries()),
                    store=storage.AccountQueries(), passwords=passwords.Argon2Passwords())


def _set_role(accounts, args) -> int:
    from server.domain.caller import ADMIN
    from server.domain.errors import FailedPrecondition
    from server.domain.validation import normalize_email

    try:
        user = accounts.change_role(args.email, args.role, promote_existing=args.promote_existing)
    except FailedPrecondition:
        print(_EXISTING_CUSTOMER.format(email=normalize_email(args.email),
                                        effect="it keeps the password whoever registered it chose"), file=sys.stderr)
        return 1
    print(f"{user.email} ({user.id}) is {'an' if user.role == ADMIN else 'a'} {user.role}; its sessions are revoked"
          + _disabled_note(user))
    return 0


def _disabled_note(user) -> str:
    return " (the account is disabled: it cannot log in)" if user.disabled_at is not None else ""


if __name__ == "__main__":
    sys.exit(main())
