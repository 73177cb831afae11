"""A request_id makes a create or a refund safe to retry: the first request with it is carried
out, and a retry of it (the same caller, the same request_id) is answered with what the first one
made. A retry must be the same request: its body's fingerprint is stored beside the request_id,
and a different body under a used request_id is a conflict, never a second change."""

from __future__ import annotations

import hashlib
import json
from typing import Callable, TypeVar

from server.domain.errors import AlreadyExists
from server.domain.records import DuplicateRequest

T = TypeVar("T")


def fingerprint(*fields) -> str:
    """What makes two requests 'the same body': their fields, in order, as JSON."""
    return hashlib.sha256(json.dumps(list(fields), separators=(",", ":")).encode()).hexdigest()


def same_request(stored: str | None, fingerprint_: str, request_id: str, what: str) -> None:
    """Refuse a retry whose body is not the first one's; `what` names what the first one made."""
    if stored != fingerprint_:
        raise AlreadyExists(f"request_id {request_id!r} was already used for {what} with a different body",
                            reason="REQUEST_ID_CONFLICT", metadata={"request_id": request_id})


def winner(find: Callable[[str], T | None], request_id: str) -> T:
    """What a request_id this insert lost to made (a retry of it, or the same request_id used at
    once elsewhere, inserted first), to answer as a replay; DuplicateRequest if there is none."""
    earlier = find(request_id) if request_id else None
    if earlier is None:
        raise DuplicateRequest()
    return earlier
