"""Requests that do not parse are the client's error: INVALID_ARGUMENT, not INTERNAL.

grpc answers a request its deserializer rejects with INTERNAL ("Exception deserializing
request!"), which Envoy's transcoder shows REST clients as a 500. The usual cause is text that
is not UTF-8 in a string field (a REST path or query parameter with %FF, which the transcoder
copies into the message as it is). server/edge/interceptor.py lets the deserializer fail softly (`tolerant`)
and answers such calls with INVALID_ARGUMENT and a BadRequest detail instead (`rejection`).
"""

from __future__ import annotations

from server.domain import errors


class _Undecodable:
    """Stands in for a request that did not parse, so the call wrapper can reject it."""

    __slots__ = ()


UNDECODABLE = _Undecodable()


def tolerant(deserializer):
    """The deserializer, except that a request it rejects becomes UNDECODABLE."""

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # protobuf's DecodeError, or anything a custom deserializer raises
            return UNDECODABLE

    return parse


def rejection() -> errors.InvalidArgument:
    """The answer to an UNDECODABLE request."""
    return errors.InvalidArgument(
        [("request", "is not a valid protobuf message for this method (text fields must be UTF-8)")],
        reason="MALFORMED_REQUEST")
