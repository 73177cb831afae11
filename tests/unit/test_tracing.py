"""The server's reading of W3C traceparent (server/infra/tracing.py): what a client calling the
server's port directly sends is judged as Envoy's Lua filter judges it at the edge."""

from __future__ import annotations

import pytest

from server.infra import tracing

TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize("value, parsed", [
    (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),
    (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
    (f"01-{TRACE}-{PARENT}-01-future", (TRACE, PARENT, True)),  # a later version may add fields
    (f"00-{TRACE}-{PARENT}-01-extra", None),  # version 00 has exactly four
    (f"00-{'0' * 32}-{PARENT}-01", None),
    (f"00-{TRACE}-{'0' * 16}-01", None),
    (f"ff-{TRACE}-{PARENT}-01", None),
    (f"00-{TRACE.upper()}-{PARENT}-01", None),
    ("garbage", None), ("", None), (None, None),
])
def test_traceparent(value, parsed):
    assert tracing.parse(value) == parsed


def test_untraced_calls_still_name_their_trace_in_the_log_fields():
    call = tracing.Call("payments.v1.PaymentService/GetPayment", f"00-{TRACE}-{PARENT}-01", {})
    assert tracing.current_fields() == {"logging.googleapis.com/trace": TRACE,
                                        "logging.googleapis.com/trace_sampled": True}
    call.end("OK")
    assert tracing.current_fields() is None
