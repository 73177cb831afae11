"""The ports the rules need, which the assembly (server/edge/app.py) fills with adapters: the
stores (server/infra/storage: PaymentQueries, AccountQueries, SessionQueries; or a test's fake),
the clock (server/infra/clock.py: the database's time where replicas share a database), the
password hasher (server/infra/passwords.py) and the token issuer (server/infra/tokens.py).

Nothing in server/domain imports peewee, grpc or server.infra (tests/unit/test_layers.py): what
the rules know of storage, hashing and signing is what these protocols name.
"""

from __future__ import annotations

import datetime as dt
from typing import Callable, ContextManager, Protocol, Sequence, TypeVar

from server.domain.records import (AccountRecord, ClientRecord, EventRecord, PaymentRecord, RefreshView,
                                   RefundRecord, SessionState)

Clock = Callable[[], dt.datetime]


class PaymentStore(Protocol):
    """Every question and change the payment rules put to storage, by name."""

    def transaction(self) -> ContextManager: ...

    def locked(self, payment_id: str) -> ContextManager[PaymentRecord | None]:
        """A transaction in which no other change of this payment can come between its read and its commit."""

    def live(self, payment_id: str, owner_id: str | None = None) -> PaymentRecord | None: ...

    def any(self, payment_id: str) -> PaymentRecord | None: ...

    def by_request_id(self, created_by: str, request_id: str) -> PaymentRecord | None: ...

    def account_id(self, email: str) -> str | None: ...

    def page(self, *, owner_id: str | None, status: str, email: str, after: tuple[dt.datetime, str] | None,
             show_deleted: bool, limit: int) -> list[PaymentRecord]: ...

    def events(self, payment_id: str, *, after_number: int | None, limit: int) -> list[EventRecord]: ...

    def last_event(self, payment_id: str, action: str) -> EventRecord | None: ...

    def due_for_expiry(self, now: dt.datetime, limit: int | None, resume: dict | None = None) -> list[str]: ...

    def due_for_purge(self, before: dt.datetime, limit: int, resume: dict | None = None) -> list[str]: ...

    def insert(self, payment: PaymentRecord) -> None:
        """Raises records.DuplicateRequest if its (created_by, request_id) pair is taken."""

    def create(self, payment: PaymentRecord, event: dict) -> bool:
        """The payment and its history event in one transaction of their own; False, with nothing
        written, if its (created_by, request_id) pair is taken."""

    def insert_events(self, events: Sequence[dict]) -> None: ...

    def leave_pending(self, payment_id: str, status: str, reason: str | None, now: dt.datetime) -> bool: ...

    def soft_delete(self, payment_id: str, now: dt.datetime) -> tuple[str, str | None] | None: ...

    def undelete(self, payment_id: str, now: dt.datetime) -> tuple[str, str | None] | None: ...

    def expire(self, ids: Sequence[str], now: dt.datetime) -> list[str]: ...

    def purge(self, ids: Sequence[str], before: dt.datetime) -> list[str]: ...

    # --- refunds (server/domain/refunds.py) ---

    def refund_by_request_id(self, created_by: str, request_id: str) -> RefundRecord | None: ...

    def refund(self, payment_id: str, refund_id: str) -> RefundRecord | None: ...

    def refunds(self, payment_id: str, *, after_total: int | None, limit: int) -> list[RefundRecord]: ...

    def add_refunded(self, payment_id: str, amount: int, currency: str, expected: int | None,
                     now: dt.datetime) -> PaymentRecord | None:
        """One conditional UPDATE: the payment after it, or None if it is not a live success payment
        in `currency` with room for `amount` (and refunded `expected`, if given)."""

    def insert_refund(self, refund: RefundRecord) -> None:
        """Raises records.DuplicateRequest if its (created_by, request_id) pair is taken."""


class ClientStore(Protocol):
    """What the service client rules (server/domain/clients.py) ask of storage."""

    def insert(self, client: ClientRecord) -> None: ...

    def get(self, client_id: str) -> ClientRecord | None: ...

    def state(self, client_id: str) -> ClientRecord | None:
        """get(), for the check on every call (the store may hand its connection back at once)."""

    def page(self, *, after: tuple[dt.datetime, str] | None, limit: int) -> list[ClientRecord]:
        """Newest first, after (created_at, id)."""

    def rotate(self, client_id: str, secret_hash: str, secret_prefix: str,
               previous_until: dt.datetime | None, tokens_valid_after: dt.datetime | None = None) -> bool:
        """`tokens_valid_after` given: stored too (None leaves the stored one as it is)."""

    def set_expiry(self, client_id: str, expires_at: dt.datetime | None) -> bool: ...

    def revoke(self, client_id: str, now: dt.datetime) -> bool: ...

    def used(self, client_id: str, now: dt.datetime) -> None: ...


