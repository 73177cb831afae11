"""Webhooks end to end: endpoints registered over REST through the real Envoy, the server's own
delivery job POSTing to a real HTTP receiver on loopback, which checks every delivery with three
independent verifiers (the README's snippet and Stripe's library on Payments-Signature, Standard
Webhooks' reference library on its headers: devstack/webhook_receiver.py) and deduplicates by
event id as the README says.

The stack runs its jobs every second, allows loopback endpoints (PAYMENTS_WEBHOOK_ALLOW_LOOPBACK,
the development setting) and retries fast (0.2 s, doubling, at most 1 s), so a receiver that is
down for two seconds is retried several times and then gets everything.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest

from tests.support.rest import Client, loopback_address
from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD, running_stack
from devstack.webhook_receiver import FAST_WEBHOOKS, Receiver, standard_verifies, stripe_verifies
from tests.e2e.conftest import PASSWORD, User, new_email


@pytest.fixture(scope="module")
def hooks_stack(tmp_path_factory, keys_dir):
    with running_stack(tmp_path_factory.mktemp("webhooks"), keys_dir, server_overrides=FAST_WEBHOOKS) as (server, envoy):
        yield server, envoy


@pytest.fixture(scope="module")
def api(hooks_stack) -> Client:
    return Client(hooks_stack[1].url)


@pytest.fixture(scope="module")
def admin(api) -> User:
    login = api.from_address(loopback_address()).post("/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert login.status == 200, login.text
    return User(ADMIN_EMAIL, login.json["access_token"])


@pytest.fixture
def customer(api) -> User:
    email = new_email("hooks")
    own = api.from_address(loopback_address())
    assert own.post("/v1/auth/register", {"email": email, "password": PASSWORD}).status == 200
    login = own.post("/v1/auth/login", {"email": email, "password": PASSWORD})
    return User(email, login.json["access_token"])


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def register(api, admin, url: str, types=("*",), enabled=True) -> dict:
    r = api.post("/v1/webhookEndpoints", {"url": url, "event_types": list(types), "enabled": enabled}, token=admin.token)
    assert r.status == 200, r.text
    return r.json


@pytest.fixture
def subscribed(api, admin):
    """Register an endpoint for a receiver (its secret given to the receiver); deleted after the
    test, so no test's endpoint is left failing into the next one."""
    made: list[str] = []

    def subscribe(receiver: Receiver, types=("*",)) -> dict:
        answer = register(api, admin, receiver.url, types)
        receiver.secret = answer["secret"]
        made.append(answer["endpoint"]["id"])
        return answer["endpoint"]

    yield subscribe
    for endpoint_id in made:
        assert api.delete(f"/v1/webhookEndpoints/{endpoint_id}", token=admin.token).status == 200


def pay(api, who: User, amount: int = 1000) -> dict:
    r = api.post("/v1/payments", {"email": who.email, "amount": amount}, token=who.token)
    assert r.status == 200, r.text
    return r.json


def mine(receiver: Receiver, payment_id: str) -> list[dict]:
    return [e for e in receiver.events if e["payment"]["id"] == payment_id]


