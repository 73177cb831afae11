"""Who is calling: the identity a verified token carries, handed from auth to the payment rules."""

from __future__ import annotations

import dataclasses

CUSTOMER = "customer"
ADMIN = "admin"
ROLES = (CUSTOMER, ADMIN)


@dataclasses.dataclass(frozen=True)
class Caller:
    subject: str  # the user's id (JWT `sub`); scopes idempotency keys
    email: str
    role: str
    session_id: str = ""  # the login the token belongs to (JWT `sid`): what revocation ends

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN
