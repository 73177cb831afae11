"""Domain errors: what went wrong in words the API promises, with no transport attached.

The payment rules raise these; server/edge/status.py alone turns them into gRPC status codes with
google.rpc details, so the mapping lives in one place and the rules never import grpc.
Each error carries a stable UPPER_SNAKE `reason` (the ErrorInfo reason clients may branch on).
"""

from __future__ import annotations

from typing import Mapping, Sequence


class DomainError(Exception):
    reason = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata = dict(metadata or {})


class InvalidArgument(DomainError):
    """One or more fields are bad; `violations` names each field and why."""

    def __init__(self, violations: Sequence[tuple[str, str]], *, reason: str):
        self.violations = list(violations)
        fields = ", ".join(f for f, _ in self.violations)
        super().__init__(f"invalid {fields}: " + "; ".join(d for _, d in self.violations), reason=reason)


class NotFound(DomainError):
    reason = "NOT_FOUND"


class FailedPrecondition(DomainError):
    reason = "FAILED_PRECONDITION"


class AlreadyExists(DomainError):
    reason = "ALREADY_EXISTS"


class Unauthenticated(DomainError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    reason = "PERMISSION_DENIED"


class ResourceExhausted(DomainError):
    """Too much of something right now (a busy lane, too many failed logins); `retry_after`
    seconds is when trying again makes sense (sent as RetryInfo and a `retry-after` header)."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, reason: str, retry_after: int = 1, metadata=None):
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = max(1, int(retry_after))


class Unavailable(DomainError):
    reason = "UNAVAILABLE"


class Internal(DomainError):
    """An unexpected failure; its message is generic on purpose (details go to the log only)."""

    reason = "INTERNAL"