def test_each_change_arrives_signed_in_history_order_with_the_payment_as_the_api_returns_it(api, admin, customer,
                                                                                             receiver, subscribed):
    endpoint = subscribed(receiver)
    confirmed, cancelled, deleted = pay(api, customer), pay(api, customer), pay(api, customer)
    assert api.post(f"/v1/payments/{confirmed['id']}:confirm", {}, token=admin.token).status == 200
    assert api.post(f"/v1/payments/{cancelled['id']}:cancel", {}, token=customer.token).status == 200
    assert api.delete(f"/v1/payments/{deleted['id']}", token=customer.token).status == 200
    assert api.post(f"/v1/payments/{deleted['id']}:undelete", {}, token=admin.token).status == 200

    receiver.wait_for(lambda r: len(mine(r, confirmed["id"])) == 2 and len(mine(r, cancelled["id"])) == 2
                      and len(mine(r, deleted["id"])) == 3)
    assert receiver.bad == []
    assert [e["type"] for e in mine(receiver, confirmed["id"])] == ["payment.created", "payment.succeeded"]
    # A refund: the refund and the payment after it, exactly as GetRefund and GetPayment answer them.
    refund = api.post(f"/v1/payments/{confirmed['id']}/refunds", {"amount": "400", "reason": "DUPLICATE"},
                      token=admin.token)
    assert refund.status == 200, refund.text
    receiver.wait_for(lambda r: len(mine(r, confirmed["id"])) == 3)
    refunded = mine(receiver, confirmed["id"])[-1]
    assert refunded["type"] == "payment.refunded" and "reason" not in refunded
    assert refunded["refund"] == api.get(f"/v1/payments/{confirmed['id']}/refunds/{refund.json['id']}",
                                         token=admin.token).json == refund.json
    assert refunded["payment"] == api.get(f"/v1/payments/{confirmed['id']}", token=admin.token).json
    assert refunded["payment"]["refunded_amount"] == "400" and refunded["payment"]["status"] == "SUCCESS"
    assert [(e["type"], e.get("reason")) for e in mine(receiver, cancelled["id"])] == [
        ("payment.created", None), ("payment.failed", "CANCELLED")]
    assert [e["type"] for e in mine(receiver, deleted["id"])] == ["payment.created", "payment.deleted",
                                                                 "payment.restored"]
    # The event ids are the payment history's, in its order.
    for payment in (confirmed, cancelled, deleted):
        history = api.get(f"/v1/payments/{payment['id']}/events", token=admin.token).json["events"]
        assert [h["id"] for h in history] == [e["id"] for e in mine(receiver, payment["id"])]
    # The payment exactly as GetPayment answers it over REST (unchanged since the last event).
    now = api.get(f"/v1/payments/{confirmed['id']}", token=admin.token).json
    assert mine(receiver, confirmed["id"])[-1]["payment"] == now
    assert mine(receiver, confirmed["id"])[0]["payment"] == confirmed  # as the create answered
    assert mine(receiver, deleted["id"])[1]["payment"]["deleted_at"]
    # The headers a receiver keys on: both schemes' (each checked above by its own library).
    arrival = next(a for a in receiver.arrivals if json.loads(a["body"])["payment"]["id"] == confirmed["id"])
    event = json.loads(arrival["body"])
    headers = arrival["headers"]
    assert headers["payments-event-id"] == headers["webhook-id"] == event["id"]
    assert headers["payments-signature"].startswith(f"t={headers['webhook-timestamp']},v1=")
    assert re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=", headers["webhook-signature"])
    assert headers["content-type"] == "application/json"
    assert arrival["path"] == "/hooks/payments"
    # The admin's view: every delivery with its attempt.
    seen = api.get(f"/v1/webhookEvents/{event['id']}", token=admin.token)
    assert seen.status == 200, seen.text
    [delivery] = [d for d in seen.json["deliveries"] if d["endpoint_id"] == endpoint["id"]]
    assert delivery["status"] == "SUCCEEDED" and delivery["attempts"][0]["http_status"] == 200
    assert seen.json["payment"] == event["payment"] and seen.json["type"] == event["type"]


