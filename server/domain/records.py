"""What the rules read and write, as the domain names it: frozen rows that any store returns (the
storage adapters read them from their tables, a test's fake from dicts), and the store errors the
rules act on. No peewee, no SQL."""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple


class PaymentRecord(NamedTuple):
    """A payment (the store keeps these columns, in this order)."""

    id: str
    email: str
    owner_id: str | None
    amount: int
    currency: str
    description: str
    status: str
    failure_reason: str | None
    created_by: str
    request_id: str | None
    request_hash: str | None
    created_at: dt.datetime
    updated_at: dt.datetime
    expires_at: dt.datetime
    deleted_at: dt.datetime | None
    refunded_amount: int = 0  # the sum of its refunds


class EventRecord(NamedTuple):
    """One change of a payment: its history row, which is also its webhook event."""

    number: int
    id: str
    payment_id: str
    at: dt.datetime
    action: str
    from_status: str | None
    to_status: str
    failure_reason: str | None
    actor_id: str
    actor_role: str
    refund_id: str | None = None  # a refund's event: the refund
    refunded_amount: int | None = None  # a refund's event: the payment's refunded_amount after it


class RefundRecord(NamedTuple):
    """Money given back for a settled payment (the store keeps these columns, in this order)."""

    id: str
    payment_id: str
    amount: int
    currency: str
    reason: str
    note: str
    created_by: str
    request_id: str | None
    request_hash: str | None
    created_at: dt.datetime
    refunded_amount_after: int


class DuplicateRequest(Exception):
    """The (created_by, request_id) pair of an insert is taken: a concurrent retry won."""


class ClientRecord(NamedTuple):
    """A service client (the store keeps these columns, in this order)."""

    id: str
    name: str
    permissions: str  # space-separated
    secret_hash: str
    secret_prefix: str
    previous_secret_hash: str | None
    previous_secret_expires_at: dt.datetime | None
    created_by: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    # Access tokens issued before this (whole seconds) are refused: set by a rotation that keeps
    # no previous secret, so tokens minted with a leaked secret end with it.
    tokens_valid_after: dt.datetime | None = None


class AccountRecord(NamedTuple):
    """An account (the store keeps these columns)."""

    id: str
    email: str
    password_hash: str
    role: str
    created_at: dt.datetime
    disabled_at: dt.datetime | None


class RefreshView(NamedTuple):
    """A refresh token with its session and account, as a refresh reads them in its transaction."""

    session_id: str
    used_at: dt.datetime | None
    session_role: str | None  # None: a session started before sessions had a role
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    user_id: str
    email: str
    account_role: str
    disabled_at: dt.datetime | None


class SessionState(NamedTuple):
    """A session and its account, as the session check reads them."""

    user_id: str
    session_role: str | None
    revoked_at: dt.datetime | None
    expires_at: dt.datetime
    account_role: str
    disabled_at: dt.datetime | None


class DuplicateEmail(Exception):
    """An insert's email is taken: someone registered it first, or at the same moment."""
