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

The store, the password hasher, the token issuer and the clock are ports (server/domain/ports.py)
the assembly hands over.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from server.domain import ports
from server.domain.errors import AlreadyExists, FailedPrecondition, InvalidArgument, Unauthenticated
from server.domain.login_throttle import LoginThrottle
from server.domain.caller import Caller
from server.domain.sessions import Grant, Sessions
from server.domain.ids import opaque_id
from server.domain.ports import AccountStore, Clock, PasswordHasher, TokenIssuer
from server.domain.records import AccountRecord, DuplicateEmail
from server.domain.validation import email_problem, normalize_email
from server.domain.caller import ADMIN, CUSTOMER, ROLES


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
    """`issuer` may be None where no login is made (the operator commands); `store` and
    `passwords`: the installed ones if None (server/domain/ports.py)."""

    def __init__(self, issuer: TokenIssuer | None, clock: Clock = lambda: dt.datetime.now(dt.UTC),
                 sessions: Sessions | None = None, *, store: AccountStore | None = None,
                 passwords: PasswordHasher | None = None):
        self.issuer = issuer
        self.clock = clock
        self.throttle = LoginThrottle()
        self.sessions = sessions or Sessions(30 * 24 * 3600, clock)
        self.store = store if store is not None else ports.default(AccountStore)
        self.passwords = passwords if passwords is not None else ports.default(PasswordHasher)

    def _validate(self, email: str, password: str, reason: str) -> str:
        email = normalize_email(email)
        violations = []
        if (why := email_problem(email)) is not None:
            violations.append(("email", why))
        if (why := self.passwords.problem(password)) is not None:
            violations.append(("password", why))
        if violations:
            raise InvalidArgument(violations, reason=reason)
        return email

    def register(self, email: str, password: str, role: str = CUSTOMER, client: str = "") -> AccountRecord:
        """A new account. `client`: the caller's address; its sign-ups count against it in the
        auth lane (LoginThrottle.failures), as its failed logins do: each costs a hash, and a
        person signs up once."""
        if client:
            self.throttle.signed_up(client)
        email = self._validate(email, password, "INVALID_REGISTRATION")
        user = AccountRecord(id=new_user_id(), email=email, password_hash=self.passwords.hash(password),
                             role=role, created_at=self.clock(), disabled_at=None)
        try:
            self.store.insert(user)
        except DuplicateEmail:
            raise AlreadyExists("that email is already registered", reason="EMAIL_TAKEN") from None
        return user

    def ensure_admin(self, email: str, password: str, *, promote_existing: bool = False) -> AccountRecord:
        """Create the admin, or give an existing admin this password (idempotent).

        An email a customer holds is refused (FailedPrecondition, EXISTING_CUSTOMER) unless
        `promote_existing`: whoever registered it first would otherwise become an admin. Promoted,
        it gets this password, and every session it had ends (so does every session of an admin
        whose password this changes)."""
        email = self._validate(email, password, "INVALID_ADMIN")
        existing = self.store.by_email(email)
        if existing is None:
            try:
                return self.register(email, password, role=ADMIN)
            except AlreadyExists:  # another replica bootstrapped it (or someone registered it) at this moment
                existing = self._existing(email)
        if existing.role != ADMIN:
            if not promote_existing:
                raise _existing_customer(email)
            self._change(existing, "promoted to admin", role=ADMIN, password_hash=self.passwords.hash(password))
        elif not self.passwords.verify(existing.password_hash, password):
            self._change(existing, "password reset", password_hash=self.passwords.hash(password))
        return self._reread(existing)

    def change_role(self, email: str, role: str, *, promote_existing: bool = False) -> AccountRecord:
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
        return self._reread(user)

    def reset_password(self, email: str, password: str) -> AccountRecord:
        """A new password for the account; every session it had ends."""
        if (why := self.passwords.problem(password)) is not None:
            raise InvalidArgument([("password", why)], reason="INVALID_PASSWORD")
        user = self._account(email)
        self._change(user, "password reset", password_hash=self.passwords.hash(password))
        return self._reread(user)

    def _change(self, user: AccountRecord, why: str, **columns) -> None:
        """Change the account and end all its sessions, in one transaction."""
        with self.store.write_transaction():
            self.store.update(user.id, **columns)
            self.sessions.revoke_user(user.id, why)

    def login(self, email: str, password: str, client: str = "") -> Login:
        """A session for the right password. `client`: the caller's address, which the throttle
        counts failures by (with the email): a guesser elsewhere never holds up the owner."""
        email = normalize_email(email)
        # Before the hash, and counted at once: a refused attempt costs nothing, and concurrent
        # guesses cannot all pass before the first failure is counted.
        attempt = self.throttle.attempt(email, client)
        user = self.store.by_email(email) if email else None
        # A disabled account is verified as an unknown email is (the dummy hash, every time): a
        # right password remembered for it (RememberingPasswords) would answer sooner, and tell.
        live = user is not None and user.disabled_at is None
        ok = self.passwords.verify(user.password_hash if live else None, password)
        # A disabled account gets the same answer as a wrong password: nothing to learn from it.
        if not ok or not live:
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

    def disable(self, email: str) -> AccountRecord:
        """Operators: no more logins or refreshes, and every session ends (server/cli.py)."""
        user = self._account(email)
        self._change(user, "account disabled", disabled_at=self.clock())
        return user

    def revoke_sessions(self, email: str) -> int:
        return self.sessions.revoke_user(self._account(email).id, "revoked by an operator")

    def _account(self, email: str) -> AccountRecord:
        user = self.store.by_email(normalize_email(email))
        if user is None:
            raise InvalidArgument([("email", "no account has this email")], reason="NO_ACCOUNT")
        return user

    def _existing(self, email: str) -> AccountRecord:
        """An account that must exist (its insert just lost to another's)."""
        user = self.store.by_email(email)
        if user is None:
            raise LookupError(f"no account {email}, yet its insert found the email taken")
        return user

    def _reread(self, user: AccountRecord) -> AccountRecord:
        """The account as it is now, after a change."""
        now = self.store.by_id(user.id)
        if now is None:
            raise LookupError(f"account {user.id} is gone")
        return now