def test_attempts_are_counted_in_the_servers_metrics(hooks_stack, api, admin, customer, receiver, subscribed):
    server, _ = hooks_stack

    def delivered() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
        found = re.search(r'^payments_webhook_attempts_total\{outcome="delivered"\} ([0-9.e+]+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    before = delivered()
    subscribed(receiver)
    payment = pay(api, customer)
    receiver.wait_for(lambda r: mine(r, payment["id"]))
    deadline = time.monotonic() + 5
    while delivered() < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert delivered() >= before + 1


def test_an_endpoint_hears_only_the_types_it_asked_for(api, admin, customer, receiver, subscribed):
    subscribed(receiver, types=("payment.succeeded",))
    first, second = pay(api, customer), pay(api, customer)
    assert api.post(f"/v1/payments/{first['id']}:confirm", {}, token=admin.token).status == 200
    assert api.post(f"/v1/payments/{second['id']}:cancel", {}, token=customer.token).status == 200
    receiver.wait_for(lambda r: mine(r, first["id"]))
    time.sleep(2.5)  # two more ticks: nothing else comes
    assert [(e["type"], e["payment"]["id"]) for e in receiver.events
            if e["payment"]["id"] in (first["id"], second["id"])] == [("payment.succeeded", first["id"])]


def test_receiver_down_then_back_gets_every_event(api, admin, customer, receiver, subscribed):
    endpoint = subscribed(receiver)
    receiver.stop()
    payments = [pay(api, customer) for _ in range(4)]
    assert api.post(f"/v1/payments/{payments[0]['id']}:confirm", {}, token=admin.token).status == 200
    # The attempts fail (connection refused) and are visible to the admin as such. A run that
    # failed once sends nothing more to that endpoint, so the oldest event is the one retried.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        events = api.get(f"/v1/webhookEvents?payment_id={payments[0]['id']}&type=payment.created",
                         token=admin.token).json["events"]
        attempts = [a for d in events[0].get("deliveries", []) if d["endpoint_id"] == endpoint["id"]
                    for a in d.get("attempts", [])]
        if len(attempts) >= 2:
            break
        time.sleep(0.2)
    assert len(attempts) >= 2 and all(a.get("error") and not a.get("http_status") for a in attempts), attempts
    receiver.start()
    receiver.wait_for(lambda r: all(mine(r, p["id"]) for p in payments) and len(mine(r, payments[0]["id"])) == 2)
    assert [e["type"] for e in mine(receiver, payments[0]["id"])] == ["payment.created", "payment.succeeded"]
    assert receiver.bad == []
    assert api.get(f"/v1/webhookEndpoints/{endpoint['id']}", token=admin.token).json["enabled"] is True


def test_a_failing_answer_holds_back_the_payments_later_events_until_it_succeeds(api, admin, customer, receiver, subscribed):
    endpoint = subscribed(receiver)
    receiver.status = 500
    payment = pay(api, customer)
    assert api.post(f"/v1/payments/{payment['id']}:confirm", {}, token=admin.token).status == 200
    receiver.wait_for(lambda r: len([a for a in r.arrivals if payment["id"] in a["body"].decode()]) >= 3)
    # While the created event fails, the succeeded one is never sent.
    assert {json.loads(a["body"])["type"] for a in receiver.arrivals
            if payment["id"] in a["body"].decode()} == {"payment.created"}
    receiver.status = 200
    receiver.wait_for(lambda r: len(mine(r, payment["id"])) == 2)
    assert [e["type"] for e in mine(receiver, payment["id"])] == ["payment.created", "payment.succeeded"]
    event_id = mine(receiver, payment["id"])[0]["id"]
    [delivery] = [d for d in api.get(f"/v1/webhookEvents/{event_id}", token=admin.token).json["deliveries"]
                  if d["endpoint_id"] == endpoint["id"]]
    statuses = [a.get("http_status") for a in delivery["attempts"]]
    assert statuses[-1] == 200 and 500 in statuses and "HTTP 500" in delivery["attempts"][0]["error"]
    # Every attempt at the event carried its id in webhook-id, each signed anew.
    tries = [a for a in receiver.arrivals if json.loads(a["body"])["id"] == event_id]
    assert len(tries) >= 4 and {a["headers"]["webhook-id"] for a in tries} == {event_id}
    assert receiver.bad == []


def test_a_410_gone_disables_the_endpoint_and_enabling_it_sends_what_waited(api, admin, customer, receiver,
                                                                          subscribed):
    endpoint = subscribed(receiver)
    receiver.status = 410
    payment = pay(api, customer)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seen = api.get(f"/v1/webhookEndpoints/{endpoint['id']}", token=admin.token).json
        if not seen.get("enabled"):  # false is left out of the JSON
            break
        time.sleep(0.2)
    assert "enabled" not in seen and "410 Gone" in seen["disabled_reason"], seen
    tried = len(receiver.arrivals)
    assert tried == 1 and receiver.bad == []
    time.sleep(2.5)  # two more ticks: nothing more is sent to it
    assert len(receiver.arrivals) == tried
    receiver.status = 200
    patched = api.request("PATCH", f"/v1/webhookEndpoints/{endpoint['id']}", {"enabled": True}, token=admin.token)
    assert patched.status == 200 and patched.json["enabled"] is True and "disabled_reason" not in patched.json
    receiver.wait_for(lambda r: mine(r, payment["id"]))
    assert receiver.bad == []