class AccountStore(Protocol):
    """What the account rules ask of storage."""

    def write_transaction(self) -> ContextManager:
        """A transaction that holds the write lock from its start (an account change and the end of
        its sessions commit together)."""

    def by_email(self, email: str) -> AccountRecord | None: ...

    def by_id(self, user_id: str) -> AccountRecord | None: ...

    def insert(self, account: AccountRecord) -> None:
        """In a transaction of its own. Raises records.DuplicateEmail if the email is taken."""

    def update(self, user_id: str, **columns) -> None:
        """Set these AccountRecord fields of the account (role, password_hash, disabled_at)."""


class SessionStore(Protocol):
    """What the session rules and the session check ask of storage. Times are the rules' clock's."""

    # What the store raises when the database refuses a statement: the session check, which
    # refuses the call anyway, only logs it.
    errors: tuple[type[BaseException], ...]

    def transaction(self) -> ContextManager: ...

    def write_transaction(self) -> ContextManager:
        """A transaction that holds the write lock from its first statement (SQLite: BEGIN
        IMMEDIATE), so of two refreshes of one token one spends it and the other reads the spend."""

    def start(self, session_id: str, user_id: str, role: str, now: dt.datetime, expires_at: dt.datetime,
              token_hash: str) -> None:
        """A session and its first refresh token, in one transaction."""

    def token_known(self, token_hash: str) -> bool: ...

    def token_unused(self, token_hash: str) -> bool: ...

    def spend(self, token_hash: str, now: dt.datetime) -> bool:
        """Mark the token used, if it is unused (one conditional statement); whether it was."""

    def refresh_view(self, token_hash: str) -> RefreshView | None:
        """None: no such token, or its session or account is gone."""

    def add_token(self, token_hash: str, session_id: str, now: dt.datetime) -> None: ...

    def revoke(self, session_id: str, why: str, now: dt.datetime) -> bool:
        """End the session if it is live; whether it was."""

    def revoke_account(self, user_id: str, why: str, now: dt.datetime) -> int:
        """End every live session of the account; how many."""

    def state(self, session_id: str) -> SessionState | None:
        """None: no such session, or its account is gone."""

    def ended(self, kind: str, before: dt.datetime, after: tuple | None, limit: int) -> list[tuple[object, str]]:
        """(key, id) of at most `limit` sessions that ended before `before`, in (key, id) order after
        `after`: kind "revoked" by revoked_at, "expired" by expires_at. The keys are opaque to the
        rules, which only hand the last one back as `after`."""

    def token_hashes(self, session_ids: Sequence[str], limit: int) -> list[str]:
        """At most `limit` of the refresh tokens of these sessions."""

    def delete_tokens(self, token_hashes: Sequence[str]) -> None: ...

    def delete_sessions(self, session_ids: Sequence[str]) -> int: ...

    def release(self) -> None:
        """The call is over: give back this thread's database connection (a pool's)."""


class PasswordHasher(Protocol):
    def hash(self, password: str) -> str: ...

    def verify(self, password_hash: str | None, password: str) -> bool:
        """Whether the password is the hash's; False for None (no account), at the cost of one
        verification all the same, so an unknown email takes as long as a wrong password."""

    def problem(self, password: str) -> str | None:
        """Why the hasher will not take this password (its length), or None."""


class TokenIssuer(Protocol):
    ttl_seconds: int

    def issue(self, *, subject: str, email: str, role: str, session_id: str) -> str:
        """A signed access token for the session."""


# --- defaults ------------------------------------------------------------------------------

T = TypeVar("T")
_defaults: dict[type, object] = {}


def install_default(port: type[T], adapter: T) -> None:
    """Make `adapter` what a rule takes for `port` when its maker hands it none. The storage
    package installs its stores and the argon2 hasher when it is imported
    (server/infra/storage/__init__.py), so a script or test that opened the database can use
    Accounts and Sessions as they are; the server's assembly and the operator commands hand
    every port explicitly (tests/unit/test_layers.py builds the server with none installed)."""
    _defaults[port] = adapter


def default(port: type[T]) -> T:
    try:
        return _defaults[port]  # type: ignore[return-value]
    except KeyError:
        raise LookupError(f"no {port.__name__} was handed to the rules and none is installed "
                          "(server/edge/app.py hands the server's)") from None
