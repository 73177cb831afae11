"""Auth for every call: each PaymentService call is checked against the caller's own token.

The server verifies the bearer token itself, even behind Envoy (which checks it too): a client
that reaches the gRPC port directly gets the same answers, and no header that only Envoy should
set is ever trusted. Public methods are listed explicitly (the permission table); everything else
needs a token.
server/edge/interceptor.py runs `authenticate` before the handler and hands the caller over with
`acting_as`; the handler reads it with `caller()`.
"""

from __future__ import annotations

import contextvars

from server.domain import errors, permissions
from server.domain.caller import Caller
from server.infra.tokens import TokenVerifier

# Which methods need no token: the permission table says (server/domain/permissions.py).
PUBLIC_METHODS = frozenset(m for m, need in permissions.METHODS.items() if need == permissions.PUBLIC)
PUBLIC_PREFIXES = permissions.PUBLIC_PREFIXES

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller")


def caller() -> Caller:
    """The verified caller of the current call (set by server/edge/interceptor.py for the handler's thread)."""
    return _caller.get()


def is_public(method: str) -> bool:
    return method in PUBLIC_METHODS or method.startswith(PUBLIC_PREFIXES)


def bearer_token(metadata) -> str:
    values = [v for k, v in metadata if k == "authorization"]
    if not values:
        raise errors.Unauthenticated("missing bearer token: send 'authorization: Bearer <token>'",
                                     reason="MISSING_TOKEN")
    if len(values) > 1:
        raise errors.Unauthenticated("more than one authorization header", reason="INVALID_TOKEN")
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise errors.Unauthenticated("authorization must be 'Bearer <token>'", reason="INVALID_TOKEN")
    return token.strip()


def authenticate(verifier: TokenVerifier, metadata) -> Caller:
    """The verified caller of a call with this metadata, or Unauthenticated/PermissionDenied."""
    return verifier.verify(bearer_token(metadata))


def acting_as(who: Caller) -> contextvars.Token:
    """Make `who` the caller for the rest of this call (in the handler's thread); undo with done()."""
    return _caller.set(who)


def done(token: contextvars.Token) -> None:
    _caller.reset(token)
