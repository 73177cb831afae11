"""Account rules: registering customers, bootstrapping admins, and logging in.

No gRPC here. Login failures say the same thing, and cost one password verification, whether
or not the email exists, so the API cannot be used to find out who has an account.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Callable

import peewee

from server.infra import passwords
from server.domain.errors import AlreadyExists, InvalidArgument, Unauthenticated
from server.domain.login_throttle import LoginThrottle
from server.domain.caller import Caller
from server.domain.sessions import Grant, Sessions
from server.domain.ids import opaque_id
from server.domain.validation import email_problem, normalize_email
from server.domain.caller import ADMIN, CUSTOMER
from server.infra.storage import User, db
from server.infra.tokens import TokenIssuer


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

    def ensure_admin(self, email: str, password: str) -> User:
        """Create the admin, or make an existing account admin with this password (idempotent)."""
        email = self._validate(email, password, "INVALID_ADMIN")
        existing = User.get_or_none(User.email == email)
        if existing is None:
            try:
                return self.register(email, password, role=ADMIN)
            except AlreadyExists:  # another replica bootstrapped it at the same moment
                existing = User.get(User.email == email)
        if existing.role != ADMIN or not passwords.verify_password(existing.password_hash, password):
            User.update(role=ADMIN, password_hash=passwords.hash_password(password)).where(User.id == existing.id).execute()
        return User.get_by_id(existing.id)

    def login(self, email: str, password: str) -> Login:
        email = normalize_email(email)
        now = self.clock()
        self.throttle.check(email, now)  # before the hash: a refused attempt costs nothing
        user = User.get_or_none(User.email == email) if email else None
        ok = passwords.verify_password(user.password_hash if user else None, password)
        # A disabled account gets the same answer as a wrong password: nothing to learn from it.
        if not ok or user is None or user.disabled_at is not None:
            self.throttle.failed(email, now)
            raise Unauthenticated("wrong email or password", reason="BAD_CREDENTIALS")
        self.throttle.succeeded(email)
        return self._login(self.sessions.start(user))

    def refresh(self, refresh_token: str) -> Login:
        """A new access token and refresh token for a refresh token (which is then spent); the
        account's current role goes into the new access token."""
        return self._login(self.sessions.refresh(refresh_token))

    def logout(self, caller: Caller) -> None:
        self.sessions.revoke(caller.session_id, "logout")

    def _login(self, grant: Grant) -> Login:
        user = grant.user
        token = self.issuer.issue(subject=user.id, email=user.email, role=user.role, session_id=grant.session_id)
        return Login(access_token=token, expires_in=self.issuer.ttl_seconds, refresh_token=grant.refresh_token,
                     refresh_expires_in=grant.refresh_expires_in)

    def disable(self, email: str) -> User:
        """Operators: no more logins or refreshes, and every session ends (server/cli.py)."""
        user = self._account(email)
        User.update(disabled_at=self.clock()).where(User.id == user.id).execute()
        self.sessions.revoke_user(user.id, "account disabled")
        return user

    def revoke_sessions(self, email: str) -> int:
        return self.sessions.revoke_user(self._account(email).id, "revoked by an operator")

    @staticmethod
    def _account(email: str) -> User:
        user = User.get_or_none(User.email == normalize_email(email))
        if user is None:
            raise InvalidArgument([("email", "no account has this email")], reason="NO_ACCOUNT")
        return user
