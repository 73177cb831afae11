"""Webhook delivery against a small model (hypothesis's stateful testing), on SQLite and PostgreSQL:
endpoints registered, disabled, enabled, rotated and deleted, payments created and changed, events
redelivered, a clock moved by hand, and delivery runs against simulated receivers that succeed,
fail (503), time out or answer slowly.

Checked at every attempt and after every step:
- never out of a payment's order: an event goes to an endpoint only when every earlier event of its
  payment was delivered there or given up;
- every body is the payment as that change left it (status and failure reason, the event's type);
- every attempt is signed with the endpoint's current secret (and, within its time, the previous one);
- attempt schedules as documented: a pending delivery with n failed attempts is due between 0.9 and
  1.0 times base * 2^(n-1) (at most the max delay) after its last attempt; after a redelivery or an
  enable, none counted;
- no endpoint starved: every enabled endpoint with something due when a run starts gets an attempt in it;
- at least once: once every receiver answers and the clock has passed every wait, every event an
  enabled endpoint was subscribed to has reached it, unless given up.
The transitions reached are printed at the end of the run (tests/support/reached.py).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time

import pytest

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from server.domain.paging import PageTokens
from server.domain.payments import PaymentDraft, PaymentRules
from server.domain.webhook_delivery import Attempt, Dispatcher, RetryPolicy, Run
from server.domain.webhooks import DELIVERED, GAVE_UP, PENDING, EndpointChange, WebhookRules
from server.edge.webhook_body import event_body
from server.infra import storage
from server.infra.storage.models import PaymentEvent, WebhookAttempt, WebhookDelivery
from tests.conftest import ADMIN_CALLER, ALICE
from tests.support.reached import reached
from server.domain.webhooks import signature


def signed_with(secret: str, header: str, raw: bytes) -> bool:
    """Payments-Signature carries a v1 of `secret` (the simulated clock is not the verifiers' now)."""
    parts = [p.split("=", 1) for p in header.split(",")]
    stamp = next(v for k, v in parts if k == "t")
    return signature(secret, int(stamp), raw) in {v for k, v in parts if k == "v1"}

EXAMPLES = int(os.environ.get("PAYMENTS_MODEL_EXAMPLES", "15"))
STEPS = int(os.environ.get("PAYMENTS_MODEL_STEPS", "30"))
MACHINE = "webhook delivery"
POLICY = RetryPolicy(base_seconds=60, max_delay_seconds=600, window_seconds=3000)
BEHAVIOURS = ("ok", "fail", "timeout", "slow")
STATUS_OF = {"payment.created": "PENDING", "payment.succeeded": "SUCCESS", "payment.failed": "FAILED"}


class Receivers:
    """The simulated receivers, by URL, and every attempt they saw."""

    def __init__(self):
        self.behaviour: dict[str, str] = {}
        self.log: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, url, body, headers):
        behaviour = self.behaviour.get(url, "ok")
        if behaviour == "slow":
            time.sleep(0.005)
        with self.lock:
            self.log.append({"url": url, "body": json.loads(body), "raw": body, "headers": headers, "ok": behaviour in ("ok", "slow")})
        if behaviour == "fail":
            return Attempt(503, "HTTP 503", 3)
        if behaviour == "timeout":
            return Attempt(0, "timed out after 15 s (waiting for the answer)", 15_000)
        return Attempt(200, "", 5)


