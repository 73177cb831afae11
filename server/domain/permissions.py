"""The one table of what each RPC needs from a service client, checked for every call however it
came in (REST or gRPC through Envoy, gRPC directly): server/edge/interceptor.py asks `required`
before any servicer runs.

Each method is public (no token), person-only (a service client is refused whatever it holds)
or needs one permission, or several (all of them). Persons keep their roles; the rules check
those as before.
tests/unit/test_permissions.py fails when a method of the API has no line here.
"""

from __future__ import annotations

from server.domain.errors import PermissionDenied

PAYMENTS_READ = "payments.read"
PAYMENTS_CREATE = "payments.create"
PAYMENTS_CONFIRM = "payments.confirm"
PAYMENTS_CANCEL = "payments.cancel"
PAYMENTS_REFUND = "payments.refund"
WEBHOOKS_MANAGE = "webhooks.manage"
PERMISSIONS = (PAYMENTS_READ, PAYMENTS_CREATE, PAYMENTS_CONFIRM, PAYMENTS_CANCEL, PAYMENTS_REFUND, WEBHOOKS_MANAGE)

PUBLIC = "public"
PERSONS_ONLY = "persons only"

_P = "/payments.v1.PaymentService/"
_A = "/payments.v1.AuthService/"
_W = "/payments.v1.WebhookService/"
_T = "/payments.v1.TokenService/"
_C = "/payments.v1.ClientService/"

METHODS: dict[str, str | tuple[str, ...]] = {
    _P + "CreatePayment": PAYMENTS_CREATE,
    _P + "ListPayments": PAYMENTS_READ,
    _P + "GetPayment": PAYMENTS_READ,
    _P + "ListPaymentEvents": PAYMENTS_READ,
    _P + "ConfirmPayment": PAYMENTS_CONFIRM,
    _P + "CancelPayment": PAYMENTS_CANCEL,
    _P + "CreateRefund": PAYMENTS_REFUND,
    _P + "ListRefunds": PAYMENTS_READ,
    _P + "GetRefund": PAYMENTS_READ,
    # Removing a payment from view, or bringing it back, is an operator's decision.
    _P + "DeletePayment": PERSONS_ONLY,
    _P + "UndeletePayment": PERSONS_ONLY,
    _A + "Register": PUBLIC,
    _A + "Login": PUBLIC,
    _A + "Refresh": PUBLIC,  # its own proof is the refresh token
    _A + "Logout": PERSONS_ONLY,  # a client has no session to end
    _W + "CreateWebhookEndpoint": WEBHOOKS_MANAGE,
    _W + "ListWebhookEndpoints": WEBHOOKS_MANAGE,
    _W + "GetWebhookEndpoint": WEBHOOKS_MANAGE,
    _W + "UpdateWebhookEndpoint": WEBHOOKS_MANAGE,
    _W + "DeleteWebhookEndpoint": WEBHOOKS_MANAGE,
    _W + "RotateWebhookSecret": WEBHOOKS_MANAGE,
    # An event carries the payment as it was (email, amount, description): reading events is
    # reading payments, so it needs payments.read as well.
    _W + "ListWebhookEvents": (WEBHOOKS_MANAGE, PAYMENTS_READ),
    _W + "GetWebhookEvent": (WEBHOOKS_MANAGE, PAYMENTS_READ),
    _W + "RedeliverWebhookEvent": (WEBHOOKS_MANAGE, PAYMENTS_READ),  # it answers the event's deliveries
    _T + "CreateToken": PUBLIC,  # its own proof is the client's secret
    # A client never manages clients, its own included: a leaked secret cannot mint another.
    _C + "CreateClient": PERSONS_ONLY,
    _C + "ListClients": PERSONS_ONLY,
    _C + "GetClient": PERSONS_ONLY,
    _C + "RotateClientSecret": PERSONS_ONLY,
    _C + "SetClientExpiry": PERSONS_ONLY,
    _C + "RevokeClient": PERSONS_ONLY,
}

# Infrastructure, public on every way in: health checks and server reflection.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")


def required(method: str) -> str | tuple[str, ...]:
    """What `method` needs: PUBLIC, PERSONS_ONLY, a permission or a tuple of permissions (all of
    them). A method missing from the table (which its test prevents) is person-only: fail closed
    for clients."""
    if method.startswith(PUBLIC_PREFIXES):
        return PUBLIC
    return METHODS.get(method, PERSONS_ONLY)


def permissions_needed(method: str) -> tuple[str, ...]:
    """The permissions a client needs for `method` (empty for PUBLIC and PERSONS_ONLY)."""
    return _as_permissions(required(method))


def _as_permissions(need: str | tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(need, tuple):
        return need
    return () if need in (PUBLIC, PERSONS_ONLY) else (need,)


def is_public(method: str) -> bool:
    return required(method) == PUBLIC


def check(method: str, permissions: frozenset[str]) -> None:
    """Raise PermissionDenied unless a service client holding `permissions` may call `method`."""
    need = required(method)
    if need == PUBLIC:
        return
    name = method.rsplit("/", 1)[-1]
    if need == PERSONS_ONLY:
        raise PermissionDenied(f"{name} is for persons, not service clients", reason="PERSONS_ONLY",
                               metadata={"method": name})
    for permission in _as_permissions(need):
        if permission not in permissions:
            raise PermissionDenied(f"{name} needs the permission {permission}, which this token does not carry",
                                   reason="PERMISSION_MISSING", metadata={"method": name, "permission": permission})
