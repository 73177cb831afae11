"""One customer's hundreds of concurrent calls do not crowd out another customer's.

A customer with a valid token keeps 300 ListPayments in flight through Envoy (each answered call
followed at once by the next, on grpc.aio) for 10 s, from an address of its own. Meanwhile another
customer (tests/support/bystander.py) does what it always does: every one of its calls succeeds
within 5 s; none is refused as busy (429 / RESOURCE_EXHAUSTED) or rate limited, because Envoy limits
each caller's rate and the server serves callers in turn (server/edge/admission.py) and sheds from
the caller holding the most. On SQLite and on PostgreSQL, whose pool of connections is the
other thing a flood can take.
"""

from __future__ import annotations

import contextlib
import os

import pytest

from server.edge.pb import payments_pb2 as pb
from tests.conftest import ALICE, BOB, own_pg_database
from tests.support import attacks
from tests.support.bystander import Bystander
from tests.support.rest import Client, loopback_address
from tests.support.stack import running_stack

NOISY = 300  # calls the noisy customer keeps in flight
SECONDS = 10.0
LIST_PAYMENTS = "/payments.v1.PaymentService/ListPayments"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(request, tmp_path_factory, keys_dir):
    """A server (on this backend) behind the real Envoy, for the module."""
    with contextlib.ExitStack() as held:
        url = ""
        if request.param == "postgres":
            url = held.enter_context(own_pg_database(f"payments_test_{os.getpid()}_noisy"))
        server, envoy = held.enter_context(running_stack(tmp_path_factory.mktemp(f"noisy-{request.param}"), keys_dir,
                                                         database_url=url))
        yield request.param, server, envoy


@pytest.mark.timeout(120)
def test_one_customers_hundreds_of_calls_leave_another_customer_served(stack, token_for):
    backend, server, envoy = stack
    api = Client(envoy.url)
    noisy_token = token_for(BOB)
    noisy_api = api.from_address(loopback_address())
    for i in range(20):  # something to list
        created = noisy_api.post("/v1/payments", {"email": BOB.email, "amount": "900", "request_id": f"noisy-{i}"},
                                 token=noisy_token)
        assert created.status == 200, created.text
    bystander = Bystander.register(api, f"127.0.0.1:{envoy.port}", token_for(ALICE), f"bystander-{backend}@example.com")
    bystander.assert_ok([bystander.check("warm")])

    request = pb.ListPaymentsRequest(page_size=20).SerializeToString()
    with attacks.address_relay("127.0.0.1", envoy.port, "127.72.0.1") as relay, \
            attacks.closed_loop_calls(relay.target, LIST_PAYMENTS, request, concurrency=NOISY, seconds=SECONDS,
                                      metadata=(("authorization", f"Bearer {noisy_token}"),), channels=4) as noisy:
        with bystander.keep_checking("during", pause=0.1) as checking:
            flood = noisy.result()  # until the noisy customer's time is up
    after = bystander.check("after")

    during = checking.latencies()
    steps, failed = checking.steps()
    print(f"\n[{backend}] noisy customer: {flood.calls} calls in {SECONDS:.0f} s ({flood.calls / SECONDS:.0f}/s), "
          f"codes {dict(flood.codes)}, p50 {attacks.median(flood.latencies) * 1000:.0f} ms, "
          f"p99 {attacks.percentile(flood.latencies, 99) * 1000:.0f} ms")
    print(f"[{backend}] bystander: {len(checking.checks)} checks, {steps} calls, {failed} failed "
          f"(failure rate {checking.failure_rate():.1%}), p50 {attacks.median(during) * 1000:.0f} ms, "
          f"p99 {attacks.percentile(during, 99) * 1000:.0f} ms, max {max(during, default=0) * 1000:.0f} ms")
    for check in [c for c in checking.checks if not c.ok][:5]:
        print(f"  bystander {check}")
    assert flood.calls > NOISY, flood.codes  # the noisy customer did keep the service busy
    assert checking.failure_rate() == 0, [str(c) for c in checking.checks if not c.ok][:5]
    bystander.assert_ok([after])
    assert api.get("/ready").status == 200
