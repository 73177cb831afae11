"""Webhooks below the API: the address rules, the outbox (the history written with each change, and
not with one that rolled back), the dispatcher's order, backoff and giving up, on both databases; and the sender
against a real HTTP server on loopback: refused addresses (resolved at delivery time), no redirects,
a deadline for the whole attempt.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.domain import webhook_urls
from server.domain.errors import InvalidArgument, NotFound
from server.domain.paging import PageTokens
from server.domain.payments import PaymentDraft, PaymentRules
from server.domain.webhook_delivery import Attempt, Dispatcher, RetryPolicy, Run
from server.domain.webhooks import (GAVE_UP, PENDING, EndpointChange, WebhookRules, signature,
                                    signature_header)
from server.edge.webhook_body import event_body, event_json, reference_json
from server.infra import storage
from server.infra.webhook_sender import Sender
from tests.conftest import ADMIN_CALLER, ALICE
from tests.support.webhook_receiver import Receiver, readme_verifier


@pytest.mark.parametrize("address, allowed", [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
    ("10.1.2.3", False), ("172.31.255.255", False), ("192.168.0.1", False), ("127.0.0.1", False), ("::1", False),
    ("169.254.169.254", False), ("fe80::1", False), ("fd00:ec2::254", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False), ("255.255.255.255", False), ("::ffff:127.0.0.1", False),
    ("::ffff:93.184.216.34", True), ("64:ff9b::a00:1", False), ("2002:a00:1::", False), ("198.18.0.1", False),
])
def test_only_public_unicast_addresses_pass(address, allowed):
    assert (webhook_urls.address_problem(address, allow_loopback=False) is None) == allowed


def test_loopback_passes_only_with_the_development_setting():
    assert webhook_urls.address_problem("127.0.0.1", allow_loopback=True) is None
    assert webhook_urls.address_problem("::1", allow_loopback=True) is None
    assert webhook_urls.address_problem("10.0.0.1", allow_loopback=True)  # private stays refused
    assert webhook_urls.url_problem("http://127.0.0.1:8000/h", allow_loopback=True) is None
    assert webhook_urls.url_problem("http://localhost:8000/h", allow_loopback=True) is None
    assert webhook_urls.url_problem("http://127.0.0.1:8000/h", allow_loopback=False)
    assert webhook_urls.url_problem("http://shop.example.com/h", allow_loopback=True)  # http only to loopback
    assert webhook_urls.url_problem("https://shop.example.com:8443/hooks?x=1", allow_loopback=False) is None


def test_the_readme_verifier_accepts_the_services_signature_and_nothing_else():
    verify, _ = readme_verifier()
    body, now = b'{"id":"evt_x"}', int(time.time())
    header = signature_header(["whsec_new", "whsec_old"], now, body)
    assert verify("whsec_new", header, body) and verify("whsec_old", header, body)
    assert not verify("whsec_other", header, body)
    assert not verify("whsec_new", header, body + b" ")
    assert not verify("whsec_new", signature_header(["whsec_new"], now - 3600, body), body)  # a replay
    assert not verify("whsec_new", f"v1={signature('whsec_new', now, body)}", body)  # no timestamp


_times = st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2200, 1, 1),
                      timezones=st.just(dt.timezone.utc)) | st.sampled_from(
    [dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2026, 1, 1, 0, 0, 0, 120000, tzinfo=dt.timezone.utc)])


@settings(max_examples=300, deadline=None)
@given(payment=st.builds(
    storage.PaymentRecord, id=st.text(max_size=30), email=st.text(max_size=30), owner_id=st.none() | st.text(max_size=5),
    amount=st.integers(0, 999_999_999_999_999), currency=st.text(max_size=3), description=st.text(max_size=40),
    status=st.sampled_from(["pending", "success", "failed"]), failure_reason=st.sampled_from([None, "cancelled", "expired"]),
    created_by=st.just("usr_x"), request_id=st.none() | st.text(max_size=10), request_hash=st.none(),
    created_at=_times, updated_at=_times, expires_at=_times, deleted_at=st.none() | _times),
    kind=st.sampled_from(["payment.created", "payment.failed"]), at=_times,
    reason=st.sampled_from([None, "cancelled", "expired"]))
def test_the_fast_event_json_is_what_protobufs_printer_writes(payment, kind, at, reason):
    assert event_json("evt_x", kind, at, reason, payment) == reference_json("evt_x", kind, at, reason, payment)
    assert json.loads(event_body("evt_x", kind, at, reason, payment)) == reference_json("evt_x", kind, at, reason, payment)


@pytest.fixture
def webhook_rules(database, clock):
    return WebhookRules(queries=storage.WebhookQueries(), page_tokens=PageTokens(b"test-page-token-secret"),
                        clock=clock)


@pytest.fixture
def rules_with_outbox(database, clock) -> PaymentRules:
    return PaymentRules(page_tokens=PageTokens(b"test-page-token-secret"), payment_ttl=dt.timedelta(hours=1),
                        queries=storage.PaymentQueries(), clock=clock)


def outbox() -> list:
    """The events not yet fanned out, oldest first."""
    return list(storage.PaymentEvent.select().where(storage.PaymentEvent.dispatched == False)  # noqa: E712
                .order_by(storage.PaymentEvent.number))


def test_every_change_is_one_event_and_renders_the_payment_as_that_change_left_it(rules_with_outbox,
                                                                                 webhook_rules, clock):
    rules = rules_with_outbox
    a = rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=100))
    b = rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=200))
    rules.confirm(ADMIN_CALLER, a.id)
    rules.delete(ALICE, b.id)
    rules.undelete(ADMIN_CALLER, b.id)
    c = rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=300))
    clock.advance(hours=2)
    assert rules.expire_due(clock()) == 2  # b (restored, still pending) and c
    assert len(outbox()) == 8
    views, _ = webhook_rules.events(ADMIN_CALLER, page_size=100)
    views = views[::-1]  # oldest first
    assert [(v.type, v.event.payment_id) for v in views[:6]] == [
        ("payment.created", a.id), ("payment.created", b.id), ("payment.succeeded", a.id), ("payment.deleted", b.id),
        ("payment.restored", b.id), ("payment.created", c.id)]
    assert sorted((v.type, v.event.payment_id) for v in views[6:]) == sorted([("payment.failed", b.id),
                                                                             ("payment.failed", c.id)])
    # The payment as each change left it, whatever happened to it later.
    assert views[0].payment == a._replace(status="pending")  # created: as CreatePayment answered
    assert views[2].payment == rules.get(ADMIN_CALLER, a.id)  # confirmed, unchanged since
    deleted, restored = views[3].payment, views[4].payment
    assert deleted.deleted_at == deleted.updated_at == views[3].event.at and restored.deleted_at is None
    assert restored.updated_at == views[4].event.at and restored.status == "pending"
    expired = [v for v in views[6:] if v.event.payment_id == c.id][0]
    assert expired.reason == "expired" and expired.payment == rules.get(ADMIN_CALLER, c.id)
    assert expired.payment.status == "failed" and expired.payment.failure_reason == "expired"
    body = json.loads(event_body(expired.event.id, expired.type, expired.event.at, expired.reason, expired.payment))
    assert body["reason"] == "EXPIRED" and body["payment"]["failure_reason"] == "EXPIRED"


def test_a_change_that_rolls_back_leaves_no_event(rules_with_outbox, monkeypatch):
    payment = rules_with_outbox.create(ALICE, PaymentDraft(email=ALICE.email, amount=100))
    before = len(outbox())

    def failing(events):
        raise RuntimeError("the event cannot be written")

    monkeypatch.setattr(rules_with_outbox.queries, "insert_events", failing)
    with pytest.raises(RuntimeError):
        rules_with_outbox.confirm(ADMIN_CALLER, payment.id)
    assert len(outbox()) == before and rules_with_outbox.get(ADMIN_CALLER, payment.id).status == "pending"


class FakeSend:
    def __init__(self):
        self.answers: list[Attempt] = []
        self.sent: list[tuple[str, dict, dict]] = []

    def __call__(self, url, body, headers):
        self.sent.append((url, json.loads(body), headers))
        return self.answers.pop(0) if self.answers else Attempt(200, "", 1)


def dispatcher(clock, send, window=3600.0) -> Dispatcher:
    return Dispatcher(queries=storage.WebhookQueries(), send=send, render=event_body, clock=clock, lease_seconds=30,
                      policy=RetryPolicy(base_seconds=60, max_delay_seconds=600, window_seconds=window))


def deliver_all(d: Dispatcher) -> Run:
    d.fan_out(100)
    run = Run()
    d.deliver(100, run)
    return run


def test_a_failure_holds_back_the_payments_later_events_and_backs_off(rules_with_outbox, webhook_rules, clock):
    endpoint, secret = webhook_rules.create(ADMIN_CALLER, url="https://shop.example.com/h", event_types=["*"],
                                            enabled=True, description="")
    rules = rules_with_outbox
    first = rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=100))
    rules.confirm(ADMIN_CALLER, first.id)
    send = FakeSend()
    send.answers = [Attempt(503, "HTTP 503", 5)]
    d = dispatcher(clock, send)
    run = deliver_all(d)
    assert [s[1]["type"] for s in send.sent] == ["payment.created"] and run.failed == 1
    # Not due yet: nothing is sent, and the succeeded event waits behind the created one.
    clock.advance(seconds=30)
    assert deliver_all(d).delivered == 0 and len(send.sent) == 1
    clock.advance(seconds=31)
    run = deliver_all(d)
    assert [s[1]["type"] for s in send.sent] == ["payment.created", "payment.created", "payment.succeeded"]
    assert run.delivered == 2
    url, body, headers = send.sent[-1]
    assert url == "https://shop.example.com/h" and headers["Payments-Event-Id"] == body["id"]
    stamp = int(headers["Payments-Signature"].split(",")[0][2:])
    assert headers["Payments-Signature"] == signature_header([secret], stamp, json.dumps(body, separators=(",", ":")).encode())


def test_backoff_doubles_and_a_delivery_failing_for_the_whole_window_disables_its_endpoint(rules_with_outbox,
                                                                                         webhook_rules, clock):
    endpoint, _ = webhook_rules.create(ADMIN_CALLER, url="https://shop.example.com/h", event_types=["*"],
                                       enabled=True, description="")
    rules_with_outbox.create(ALICE, PaymentDraft(email=ALICE.email, amount=100))
    [event] = outbox()
    send = FakeSend()
    d = dispatcher(clock, send, window=1000)
    waits = []
    for _ in range(10):
        send.answers = [Attempt(0, "ConnectionRefusedError: [Errno 111] Connection refused", 1)]
        deliver_all(d)
        [delivery] = storage.WebhookQueries().deliveries_of([event.id])
        if delivery.status != PENDING:
            break
        waits.append((delivery.next_attempt_at - clock()).total_seconds())
        clock.advance(seconds=waits[-1] + 0.001)
    assert len(waits) == 4  # 60 s, doubling, each up to a tenth less (jitter); the fifth would end past the window
    for wait, full in zip(waits, (60, 120, 240, 480)):
        assert 0.9 * full - 0.01 <= wait <= full + 0.01, waits
    assert delivery.status == GAVE_UP and delivery.attempts == 5
    after = webhook_rules.get(ADMIN_CALLER, endpoint.id)
    assert not after.enabled and "could not be delivered in 5 attempts" in after.disabled_reason
    assert "Connection refused" in after.disabled_reason
    # Enabling it again clears the reason; a redelivery sends the given-up event once more.
    again = webhook_rules.update(ADMIN_CALLER, endpoint.id, EndpointChange(enabled=True))
    assert again.enabled and again.disabled_reason is None
    webhook_rules.redeliver(ADMIN_CALLER, event.id, endpoint.id)
    assert deliver_all(d).delivered == 1


def test_a_dead_endpoint_gets_one_probe_a_run_and_does_not_hold_back_the_others(rules_with_outbox, webhook_rules,
                                                                                clock):
    webhook_rules.create(ADMIN_CALLER, url="https://dead.example.com/h", event_types=["*"], enabled=True, description="")
    webhook_rules.create(ADMIN_CALLER, url="https://live.example.com/h", event_types=["*"], enabled=True, description="")
    for n in range(12):
        rules_with_outbox.create(ALICE, PaymentDraft(email=ALICE.email, amount=100 + n))

    class Split(FakeSend):
        def __call__(self, url, body, headers):
            super().__call__(url, body, headers)
            return Attempt(0, "timed out after 10 s", 10_000) if "dead" in url else Attempt(204, "", 3)

    send = Split()
    d = dispatcher(clock, send)
    d.fan_out(100)
    run = Run()
    while d.deliver(5, run):  # batches of 5, as the job loops them
        pass
    sent = [url for url, _, _ in send.sent]
    assert sent.count("https://dead.example.com/h") == 1 and sent.count("https://live.example.com/h") == 12
    assert (run.delivered, run.failed) == (12, 1)


def test_several_payments_are_sent_at_once_each_in_its_order(rules_with_outbox, webhook_rules, clock):
    webhook_rules.create(ADMIN_CALLER, url="https://shop.example.com/h", event_types=["*"], enabled=True, description="")
    payments = [rules_with_outbox.create(ALICE, PaymentDraft(email=ALICE.email, amount=100 + n)) for n in range(8)]
    for p in payments:
        rules_with_outbox.cancel(ALICE, p.id)

    class Slow(FakeSend):
        in_flight = most = 0
        lock = threading.Lock()

        def __call__(self, url, body, headers):
            with self.lock:
                self.in_flight += 1
                self.most = max(self.most, self.in_flight)
            time.sleep(0.05)
            with self.lock:
                self.in_flight -= 1
                return super().__call__(url, body, headers)

    send = Slow()
    d = Dispatcher(queries=storage.WebhookQueries(), send=send, render=event_body, clock=clock, lease_seconds=30,
                   policy=RetryPolicy(), concurrency=4)
    d.fan_out(100)
    run = Run()
    while d.deliver(100, run):
        pass
    assert run.delivered == 16 and 1 < send.most <= 4
    for p in payments:
        assert [b["type"] for _, b, _ in send.sent if b["payment"]["id"] == p.id] == ["payment.created", "payment.failed"]


def test_events_of_types_nobody_asked_for_make_no_delivery(rules_with_outbox, webhook_rules, clock):
    webhook_rules.create(ADMIN_CALLER, url="https://shop.example.com/h", event_types=["payment.failed"], enabled=True,
                         description="")
    webhook_rules.create(ADMIN_CALLER, url="https://off.example.com/h", event_types=["*"], enabled=False,
                         description="")
    p = rules_with_outbox.create(ALICE, PaymentDraft(email=ALICE.email, amount=100))
    rules_with_outbox.cancel(ALICE, p.id)
    send = FakeSend()
    deliver_all(dispatcher(clock, send))
    assert [(s[0], s[1]["type"]) for s in send.sent] == [("https://shop.example.com/h", "payment.failed")]


def test_a_leased_delivery_is_not_sent_by_a_second_run(rules_with_outbox, webhook_rules, clock):
    webhook_rules.create(ADMIN_CALLER, url="https://shop.example.com/h", event_types=["*"], enabled=True, description="")
    rules_with_outbox.create(ALICE, PaymentDraft(email=ALICE.email, amount=100))
    queries = storage.WebhookQueries()
    d = dispatcher(clock, FakeSend())
    d.fan_out(100)
    [endpoint] = queries.enabled_endpoints()
    [due] = queries.due(endpoint.id, clock(), 10)
    assert queries.lease([due.number], clock(), clock() + dt.timedelta(seconds=30)) == [due.number]
    assert queries.lease([due.number], clock(), clock() + dt.timedelta(seconds=30)) == []  # another run's
    send = FakeSend()
    run = Run()
    dispatcher(clock, send).deliver(10, run)
    assert send.sent == []
    clock.advance(seconds=31)  # the run that leased it died: its lease runs out, another run sends it
    dispatcher(clock, send).deliver(10, Run())
    assert len(send.sent) == 1


def test_registration_rules(webhook_rules):
    with pytest.raises(InvalidArgument) as bad:
        webhook_rules.create(ADMIN_CALLER, url="https://10.0.0.8/h", event_types=["*", "payment.created"], enabled=True,
                             description="")
    assert {f for f, _ in bad.value.violations} == {"endpoint.url", "endpoint.event_types"}
    endpoint, _ = webhook_rules.create(ADMIN_CALLER, url="https://hooks.example.com/h", event_types=["*"],
                                       enabled=True, description="")
    with pytest.raises(InvalidArgument) as too_long:  # an endpoint that exists: the TTL alone is refused
        webhook_rules.rotate(ADMIN_CALLER, endpoint.id, previous_ttl_seconds=8 * 24 * 3600)
    assert too_long.value.reason == "INVALID_ROTATION"
    assert [f for f, _ in too_long.value.violations] == ["previous_secret_ttl_seconds"]
    with pytest.raises(NotFound) as missing:  # a valid TTL for an endpoint that does not exist
        webhook_rules.rotate(ADMIN_CALLER, "whe_" + "a" * 26, previous_ttl_seconds=3600)
    assert missing.value.reason == "WEBHOOK_ENDPOINT_NOT_FOUND"


# --- the sender, against a real HTTP server ---------------------------------------------------


class Answering(http.server.ThreadingHTTPServer):
    def __init__(self, status: int = 200, delay: float = 0.0, body: bytes = b"ok", drip: bool = False):
        self.status, self.delay, self.body, self.drip, self.hits = status, delay, body, drip, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                outer.hits += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(outer.delay)
                self.send_response(outer.status)
                if outer.status == 302:
                    self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                if outer.drip:
                    for byte in outer.body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.2)
                else:
                    self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/h"

    def handle_error(self, request, client_address):
        """A client that hung up mid-answer (the sender's deadline, a killed server) is expected here."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def answering():
    servers = []

    def make(**kw) -> Answering:
        servers.append(Answering(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.shutdown()
        s.server_close()


def test_a_name_that_resolves_to_loopback_is_refused_at_delivery_and_never_connected(answering):
    server = answering()
    port = server.server_address[1]
    attempt = Sender(allow_loopback=False)(f"https://localhost:{port}/h", b"{}", {})
    assert attempt.http_status == 0 and "refused: localhost resolves to 127.0.0.1 is a loopback address" in attempt.error
    private = Sender(allow_loopback=True, resolver=lambda host, port: ["93.184.216.34", "10.0.0.7"])
    assert "10.0.0.7 is a private address" in private("https://shop.example.com/h", b"{}", {}).error
    metadata = Sender(resolver=lambda host, port: ["169.254.169.254"])("https://shop.example.com/h", b"{}", {})
    assert "link-local" in metadata.error
    assert server.hits == 0


def test_the_address_checked_is_the_address_connected_to(answering):
    server = answering()
    calls = []

    def resolver(host, port):  # a name that answers differently each time (DNS rebinding)
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["10.0.0.9"]

    attempt = Sender(allow_loopback=True, resolver=resolver)(server.url.replace("127.0.0.1", "hooks.localhost"), b"{}", {})
    assert attempt.ok and server.hits == 1 and len(calls) == 1


def test_a_redirect_is_a_failure_and_is_not_followed(answering):
    server = answering(status=302)
    attempt = Sender(allow_loopback=True)(server.url, b"{}", {})
    assert not attempt.ok and attempt.http_status == 302 and "redirects are not followed" in attempt.error
    assert server.hits == 1


def test_the_whole_attempt_has_a_deadline_even_for_a_trickling_answer(answering):
    slow = answering(delay=3)
    started = time.monotonic()
    attempt = Sender(timeout=0.5, allow_loopback=True)(slow.url, b"{}", {})
    assert "timed out after 0.5 s" in attempt.error and time.monotonic() - started < 1.5
    drip = answering(status=500, body=b"x" * 50, drip=True)
    started = time.monotonic()
    attempt = Sender(timeout=1, allow_loopback=True)(drip.url, b"{}", {})
    assert not attempt.ok and time.monotonic() - started < 2.0


def test_only_part_of_a_large_answer_is_read(answering):
    big = answering(status=500, body=b"e" * 5_000_000)
    attempt = Sender(allow_loopback=True)(big.url, b"{}", {})
    assert attempt.http_status == 500 and len(attempt.error) < 300


def test_plain_http_only_to_loopback_even_when_allowed():
    attempt = Sender(allow_loopback=True, resolver=lambda h, p: ["93.184.216.34"])("http://shop.example.com/h", b"{}", {})
    assert "plain http" in attempt.error


def test_the_receiver_fixture_checks_signatures():
    receiver = Receiver(secret="whsec_test")
    try:
        body = b'{"id":"evt_1","type":"payment.created","payment":{"id":"pay_1"}}'
        headers = {"Payments-Signature": signature_header(["whsec_test"], int(time.time()), body)}
        assert Sender(allow_loopback=True)(receiver.url, body, headers).ok
        assert not Sender(allow_loopback=True)(receiver.url, body, {"Payments-Signature": "t=1,v1=00"}).ok
        assert len(receiver.events) == 1 and len(receiver.bad) == 1
    finally:
        receiver.stop()
