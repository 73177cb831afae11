"""The one id maker: every id the service hands out (payments, their events, accounts, sessions)."""

from __future__ import annotations

import base64
import secrets


def opaque_id(prefix: str, random_bytes: int = 16) -> str:
    """128 random bits (or more) in lower-case base32: unguessable, unique, and leaking no order
    or count."""
    return prefix + base64.b32encode(secrets.token_bytes(random_bytes)).decode().rstrip("=").lower()


def new_payment_id() -> str:
    return opaque_id("pay_")