def test_a_503_with_retry_after_is_honoured_up_to_the_max_delay(api, admin, customer, receiver, subscribed):
    """The stack's max delay is 1 s, so a Retry-After of an hour waits 1 s, and the event then arrives
    (tests/unit/test_webhooks.py has the waits themselves; tests/service/test_webhooks_replicas.py a
    wait longer than the backoff, by a real server)."""
    endpoint = subscribed(receiver)
    receiver.status, receiver.reply_headers = 503, {"Retry-After": "3600"}
    payment = pay(api, customer)
    receiver.wait_for(lambda r: r.arrivals)
    receiver.status, receiver.reply_headers = 200, {}
    receiver.wait_for(lambda r: mine(r, payment["id"]), timeout=10)
    event_id = mine(receiver, payment["id"])[0]["id"]
    [delivery] = [d for d in api.get(f"/v1/webhookEvents/{event_id}", token=admin.token).json["deliveries"]
                  if d["endpoint_id"] == endpoint["id"]]
    assert delivery["attempts"][0]["http_status"] == 503
    assert delivery["attempts"][0]["error"].startswith("HTTP 503 (Retry-After: 3600)")
    times = [a["at"] for a in receiver.arrivals if json.loads(a["body"])["id"] == event_id]
    assert len(times) == len(delivery["attempts"]) >= 2
    assert times[1] - times[0] >= 1.0  # the max delay, not the 0.2 s backoff (nor the next 1 s tick)
    assert receiver.bad == []


def test_redelivery_sends_the_same_event_again(api, admin, customer, receiver, subscribed):
    endpoint = subscribed(receiver)
    payment = pay(api, customer)
    receiver.wait_for(lambda r: mine(r, payment["id"]))
    event_id = mine(receiver, payment["id"])[0]["id"]
    again = api.post(f"/v1/webhookEvents/{event_id}:redeliver", {"endpoint_id": endpoint["id"]}, token=admin.token)
    assert again.status == 200, again.text
    assert again.json["status"] == "PENDING"
    receiver.wait_for(lambda r: len([a for a in r.arrivals if json.loads(a["body"])["id"] == event_id]) == 2)
    assert len(mine(receiver, payment["id"])) == 1  # the receiver dropped the duplicate by its id
    [delivery] = [d for d in api.get(f"/v1/webhookEvents/{event_id}", token=admin.token).json["deliveries"]
                  if d["endpoint_id"] == endpoint["id"]]
    assert [a["http_status"] for a in delivery["attempts"]] == [200, 200]


def test_rotation_signs_with_both_secrets_until_the_old_one_ends(api, admin, customer, receiver, subscribed):
    endpoint = subscribed(receiver)
    old = receiver.secret
    rotated = api.post(f"/v1/webhookEndpoints/{endpoint['id']}:rotateSecret", {"previous_secret_ttl_seconds": 3600},
                       token=admin.token)
    assert rotated.status == 200, rotated.text
    new = rotated.json["secret"]
    assert new != old and rotated.json["endpoint"]["previous_secret_expires_at"]
    payment = pay(api, customer)
    receiver.wait_for(lambda r: mine(r, payment["id"]))  # verified with the old secret
    arrival = [a for a in receiver.arrivals if payment["id"] in a["body"].decode()][-1]
    assert receiver.verify(new, arrival["headers"]["payments-signature"], arrival["body"])
    assert stripe_verifies(new, arrival["headers"]["payments-signature"], arrival["body"])
    assert standard_verifies(new, arrival["headers"], arrival["body"])
    assert arrival["headers"]["payments-signature"].count("v1=") == 2
    assert [s[:3] for s in arrival["headers"]["webhook-signature"].split(" ")] == ["v1,", "v1,"]
    # Rotating again with a 1-second overlap: soon only the newest secret signs.
    newest = api.post(f"/v1/webhookEndpoints/{endpoint['id']}:rotateSecret", {"previous_secret_ttl_seconds": 1},
                      token=admin.token).json["secret"]
    receiver.secret = newest
    time.sleep(1.2)
    later = pay(api, customer)
    receiver.wait_for(lambda r: mine(r, later["id"]))
    arrival = [a for a in receiver.arrivals if later["id"] in a["body"].decode()][-1]
    assert arrival["headers"]["payments-signature"].count("v1=") == 1
    assert " " not in arrival["headers"]["webhook-signature"]
    assert not receiver.verify(new, arrival["headers"]["payments-signature"], arrival["body"])
    assert not standard_verifies(new, arrival["headers"], arrival["body"])
    assert not stripe_verifies(new, arrival["headers"]["payments-signature"], arrival["body"])
    assert receiver.bad == []


