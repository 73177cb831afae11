"""The one place where failures become gRPC status codes with google.rpc details.

Every error a client sees carries an ErrorInfo (stable reason + domain, as AIP-193 asks);
field errors add a BadRequest with one violation per field. Envoy's transcoder renders the same
google.rpc.Status as JSON with the matching HTTP status.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.domain import errors
from server.infra import metrics, storage
from server.infra.storage.database import is_disk_full

log = logging.getLogger(__name__)

DOMAIN = "payments.v1"

_CODES = {
    errors.InvalidArgument: code_pb2.INVALID_ARGUMENT,
    errors.NotFound: code_pb2.NOT_FOUND,
    errors.FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    errors.AlreadyExists: code_pb2.ALREADY_EXISTS,
    errors.Unauthenticated: code_pb2.UNAUTHENTICATED,
    errors.PermissionDenied: code_pb2.PERMISSION_DENIED,
    errors.ResourceExhausted: code_pb2.RESOURCE_EXHAUSTED,
    errors.Unavailable: code_pb2.UNAVAILABLE,
    errors.Internal: code_pb2.INTERNAL,
}


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: errors.DomainError) -> grpc.Status:
    code = next((c for cls, c in _CODES.items() if isinstance(error, cls)), code_pb2.UNKNOWN)
    details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata))]
    if isinstance(error, errors.InvalidArgument):
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in error.violations
        ])))
    if not isinstance(error, errors.ResourceExhausted):
        return rpc_status.to_status(status_pb2.Status(code=code, message=error.message, details=details))
    details.append(_pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=error.retry_after))))
    status = rpc_status.to_status(status_pb2.Status(code=code, message=error.message, details=details))
    # A trailers-only answer: Envoy's transcoder passes these on as HTTP response headers.
    return status._replace(trailing_metadata=status.trailing_metadata + (("retry-after", str(error.retry_after)),))


def abort(context: grpc.ServicerContext, error: errors.DomainError):
    context.abort_with_status(to_status(error))


class mapped_errors:
    """Turn what a handler raises into a status: domain errors as themselves, a lost database as
    UNAVAILABLE, anything else as INTERNAL with a log line (never a stack trace to the client).

    A class rather than a @contextmanager generator: it wraps every call, twice, and costs a
    fifth as much this way."""

    __slots__ = ("context",)

    def __init__(self, context: grpc.ServicerContext):
        self.context = context

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, trace) -> bool:
        if kind is None or not issubclass(kind, Exception):
            return False
        context = self.context
        if isinstance(error, errors.DomainError):
            if error.reason == "LOGIN_THROTTLED":
                metrics.login_refusals.labels("throttled").inc()
            abort(context, error)
        if isinstance(error, storage.DATA_ERRORS):
            metrics.database_errors.labels("refused_value").inc()
            # A value the database refused (too long, out of range) that validation let through:
            # still the client's input, so INVALID_ARGUMENT, never INTERNAL. server/edge/textcheck.py and
            # the rules are meant to stop every such value first; the log line says one slipped by.
            log.warning("database refused a value", extra={"error": type(error).__name__})
            abort(context, errors.InvalidArgument(
                [("request", "a value is too long or out of range for the field it is stored in")],
                reason="INVALID_VALUE"))
        if isinstance(error, storage.OUTAGE_ERRORS) and is_disk_full(error):
            # The database's disk is full: this write was rolled back, reads still work, and writes
            # work again once space is freed. UNAVAILABLE (503), not RESOURCE_EXHAUSTED (429): the
            # service cannot store anything for anyone, which is no quota or rate of this client's.
            # SQLite's connection is sound and is kept (reopening one is what used to need space).
            log.warning("database disk full", extra={"error": str(error)})
            metrics.database_errors.labels("unavailable").inc()
            if storage.is_postgres():
                storage.release_connection()  # as for any PostgreSQL error: never pool a doubtful one
            abort(context, errors.Unavailable(
                "the payments database's disk is full: this change was not saved (reading still works); "
                "retry once space is freed", reason="DATABASE_FULL"))
        if isinstance(error, storage.OUTAGE_ERRORS) and storage.is_busy(error):
            # SQLite's write lock held past busy_timeout: the database is there, only busy (the
            # jobs pause between batches so that API writers should never wait this long).
            log.warning("database busy", extra={"error": str(error)})
            metrics.database_errors.labels("busy").inc()
            abort(context, errors.Unavailable("the payments database is busy; retry shortly", reason="DATABASE_BUSY"))
        if isinstance(error, storage.OUTAGE_ERRORS):
            log.warning("database unavailable", exc_info=(kind, error, trace))
            metrics.database_errors.labels("unavailable").inc()
            storage.release_connection()
            abort(context, errors.Unavailable("the payments database is unavailable; retry shortly",
                                              reason="DATABASE_UNAVAILABLE"))
        if context.code() is not None:  # an abort already chose the status
            return False
        log.error("unexpected error", exc_info=(kind, error, trace))
        abort(context, errors.Internal("internal error"))
        return False
