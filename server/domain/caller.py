"""Who is calling: the identity a verified token carries, handed from auth to the rules.

Persons (customers and admins) log in; service clients (role "client") get tokens with their
client id and secret (server/domain/clients.py) and carry the permissions of their token's
`scope`. Which method needs which permission is one table, server/domain/permissions.py.
"""

from __future__ import annotations

import dataclasses

CUSTOMER = "customer"
ADMIN = "admin"
CLIENT = "client"
ROLES = (CUSTOMER, ADMIN)  # the roles of persons (accounts and sessions)


@dataclasses.dataclass(frozen=True)
class Caller:
    subject: str  # the user's or the service client's id (JWT `sub`); scopes idempotency keys
    email: str  # a person's email; "" for a service client
    role: str
    session_id: str = ""  # the login the token belongs to (JWT `sid`): what revocation ends
    # A service client's permissions (its token's scope, within what the client holds now);
    # empty for persons, whose role decides.
    permissions: frozenset[str] = frozenset()
    # When the service's own token for a client was issued (JWT `iat`, Unix seconds); 0 for
    # persons and for tokens of another issuer (a Google ID token is not minted with the
    # client's secret, so a rotation does not end it).
    issued_at: float = 0.0

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def is_client(self) -> bool:
        return self.role == CLIENT

    @property
    def reaches_all(self) -> bool:
        """Whether the caller reaches every account's payments (an admin, or a service client
        within its permissions), rather than only its own account's."""
        return self.role in (ADMIN, CLIENT)

    def may(self, permission: str) -> bool:
        """An admin may do anything a permission names; a client what it holds; a customer none."""
        return self.is_admin or (self.is_client and permission in self.permissions)
