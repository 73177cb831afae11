"""Typed errors: one class per gRPC status code the service answers, each carrying the
google.rpc.ErrorInfo `reason` it sent, so callers branch on a stable word (`PAYMENT_NOT_FOUND`),
never on a message text that may change."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


class PaymentsError(Exception):
    """A call the service (or Envoy in front of it) refused. `reason` is ErrorInfo's reason ("" when
    the answer carried none: a transport failure), `field_violations` BadRequest's (field,
    description) pairs, `retry_after` RetryInfo's delay in seconds when it sent one."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "", domain: str = "",
                 metadata: dict[str, str] | None = None, field_violations: list[tuple[str, str]] | None = None,
                 retry_after: float | None = None):
        super().__init__(f"{code.name} {reason or '-'}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = metadata or {}
        self.field_violations = field_violations or []
        self.retry_after = retry_after


class InvalidArgument(PaymentsError):
    pass


class Unauthenticated(PaymentsError):
    pass


class PermissionDenied(PaymentsError):
    pass


class NotFound(PaymentsError):
    pass


class AlreadyExists(PaymentsError):
    pass


class FailedPrecondition(PaymentsError):
    pass


class ResourceExhausted(PaymentsError):
    pass


class Unavailable(PaymentsError):
    pass


class DeadlineExceeded(PaymentsError):
    pass


class Internal(PaymentsError):
    pass


BY_CODE: dict[grpc.StatusCode, type[PaymentsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
}


def from_rpc_error(error: grpc.RpcError) -> PaymentsError:
    """The typed error for a failed call, with the details the service packed into its status."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = (error.details() if hasattr(error, "details") else str(error)) or ""
    kwargs: dict = {}
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == DETAILS_KEY:
            kwargs = _details(value)
    return BY_CODE.get(code, PaymentsError)(code, message, **kwargs)


def _details(blob: bytes) -> dict:
    status = status_pb2.Status()
    try:
        status.ParseFromString(blob)
    except Exception:  # noqa: BLE001 - details from a proxy we do not control: the code still stands
        return {}
    found: dict = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found["field_violations"] = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found["retry_after"] = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return found
