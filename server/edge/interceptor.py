"""What happens around every call, in one wrapper per method: the lane it runs in
(server/edge/capacity.py), its metrics (server/infra/metrics.py) and trace (server/infra/tracing.py),
the access log, the token and session check (server/edge/auth.py,
server/domain/sessions.py), the rejection of undecodable requests (server/edge/decoding.py) and of text no
field accepts (server/edge/textcheck.py), on SQLite a turn with the database
(server/infra/sqlite_turns.py), and then, for whatever the servicer raised, its status
(server/edge/status.py) and the return of the call's database connection, in that order. The
servicers themselves only translate messages.

One interceptor rather than four, and each method's wrapper built once (at its first call)
rather than on every call: grpc runs an interceptor for every call, and four of them, each
building a new handler around the next, cost about a tenth of a GetPayment.
"""

from __future__ import annotations

import logging
import time

import grpc

from server.domain import errors
from server.edge import auth, capacity, decoding, textcheck
from server.infra import logs, metrics, sqlite_turns, tracing
from server.edge.status import abort, mapped_errors
from server.domain import permissions
from server.domain.clients import ClientCheck
from server.domain.sessions import SessionCheck
from server.infra.storage import end_call
from server.infra.tokens import TokenVerifier

_HEALTH = "/grpc.health.v1.Health/"
_WATCH = "/grpc.health.v1.Health/Watch"
_AUTH = "/payments.v1.AuthService/"
_TOKEN = "/payments.v1.TokenService/"


def busy(kind: str) -> errors.ResourceExhausted:
    return errors.ResourceExhausted(f"the server is busy with {kind} calls; retry shortly", reason="SERVER_BUSY",
                                    metadata={"lane": kind})


def rpc_attributes(method: str) -> dict:
    """OpenTelemetry's RPC attributes of a call's span."""
    service, name = method.lstrip("/").rsplit("/", 1)
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


