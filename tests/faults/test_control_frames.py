"""HTTP/2 control-frame floods leave other clients served, on the server's own port and at Envoy.

A client may send frames that cost the receiver work but open no stream: PINGs (each must be
answered), SETTINGS (each acknowledged), WINDOW_UPDATEs, and streams opened and reset at once
(rapid reset). Here one address floods for a few seconds on several connections, each kind in
turn, interleaving a whole call every few batches (GetPayment without a token, refused at once: a
grpc server forgives ping strikes once it has answered something), reconnecting whenever the peer closes the connection; a
bystander customer from other addresses must meanwhile succeed at every step (REST and gRPC
through Envoy, gRPC straight to the server's port, a login) within 5 s, at the first try: no
step is tried again (a GetPayment, the method the flood's own calls use, was ended by grpc with
CANCELLED at once while its queue of waiting calls was past grpc's default limits; see
server/edge/app.py, grpc.server.max_pending_requests).

What answers them: on the server's port, grpc's ping-abuse policy (server/edge/app.py:
grpc.http2.max_ping_strikes, min_ping_interval_without_data_ms, max concurrent streams per
connection, and the pending calls a method may have before grpc sheds new ones); at Envoy, its HTTP/2 codec's flood limits (envoy.yaml http2_protocol_options:
max_outbound_control_frames, max_consecutive_inbound_frames_with_empty_payload,
max_inbound_window_update_frames_per_data_frame_sent) and its premature-reset limit.
"""

from __future__ import annotations

import contextlib
import json

import pytest

from tests.conftest import ALICE
from tests.support import attacks
from tests.support.bystander import Bystander

HOST = "127.0.0.1"
SECONDS = 8.0
KINDS = ["ping", "settings", "window_update", "rapid_reset"]
CALL = "/payments.v1.PaymentService/GetPayment"


@pytest.fixture(scope="module")
def bystander(edge, token_for) -> Bystander:
    return Bystander.register(edge.api, f"{HOST}:{edge.envoy.port}", token_for(ALICE), "ctl-bystander@example.com",
                              direct_target=f"{HOST}:{edge.server.port}")


def flood(kind: str, port: int, source: str) -> attacks.InChildProcess:
    """The attack in a process of its own (the bystander's latencies are then the service's). Its
    calls are GetPayment without a token, refused at once: health checks from the flooder at this
    rate on the server's port are a problem of their own (envoy/README.md, "What is still open")."""
    if kind == "rapid_reset":
        return attacks.InChildProcess("RapidReset", HOST, port, CALL, SECONDS, source=source)
    return attacks.InChildProcess("ControlFrameFlood", HOST, port, kind, SECONDS, call_path=CALL, source=source)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["server", "envoy"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_control_frame_flood_leaves_other_clients_served(edge, bystander, kind, where):
    port = edge.server.port if where == "server" else edge.envoy.port
    before = [bystander.check(f"{kind}-{where}-before-{i}", direct=True, login=False) for i in range(3)]
    source = f"127.73.{KINDS.index(kind) + 1}.{1 if where == 'server' else 2}"
    with flood(kind, port, source) as attack, \
            bystander.keep_checking(f"{kind}-{where}-during", direct=True, pause=0.05) as checking:
        counts = attack.wait()
    after = bystander.check(f"{kind}-{where}-after", direct=True)
    print(f"\n{kind} flood on the {where}'s port for {SECONDS:.0f} s: {json.dumps(dict(counts))}")
    checking.compare(before)
    assert counts["frames" if kind != "rapid_reset" else "streams"] > 1000, counts  # the attack did run
    bystander.assert_ok(checking.checks + [after])


@pytest.mark.timeout(90)
def test_rapid_reset_from_three_connections_on_the_servers_port_drops_no_call(edge, bystander):
    """Each reset stream waits in grpc's queue of GetPayment calls until the server takes it: three
    connections' worth (1,024 streams each) stays under grpc.server.max_pending_requests
    (server/edge/app.py), so no other client's GetPayment is shed (at 4,096 streams a connection,
    four connections failed 7 of 54 steps). The flooded method's calls wait their turn behind the
    queue meanwhile (1-3 s here)."""
    before = [bystander.check(f"rapid_reset-x3-before-{i}", direct=True, login=False) for i in range(3)]
    with contextlib.ExitStack() as stack:
        floods = [stack.enter_context(flood("rapid_reset", edge.server.port, f"127.73.8.{n + 1}")) for n in range(3)]
        checking = stack.enter_context(bystander.keep_checking("rapid_reset-x3-during", direct=True, pause=0.05))
        counts = [f.wait() for f in floods]
    after = bystander.check("rapid_reset-x3-after", direct=True)
    print(f"\nrapid reset from 3 connections on the server's port for {SECONDS:.0f} s: "
          f"{[dict(c) for c in counts]}; server RSS {attacks.rss_mb(edge.server.proc.pid):.0f} MB")
    checking.compare(before)
    assert all(c["streams"] > 1000 for c in counts), counts  # the attack did run
    bystander.assert_ok(checking.checks + [after])


@pytest.mark.timeout(60)
def test_a_bare_ping_flood_on_the_servers_port_is_ended_by_grpc(edge):
    """server/edge/app.py HTTP2_FLOOD_LIMITS: PINGs with nothing answered in between are strikes,
    and grpc ends the connection (GOAWAY) at the third; the flooder has to connect again and again."""
    with attacks.InChildProcess("ControlFrameFlood", HOST, edge.server.port, "ping", 3.0, connections=1,
                                call_every=0, source="127.73.9.1") as attack:
        counts = attack.wait()
    print(f"\nbare ping flood for 3 s: {json.dumps(dict(counts))}")
    ended = counts["goaway"] + counts["closed_by_server"]
    assert ended >= 2 and counts["connections"] >= 2, counts
