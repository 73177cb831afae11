"""Requests that do not parse are the client's error: INVALID_ARGUMENT, not INTERNAL.

grpc answers a request its deserializer rejects with INTERNAL ("Exception deserializing
request!"), which Envoy's transcoder shows REST clients as a 500. The usual cause is text that
is not UTF-8 in a string field (a REST path or query parameter with %FF, which the transcoder
copies into the message as it is). This interceptor lets the deserializer fail softly and
answers such calls with INVALID_ARGUMENT and a BadRequest detail instead.
"""

from __future__ import annotations

import grpc

from server import errors
from server.status import abort


class _Undecodable:
    """Stands in for a request that did not parse, so the handler wrapper can reject it."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _tolerant(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # protobuf's DecodeError, or anything a custom deserializer raises
            return _UNDECODABLE

    return parse


class DecodingInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        behavior = handler.unary_unary

        def checked(request, context):
            if request is _UNDECODABLE:
                abort(context, errors.InvalidArgument(
                    [("request", "is not a valid protobuf message for this method (text fields must be UTF-8)")],
                    reason="MALFORMED_REQUEST"))
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