class CallInterceptor(grpc.ServerInterceptor):
    """`database_turns`: the turns payment calls take with the database (SQLite), or None.
    `lanes`: where each kind of call runs (server/edge/capacity.py); payment calls run in the
    server's own pool, which is lanes.payments."""

    def __init__(self, verifier: TokenVerifier, database_turns: sqlite_turns.Turns | None = None,
                 lanes: capacity.Lanes | None = None, sessions: SessionCheck | None = None,
                 clients: ClientCheck | None = None):
        self._verifier = verifier
        self._sessions = sessions
        self._clients = clients
        self._turns = database_turns
        self._lanes = lanes
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

    def _lane(self, method: str) -> tuple[str, capacity.Lane | None]:
        lanes = self._lanes
        if lanes is None or not auth.is_public(method):
            return "payment", None  # the server's own pool (lanes.payments)
        if method.startswith((_AUTH, _TOKEN)):
            return "sign-up and login", lanes.auth
        if method.startswith(_HEALTH):
            return "health", lanes.health
        return "streaming", lanes.streams

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kind, lane = self._lane(method)
        if handler.unary_unary is None:
            # Streams are reflection and health Watch, both public; a protected stream would be
            # served without a token check, so refuse to serve it at all.
            if not auth.is_public(method):
                raise RuntimeError(f"protected method {method} is not unary")
            return self._wrap_stream(method, handler, kind, lane)
        behavior, verifier, sessions, clients = handler.unary_unary, self._verifier, self._sessions, self._clients
        public = auth.is_public(method)
        turn = self._turns if self._turns is not None and sqlite_turns.takes_turns(method) else None
        # Health checks (Envoy every few seconds, kubelet probes) would drown the log at INFO.
        level = logging.DEBUG if method.startswith(_HEALTH) else logging.INFO
        shedding = capacity.shedding
        rpc = metrics.Rpc("unary", method)
        # A sign-up or login its lane sheds is a refused login too.
        refused_login = metrics.login_refusals.labels("busy") if lane is not None and lane is self._lanes.auth else None
        span_name, attributes = method.lstrip("/"), rpc_attributes(method)

        def admit(context) -> None:
            """1. A call beyond its lane's bound is answered at once, before any work."""
            if shedding():
                if refused_login is not None:
                    refused_login.inc()
                abort(context, busy(kind))

        def identify(context, metadata):
            """2. The caller, from the token and its live session (revoked, disabled, deleted or
            re-roled: refused), or its live service client (revoked or expired: refused) and the
            permission this method needs (server/domain/permissions.py); None for a public method."""
            if public:
                return None
            with mapped_errors(context):
                who = auth.authenticate(verifier, metadata)
                if who.is_client:
                    if clients is None:
                        raise errors.Unauthenticated("service clients are not accepted here", reason="INVALID_TOKEN")
                    who = clients.check(who)
                    permissions.check(method, who.permissions)
                elif sessions is not None:
                    sessions.check(who)
                return auth.acting_as(who)

        def check_input(request, context) -> None:
            """3. Input no field accepts, judged only once the caller is known."""
            if request is decoding.UNDECODABLE:
                abort(context, decoding.rejection())
            if (problem := textcheck.first_problem(request)) is not None:
                abort(context, problem)

        def serve(request, context):
            """4. The servicer, its domain errors made statuses here; on SQLite in a database turn."""
            with mapped_errors(context):
                if turn is None:
                    return behavior(request, context)
                turn.take()
                try:
                    return behavior(request, context)
                finally:
                    turn.give()

        def account(context, start: float, failed: bool, traced) -> None:
            """5. Whatever happened: the connection back to the pool, the metrics, the access line, the span."""
            end_call()  # the call's pooled database connection goes back (PostgreSQL)
            code = context.code()
            name = code.name if code is not None else "UNKNOWN" if failed else "OK"
            seconds = time.perf_counter() - start
            rpc.done(name, seconds)
            logs.access(level, method, name, round(seconds * 1000, 2), traced.fields)
            traced.end(name)

        def call(request, context):
            start, failed = time.perf_counter(), False
            rpc.start()
            metadata = context.invocation_metadata()  # made into Python tuples on each call: once
            traced = tracing.Call(span_name, tracing.traceparent_of(metadata), attributes)
            try:
                admit(context)
                acting = identify(context, metadata)
                try:
                    check_input(request, context)
                    return serve(request, context)
                finally:
                    if acting is not None:
                        auth.done(acting)
            except Exception:
                failed = True
                raise
            finally:
                account(context, start, failed, traced)

        if lane is not None:
            call.experimental_thread_pool = lane
        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=decoding.tolerant(handler.request_deserializer)
            if handler.request_deserializer is not None else None,
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(self, method: str, handler: grpc.RpcMethodHandler, kind: str,
                     lane: capacity.Lane | None) -> grpc.RpcMethodHandler:
        """Public streams: each in its lane, ended after the lanes' stream_max_seconds.
        Health Watch holds no thread (grpc's non-blocking form), so a count bounds it instead."""
        lanes = self._lanes
        if lanes is None:
            return handler
        deadlines, seconds = lanes.deadlines, lanes.stream_max_seconds
        if method == _WATCH and handler.unary_stream is not None:
            behavior, watches = handler.unary_stream, lanes.watches

            def watch(request, context, send_response_callback=None):
                if capacity.shedding() or not watches.take():
                    abort(context, busy("health watch"))
                key = deadlines.after(seconds, context.cancel)

                def closed():
                    watches.give()
                    deadlines.forget(key)

                if not context.add_callback(closed):
                    closed()
                return behavior(request, context, send_response_callback=send_response_callback)

            watch.experimental_non_blocking = getattr(behavior, "experimental_non_blocking", False)
            watch.experimental_thread_pool = lane
            return grpc.unary_stream_rpc_method_handler(watch, request_deserializer=handler.request_deserializer,
                                                        response_serializer=handler.response_serializer)
        if handler.stream_stream is None:
            raise RuntimeError(f"public stream {method} has an unexpected shape")
        behavior = handler.stream_stream
        rpc = metrics.Rpc("bidi_stream", method)

        def stream(request_iterator, context):
            start = time.perf_counter()
            rpc.start()
            try:
                if capacity.shedding():
                    abort(context, busy(kind))
                key = deadlines.after(seconds, context.cancel)
                try:
                    yield from behavior(request_iterator, context)
                finally:
                    deadlines.forget(key)
            finally:
                code = context.code()
                rpc.done(code.name if code is not None else "OK", time.perf_counter() - start)

        stream.experimental_thread_pool = lane
        return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                     response_serializer=handler.response_serializer)
