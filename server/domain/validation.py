"""The shapes the rules accept, shared by payments and accounts: emails, request ids, payment ids.

Always fullmatch: `$` also matches before a trailing newline, which let "order-1\n" through.
"""

from __future__ import annotations

import re

MAX_EMAIL = 254

EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+", re.ASCII)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)
PAYMENT_ID = re.compile(r"pay_[a-z2-7]{26}", re.ASCII)


def email_problem(email: str) -> str | None:
    """Why an email address is unacceptable, or None."""
    if not email:
        return "is required"
    if len(email) > MAX_EMAIL:
        return f"must be at most {MAX_EMAIL} characters"
    if not EMAIL.fullmatch(email):
        return "is not a valid email address"
    return None


def normalize_email(email: str) -> str:
    return email.strip().lower()
