"""The auth interceptor: every PaymentService call is checked against the caller's own token.

The server verifies the bearer token itself, even behind Envoy (which checks it too): a client
that reaches the gRPC port directly gets the same answers, and no header that only Envoy should
set is ever trusted. Public methods are listed explicitly; everything else needs a token.
"""

from __future__ import annotations

import contextvars

import grpc

from server import errors
from server.principal import Caller
from server.status import mapped_errors
from server.tokens import TokenVerifier

PUBLIC_METHODS = frozenset({
    "/payments.v1.AuthService/Register",
    "/payments.v1.AuthService/Login",
})
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller")


def caller() -> Caller:
    """The verified caller of the current call (set by AuthInterceptor for the handler's thread)."""
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


class AuthInterceptor(grpc.ServerInterceptor):
    def __init__(self, verifier: TokenVerifier):
        self.verifier = verifier

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or is_public(handler_call_details.method):
            return handler
        if handler.unary_unary is None:  # every protected method is unary; refuse anything else
            raise RuntimeError(f"protected method {handler_call_details.method} is not unary")
        behavior = handler.unary_unary

        def checked(request, context):
            # Runs in the worker thread, so the contextvar is the handler's own.
            with mapped_errors(context):
                who = self.verifier.verify(bearer_token(context.invocation_metadata()))
            token = _caller.set(who)
            try:
                return behavior(request, context)
            finally:
                _caller.reset(token)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
