"""Account rules: registering customers, bootstrapping admins, logging in, and the operators'
changes to an account.

No gRPC here. Login failures say the same thing, and cost one password verification, whether
or not the email exists, so the API cannot be used to find out who has an account.

Every change to an account's privileges - its role, its password, disabling it - ends every
session of the account in the transaction that makes the change, so no token minted before it
(and no refresh of one) carries rights the account no longer has: every process refuses them
within the session check's bound (server/domain/sessions.py). Sign-up is open and emails are
unverified, so an account an operator did not create is never made an admin silently:
`ensure_admin` refuses an email a customer holds unless told `promote_existing`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Callable

import peewee

from server.infra import passwords
from server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unauthenticated
from server.domain.login_throttle import LoginThrottle
from server.domain.caller import Caller
from server.domain.sessions import Grant, Sessions
from server.domain.ids import opaque_id
from server.domain.validation import email_problem, normalize_email
from server.domain.caller import ADMIN, CUSTOMER, ROLES
from server.infra.storage import User, db, write_transaction
from server.infra.tokens import TokenIssuer


def _existing_customer(email: str) -> FailedPrecondition:
    return FailedPrecondition(f"{email} is an existing customer account, registered by whoever signed up with "
                              "that email first; making it an admin would give them admin rights",
                              reason="EXISTING_CUSTOMER")


def new_user_id() -> str:
    return opaque_id("usr_")


@dataclasses.dataclass(frozen=True)
class Login:
    access_token: str
    expires_in: int
    refresh_token: str = ""
    refresh_expires_in: int = 0


class Accounts:
    def __init__(self, issuer: TokenIssuer, clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 sessions: Sessions | None = None):
        self.issuer = issuer
        self.clock = clock
        self.throttle = LoginThrottle()
        self.sessions = sessions or Sessions(30 * 24 * 3600, clock)

    @staticmethod
    def _validate(email: str, password: str, reason: str) -> str:
        email = normalize_email(email)
        violations = []
        if (why := email_problem(email)) is not None:
            violations.append(("email", why))
        if (why := passwords.password_problem(password)) is not None:
            violations.append(("password", why))
        if violations:
            raise InvalidArgument(violations, reason=reason)
        return email

    def register(self, email: str, password: str, role: str = CUSTOMER) -> User:
        email = self._validate(email, password, "INVALID_REGISTRATION")
        user = User(id=new_user_id(), email=email, password_hash=passwords.hash_password(password),
                    role=role, created_at=self.clock())
        try:
            with db.atomic():
                user.save(force_insert=True)
        except peewee.IntegrityError:
            raise AlreadyExists("that email is already registered", reason="EMAIL_TAKEN") from None
        return user

    def ensure_admin(self, email: str, password: str, *, promote_existing: bool = False) -> User:
        """Create the admin, or give an existing admin this password (idempotent).

        An email a customer holds is refused (FailedPrecondition, EXISTING_CUSTOMER) unless
        `promote_existing`: whoever registered it first would otherwise become an admin. Promoted,
        it gets this password, and every session it had ends (so does every session of an admin
        whose password this changes)."""
        email = self._validate(email, password, "INVALID_ADMIN")
        existing = User.get_or_none(User.email == email)
        if existing is None:
            try:
                return self.register(email, password, role=ADMIN)
            except AlreadyExists:  # another replica bootstrapped it (or someone registered it) at this moment
                existing = User.get(User.email == email)
        if existing.role != ADMIN:
            if not promote_existing:
                raise _existing_customer(email)
            self._change(existing, "promoted to admin", role=ADMIN, password_hash=passwords.hash_password(password))
        elif not passwords.verify_password(existing.password_hash, password):
            self._change(existing, "password reset", password_hash=passwords.hash_password(password))
        return User.get_by_id(existing.id)

    def change_role(self, email: str, role: str, *, promote_existing: bool = False) -> User:
        """Operators: the account's new role; every session it had ends (the next login carries the
        new role). No change, no revocation. Making a customer an admin needs `promote_existing`,
        as in ensure_admin (and it keeps the password whoever registered it chose)."""
        if role not in ROLES:
            raise InvalidArgument([("role", f"must be one of {', '.join(ROLES)}")], reason="INVALID_ROLE")
        user = self._account(email)
        if user.role != role:
            if role == ADMIN and not promote_existing:
                raise _existing_customer(user.email)
            self._change(user, f"role changed to {role}", role=role)
        return User.get_by_id(user.id)

    def reset_password(self, email: str, password: str) -> User:
        """A new password for the account; every session it had ends."""
        if (why := passwords.password_problem(password)) is not None:
            raise InvalidArgument([("password", why)], reason="INVALID_PASSWORD")
        user = self._account(email)
        self._change(user, "password reset", password_hash=passwords.hash_password(password))
        return User.get_by_id(user.id)

    def _change(self, user: User, why: str, **columns) -> None:
        """Change the account and end all its sessions, in one transaction."""
        with write_transaction():
            User.update(**columns).where(User.id == user.id).execute()
            self.sessions.revoke_user(user.id, why)

    def login(self, email: str, password: str, client: str = "") -> Login:
        """A session for the right password. `client`: the caller's address, which the throttle
        counts failures by (with the email): a guesser elsewhere never holds up the owner."""
        email = normalize_email(email)
        # Before the hash, and counted at once: a refused attempt costs nothing, and concurrent
        # guesses cannot all pass before the first failure is counted.
        attempt = self.throttle.attempt(email, client)
        user = User.get_or_none(User.email == email) if email else None
        ok = passwords.verify_password(user.password_hash if user else None, password)
        # A disabled account gets the same answer as a wrong password: nothing to learn from it.
        if not ok or user is None or user.disabled_at is not None:
            raise Unauthenticated("wrong email or password", reason="BAD_CREDENTIALS")
        self.throttle.succeeded(attempt)
        return self._login(self.sessions.start(user))

    def refresh(self, refresh_token: str) -> Login:
        """A new access token and refresh token for a refresh token (which is then spent). The
        access token carries the session's role, which is the account's (a session whose account
        changed role has ended)."""
        return self._login(self.sessions.refresh(refresh_token))

    def logout(self, caller: Caller) -> None:
        self.sessions.revoke(caller.session_id, "logout")

    def _login(self, grant: Grant) -> Login:
        token = self.issuer.issue(subject=grant.user_id, email=grant.email, role=grant.role,
                                  session_id=grant.session_id)
        return Login(access_token=token, expires_in=self.issuer.ttl_seconds, refresh_token=grant.refresh_token,
                     refresh_expires_in=grant.refresh_expires_in)

    def disable(self, email: str) -> User:
        """Operators: no more logins or refreshes, and every session ends (server/cli.py)."""
        user = self._account(email)
        self._change(user, "account disabled", disabled_at=self.clock())
        return user

    def revoke_sessions(self, email: str) -> int:
        return self.sessions.revoke_user(self._account(email).id, "revoked by an operator")

    @staticmethod
    def _account(email: str) -> User:
        user = User.get_or_none(User.email == normalize_email(email))
        if user is None:
            raise InvalidArgument([("email", "no account has this email")], reason="NO_ACCOUNT")
        return user