@pytest.mark.parametrize("url", [
    "https://10.0.0.5/hooks", "https://192.168.1.10/hooks", "https://172.16.0.1/hooks", "https://169.254.169.254/latest",
    "https://[fd00:ec2::254]/", "https://[fe80::1]/", "https://[::ffff:10.1.2.3]/", "https://100.64.0.1/",
    "https://metadata.google.internal/computeMetadata/v1/", "https://0.0.0.0/", "ftp://shop.example.com/",
    "http://shop.example.com/hooks", "https://user:pass@shop.example.com/", "https://shop/hooks", "not a url",
    "https://printer.local/", "https://[64:ff9b::a00:5]/",
])
def test_urls_that_are_not_public_https_are_refused(api, admin, url):
    r = api.post("/v1/webhookEndpoints", {"url": url, "event_types": ["*"], "enabled": True}, token=admin.token)
    assert r.status == 400, (url, r.text)
    code, reason, _ = r.error()
    assert (code, reason) == (3, "INVALID_WEBHOOK_ENDPOINT")
    assert "endpoint.url" in r.violations()


def test_bad_endpoint_fields_are_named(api, admin):
    r = api.post("/v1/webhookEndpoints", {"url": "https://shop.example.com/h", "event_types": ["payment.teleported"],
                                          "description": "x" * 501}, token=admin.token)
    assert r.status == 400
    assert set(r.violations()) == {"endpoint.event_types", "endpoint.description"}
    assert "payment.succeeded" in r.violations()["endpoint.event_types"]


def test_customers_cannot_touch_webhooks(api, customer):
    for method, path, body in [("POST", "/v1/webhookEndpoints", {"url": "https://shop.example.com/h", "event_types": ["*"]}),
                               ("GET", "/v1/webhookEndpoints", None), ("GET", "/v1/webhookEvents", None)]:
        r = api.request(method, path, body, token=customer.token)
        assert r.status == 403, (path, r.text)
        assert r.error()[1] == "ADMIN_ONLY"
    assert api.get("/v1/webhookEvents").status == 401  # and no token is no entry at Envoy


def test_the_secret_is_shown_once_and_endpoints_are_managed(api, admin):
    made = register(api, admin, "https://shop.example.com/hooks", ("payment.failed",), enabled=False)
    endpoint_id = made["endpoint"]["id"]
    assert made["secret"].startswith("whsec_")
    got = api.get(f"/v1/webhookEndpoints/{endpoint_id}", token=admin.token)
    assert got.status == 200 and made["secret"] not in got.text
    listed = api.get("/v1/webhookEndpoints?page_size=100", token=admin.token)
    assert endpoint_id in [e["id"] for e in listed.json["endpoints"]] and made["secret"] not in listed.text
    patched = api.request("PATCH", f"/v1/webhookEndpoints/{endpoint_id}",
                          {"enabled": True, "event_types": ["payment.failed", "payment.succeeded"]}, token=admin.token)
    assert patched.status == 200, patched.text
    assert patched.json["enabled"] is True and patched.json["url"] == "https://shop.example.com/hooks"
    assert patched.json["event_types"] == ["payment.succeeded", "payment.failed"]
    assert api.delete(f"/v1/webhookEndpoints/{endpoint_id}", token=admin.token).status == 200
    gone = api.get(f"/v1/webhookEndpoints/{endpoint_id}", token=admin.token)
    assert gone.status == 404 and gone.error()[1] == "WEBHOOK_ENDPOINT_NOT_FOUND"
