"""On SQLite, payment calls take turns with the database: at most two at a time.

Python threads and SQLite form a convoy: the sqlite3 module releases the GIL for every row it
steps, and with 16 runnable handler threads each release hands the GIL to another thread for up
to the interpreter's switch interval, so a page of 20 rows waits twenty times. Measured on 2 cores
(16 threads each listing pages of 20 from a million-row table): 180 pages/s all at once, 590/s
taking turns two at a time, the same as 1-4 threads. PostgreSQL answers a query in one round trip
and needs no turns.

Only PaymentService calls take turns: Register and Login spend their time in the password hash,
and must not hold a turn while hashing (a flood of logins would then stall every payment call).
"""

from __future__ import annotations

import threading

import grpc

TURNS = 2
_PAYMENT_SERVICE = "/payments.v1.PaymentService/"


class TurnsInterceptor(grpc.ServerInterceptor):
    def __init__(self, turns: int = TURNS):
        self._turns = threading.BoundedSemaphore(turns)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None or not handler_call_details.method.startswith(_PAYMENT_SERVICE):
            return handler
        behavior, turns = handler.unary_unary, self._turns

        def in_turn(request, context):
            with turns:
                return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            in_turn, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