def make_machine(clock):
    queries = storage.WebhookQueries()
    payments = PaymentRules(page_tokens=PageTokens(b"test-page-token-secret"), payment_ttl=dt.timedelta(days=30),
                            queries=storage.PaymentQueries(), clock=clock)
    hooks = WebhookRules(queries=queries, page_tokens=PageTokens(b"test-page-token-secret"), clock=clock)

    class Delivery(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            for model in (WebhookAttempt, WebhookDelivery, storage.PaymentEvent, storage.Payment):
                model.delete().execute()
            storage.WebhookQueries  # noqa: B018
            from server.infra.storage.models import WebhookEndpoint
            WebhookEndpoint.delete().execute()
            clock.now = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
            self.receivers = Receivers()
            self.dispatcher = Dispatcher(queries=queries, send=self.receivers, render=event_body, clock=clock,
                                         lease_seconds=30, policy=POLICY, concurrency=2)
            self.endpoints: dict[str, dict] = {}  # id -> {"url", "secrets": [(secret, valid until or None)], "enabled"}
            self.payments: list[str] = []
            self.expected: dict[str, set[str]] = {}  # endpoint id -> event ids it was subscribed to
            self.event_status: dict[str, str] = {}  # event id -> the payment's status after it
            self.n = 0

        # --- steps ---------------------------------------------------------------------

        @initialize(behaviours=st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=2),
                    changes=st.integers(1, 4))
        def some_endpoints_and_payments(self, behaviours, changes):
            for behaviour in behaviours:
                self.register(behaviour)
            for _ in range(changes):
                self.create_payment()

        @precondition(lambda self: len(self.endpoints) < 3)
        @rule(behaviour=st.sampled_from(BEHAVIOURS))
        def register(self, behaviour):
            self.n += 1
            url = f"https://e{self.n}.example.com/h"
            endpoint, secret = hooks.create(ADMIN_CALLER, url=url, event_types=["*"], enabled=True, description="")
            self.endpoints[endpoint.id] = {"url": url, "secrets": [(secret, None)], "enabled": True}
            self.expected[endpoint.id] = set()
            self.receivers.behaviour[url] = behaviour
            reached(MACHINE, "register")

        def pick(self, data):
            return data.draw(st.sampled_from(list(self.endpoints)))  # in the order made: replays draw the same

        @precondition(lambda self: self.endpoints)
        @rule(data=st.data(), behaviour=st.sampled_from(BEHAVIOURS))
        def receiver_changes(self, data, behaviour):
            self.receivers.behaviour[self.endpoints[self.pick(data)]["url"]] = behaviour
            reached(MACHINE, f"receiver now {behaviour}")

        @precondition(lambda self: self.endpoints)
        @rule(data=st.data(), enabled=st.booleans())
        def enable_or_disable(self, data, enabled):
            eid = self.pick(data)
            hooks.update(ADMIN_CALLER, eid, EndpointChange(enabled=enabled))
            self.endpoints[eid]["enabled"] = enabled
            reached(MACHINE, "enable" if enabled else "disable")

        @precondition(lambda self: self.endpoints)
        @rule(data=st.data())
        def rotate(self, data):
            eid = self.pick(data)
            _, secret = hooks.rotate(ADMIN_CALLER, eid, previous_ttl_seconds=600)
            e = self.endpoints[eid]
            e["secrets"] = [(secret, None), (e["secrets"][0][0], clock.now + dt.timedelta(seconds=600))]
            reached(MACHINE, "rotate")

        @precondition(lambda self: self.endpoints)
        @rule(data=st.data())
        def delete(self, data):
            eid = self.pick(data)
            hooks.delete(ADMIN_CALLER, eid)
            del self.endpoints[eid], self.expected[eid]
            reached(MACHINE, "delete")

        @rule()
        def create_payment(self):
            p = payments.create(ALICE, PaymentDraft(email=ALICE.email, amount=1250))
            self.payments.append(p.id)
            self.note_last_event(p.id, "PENDING")
            reached(MACHINE, "payment created")

        @precondition(lambda self: self.payments)
        @rule(data=st.data(), op=st.sampled_from(["confirm", "cancel"]))
        def change_payment(self, data, op):
            pid = data.draw(st.sampled_from(self.payments))
            try:
                (payments.confirm(ADMIN_CALLER, pid) if op == "confirm" else payments.cancel(ALICE, pid))
            except Exception:
                reached(MACHINE, f"{op}: refused")
                return
            self.note_last_event(pid, "SUCCESS" if op == "confirm" else "FAILED")
            reached(MACHINE, f"{op}: ok")

        def note_last_event(self, pid, status):
            last = PaymentEvent.select().where(PaymentEvent.payment_id == pid).order_by(PaymentEvent.number.desc()).get()
            self.event_status[last.id] = status

        @precondition(lambda self: self.endpoints and self.event_status)
        @rule(data=st.data())
        def redeliver(self, data):
            eid = self.pick(data)
            event_id = data.draw(st.sampled_from(list(self.event_status)))
            dispatched = PaymentEvent.get(PaymentEvent.id == event_id).dispatched
            if not self.endpoints[eid]["enabled"] or not dispatched:
                reached(MACHINE, "redeliver: skipped (disabled or not fanned out)")
                return
            hooks.redeliver(ADMIN_CALLER, event_id, eid)
            self.expected[eid].add(event_id)
            delivery = WebhookDelivery.get((WebhookDelivery.event_id == event_id) & (WebhookDelivery.endpoint_id == eid))
            assert (delivery.status, delivery.attempts, delivery.first_attempt_at) == (PENDING, 0, None)
            reached(MACHINE, "redeliver")

        @rule(seconds=st.sampled_from([10, 61, 300, 900]))
        def clock_forward(self, seconds):
            clock.advance(seconds=seconds)
            reached(MACHINE, f"clock +{seconds} s")

        @rule()
        def delivery_run(self):
            self.run_once("delivery run")

        def run_once(self, label=None):
            undispatched = [e.id for e in PaymentEvent.select().where(PaymentEvent.dispatched == False)]  # noqa: E712
            for eid, e in self.endpoints.items():
                if e["enabled"]:
                    self.expected[eid].update(undispatched)
            while self.dispatcher.fan_out(50):
                pass
            now = clock.now
            # Every delivery as this run finds it: what each of its attempts is checked against
            # (a delivery made later, by a redelivery, did not exist when the attempt was sent).
            rows = {(d.endpoint_id, d.payment_id, d.event_number): d.status for d in WebhookDelivery.select()}
            pending = list(WebhookDelivery.select().where(WebhookDelivery.status == PENDING))
            # Sendable now: due, and no earlier pending event of its payment waiting for its own time.
            due_endpoints = {d.endpoint_id for d in pending
                             if d.next_attempt_at <= now and self.endpoints.get(d.endpoint_id, {}).get("enabled")
                             and not any(o.endpoint_id == d.endpoint_id and o.payment_id == d.payment_id
                                         and o.event_number < d.event_number and o.next_attempt_at > now
                                         for o in pending)}
            before = len(self.receivers.log)
            run = Run()
            while self.dispatcher.deliver(100, run):
                pass
            for attempt in self.receivers.log[before:]:
                attempt["rows"] = rows
            urls = {a["url"] for a in self.receivers.log[before:]}
            for eid in due_endpoints:  # no endpoint starved
                assert self.endpoints[eid]["url"] in urls, (eid, due_endpoints, urls)
            for attempt in self.receivers.log[before:]:
                self.check_attempt(attempt)
            if label:
                failed = sum(1 for a in self.receivers.log[before:] if not a["ok"])
                reached(MACHINE, f"{label}: {'nothing due' if len(self.receivers.log) == before else 'sent, some failed' if failed else 'sent, all answered'}")

        def check_attempt(self, attempt):
            body = attempt["body"]
            assert STATUS_OF.get(body["type"], body["payment"]["status"]) == body["payment"]["status"]
            assert body["payment"]["status"] == self.event_status[body["id"]], (body, self.event_status[body["id"]])
            eid = next(i for i, e in self.endpoints.items() if e["url"] == attempt["url"])
            current = self.endpoints[eid]["secrets"][0][0]
            assert signed_with(current, attempt["headers"]["Payments-Signature"], attempt["raw"])
            for secret, until in self.endpoints[eid]["secrets"][1:]:
                if until is not None and until > clock.now:
                    assert signed_with(secret, attempt["headers"]["Payments-Signature"], attempt["raw"])

        @rule()
        def settle(self):
            """Every receiver answers, the clock passes every wait: every subscribed event arrives."""
            for url in self.receivers.behaviour:
                self.receivers.behaviour[url] = "ok"
            for _ in range(4):
                clock.advance(seconds=POLICY.max_delay_seconds + 1)
                self.run_once("settle run")
            for eid, events in self.expected.items():
                if not self.endpoints[eid]["enabled"]:
                    continue
                got = {a["body"]["id"] for a in self.receivers.log if a["url"] == self.endpoints[eid]["url"] and a["ok"]}
                gave_up = {d.event_id for d in WebhookDelivery.select().where(
                    (WebhookDelivery.endpoint_id == eid) & (WebhookDelivery.status == GAVE_UP))}
                assert events <= got | gave_up, (eid, events - got - gave_up)
            reached(MACHINE, "settle: every subscribed event arrived or was given up")

        # --- checks ------------------------------------------------------------------

        @invariant()
        def never_out_of_a_payments_order(self):
            """Each attempt against the deliveries as its run found them: every earlier event of
            its payment that had a delivery to that endpoint then was delivered there before it,
            or given up. (Checked against the deliveries as they are now, an older event
            redelivered to an endpoint registered after it was fanned out looked like one the
            later event had overtaken: a false failure, found only by some runs.)"""
            numbers = {ev.id: ev.number for ev in PaymentEvent.select(PaymentEvent.id, PaymentEvent.number)}
            event_of = {n: i for i, n in numbers.items()}
            for eid, e in self.endpoints.items():
                sent = [a for a in self.receivers.log if a["url"] == e["url"]]
                delivered_so_far: set[str] = set()
                for a in sent:
                    pid, number = a["body"]["payment"]["id"], numbers[a["body"]["id"]]
                    for (endpoint, p, n), s in a["rows"].items():
                        if endpoint == eid and p == pid and n < number:
                            earlier = event_of[n]
                            assert earlier in delivered_so_far or s == GAVE_UP, (a["body"]["id"], earlier, s)
                    if a["ok"]:
                        delivered_so_far.add(a["body"]["id"])

        @invariant()
        def attempt_schedules_as_documented(self):
            for d in WebhookDelivery.select().where(WebhookDelivery.status == PENDING):
                if d.attempts == 0:
                    assert d.first_attempt_at is None
                    continue
                last = WebhookAttempt.select().where(WebhookAttempt.delivery_number == d.number).order_by(
                    WebhookAttempt.number.desc()).first()
                full = min(POLICY.base_seconds * 2 ** (d.attempts - 1), POLICY.max_delay_seconds)
                wait = (d.next_attempt_at - last.at).total_seconds()
                assert 0.9 * full - 0.01 <= wait <= full + 0.01, (d.attempts, wait, full)
                reached(MACHINE, f"a pending delivery after {min(d.attempts, 4)}{'+' if d.attempts >= 4 else ''} failures")

        @invariant()
        def no_delivery_without_its_endpoint_and_no_attempt_without_its_delivery(self):
            assert {d.endpoint_id for d in WebhookDelivery.select()} <= set(self.endpoints)
            numbers = {d.number for d in WebhookDelivery.select(WebhookDelivery.number)}
            assert {a.delivery_number for a in WebhookAttempt.select()} <= numbers

    return Delivery


# No explain phase: it runs the failing example again under a line tracer, which on PostgreSQL
# took longer than the test's timeout, so a failure was reported as a hang.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]


def test_webhook_delivery_matches_its_model(database, clock):
    run_state_machine_as_test(
        make_machine(clock),
        settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, phases=PHASES,
                          suppress_health_check=list(HealthCheck)))
