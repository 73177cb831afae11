"""What happens around every call, in one wrapper per method: the access log, the token check
(server/auth.py), the rejection of undecodable requests (server/decoding.py) and, on SQLite, a
turn with the database (server/turns.py), in that order.

One interceptor rather than four, and each method's wrapper built once (at its first call)
rather than on every call: grpc runs an interceptor for every call, and four of them, each
building a new handler around the next, cost about a tenth of a GetPayment.
"""

from __future__ import annotations

import logging
import time

import grpc

from server import auth, decoding, logs, turns
from server.status import abort, mapped_errors
from server.tokens import TokenVerifier

_HEALTH = "/grpc.health.v1.Health/"


class CallInterceptor(grpc.ServerInterceptor):
    """`database_turns`: the turns payment calls take with the database (SQLite), or None."""

    def __init__(self, verifier: TokenVerifier, database_turns: turns.Turns | None = None):
        self._verifier = verifier
        self._turns = database_turns
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}  # by method: the wrapped handler

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None:  # unknown method: grpc answers UNIMPLEMENTED; nothing to remember
                return None
            wrapped = self._handlers[method] = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.unary_unary is None:
            # Streams are reflection and health Watch, both public; a protected stream would be
            # served without a token check, so refuse to serve it at all.
            if not auth.is_public(method):
                raise RuntimeError(f"protected method {method} is not unary")
            return handler
        behavior, verifier = handler.unary_unary, self._verifier
        public = auth.is_public(method)
        turn = self._turns if self._turns is not None and turns.takes_turns(method) else None
        # Health checks (Envoy every few seconds, kubelet probes) would drown the log at INFO.
        level = logging.DEBUG if method.startswith(_HEALTH) else logging.INFO

        def call(request, context):
            start, failed = time.perf_counter(), False
            try:
                acting = None
                if not public:
                    with mapped_errors(context):
                        acting = auth.acting_as(auth.authenticate(verifier, context.invocation_metadata()))
                try:
                    if request is decoding.UNDECODABLE:  # judged only once the caller is known
                        abort(context, decoding.rejection())
                    if turn is None:
                        return behavior(request, context)
                    turn.take()
                    try:
                        return behavior(request, context)
                    finally:
                        turn.give()
                finally:
                    if acting is not None:
                        auth.done(acting)
            except Exception:
                failed = True
                raise
            finally:
                code = context.code()
                logs.access(level, method, code.name if code is not None else "UNKNOWN" if failed else "OK",
                            round((time.perf_counter() - start) * 1000, 2))

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=decoding.tolerant(handler.request_deserializer)
            if handler.request_deserializer is not None else None,
            response_serializer=handler.response_serializer,
        )
