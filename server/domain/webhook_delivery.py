"""Webhook delivery, the rules the job follows: fan out, the payment's order, retries, giving up.

Each run of the delivery job (server/infra/jobs.py) first fans out new outbox events into
deliveries, one per enabled endpoint that wants the type, then sends what is due:

- **At least once.** A delivery is pending until an attempt is answered with a 2xx; a run that dies
  half-way (kill -9) leaves it pending, and its lease runs out, so another run sends it again. The
  receiver sees the same event id twice and drops the second (docs/webhooks.md).
- **Once per attempt across replicas, and more replicas deliver more.** The job runs in every
  replica at every tick; a batch claims the deliveries it is about to send (one statement picks
  an endpoint's next due deliveries that no live lease holds and leases them; on PostgreSQL it
  skips the rows another replica's claim is taking, FOR UPDATE SKIP LOCKED), so replicas running
  at once send disjoint pieces of the same endpoint's backlog, and no two, nor a run outliving its
  tick, send the same attempt. Fan-out is one replica's at a time (the others go on sending), so
  a payment's events become deliveries in its order. Every write after an attempt names that lease (a token
  per batch): when the lease has passed (run out and taken by another run; taken back by a
  redelivery, an enable, a delete, a purge) the outcome is dropped and counted (`late`).
- **In the payment's order.** An event goes to an endpoint only after every earlier event of the
  same payment was delivered there or given up, so a receiver never sees payment.succeeded before
  payment.created; a failed attempt holds back the rest of that payment for that endpoint.
- **Backoff.** After the n-th failed attempt the next waits base * 2^(n-1), at most max_delay,
  less up to a tenth at random (replicas retrying many deliveries do not do it in step). Once the
  next attempt would fall outside the window (three days from the first), the delivery is given up
  and its endpoint disabled with the reason: one that failed for three days is broken, and the
  admin sees why in disabled_reason.
- **The receiver's word** (Standard Webhooks' delivery guidance). A `410 Gone` says it wants no more:
  the endpoint is disabled at once, with that in disabled_reason (its deliveries stay pending, and
  go on when an admin enables it again). A `429` or `503` with a `Retry-After` (seconds or an
  HTTP-date) is a wait for the whole endpoint: no attempt to it before then, at most max_delay
  away; the failed delivery waits for the later of that and its backoff.
- **One failing endpoint does not stall the rest.** Each endpoint's due deliveries are read on their
  own (an index per endpoint), so a dead endpoint's backlog is never stepped over; after a failed
  attempt the run sends nothing more to that endpoint (those already in flight end), and the others
  go on.
- **Several at once.** Up to `concurrency` POSTs are in flight, each for a different payment, so a
  slow receiver costs its latency once per `concurrency` events, not once per event.
- **A run ends on time.** A batch waits for its senders only until its share of the run's time
  ends (or the server stops); an attempt still in flight is handed off and writes its own outcome
  under its lease when it ends (within the sender's timeout), so the job's turn is never held
  past its budget by a receiver.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import logging
import random
import re
import secrets
import threading
import time
from typing import Callable, NamedTuple

from server.domain.webhooks import (DELIVERED, GAVE_UP, PENDING, TYPE_OF_ACTION, payment_after, reason_of,
                                    signed_headers)

log = logging.getLogger(__name__)

GONE = 410  # the receiver wants no more: the endpoint is disabled
HOLD_STATUSES = (429, 503)  # Too Many Requests, Service Unavailable: their Retry-After is honoured


class Attempt(NamedTuple):
    """How one POST went: the HTTP status (0: no answer), unless it succeeded why not, and the
    answer's Retry-After header as it came (empty: none)."""

    http_status: int
    error: str
    duration_ms: int
    retry_after: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and 200 <= self.http_status < 300


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    base_seconds: float = 60.0
    max_delay_seconds: float = 12 * 3600.0
    window_seconds: float = 3 * 24 * 3600.0

    def delay(self, failed_attempts: int) -> dt.timedelta:
        seconds = min(self.base_seconds * 2 ** min(failed_attempts - 1, 40), self.max_delay_seconds)
        return dt.timedelta(seconds=seconds * random.uniform(0.9, 1.0))

    def asked_wait(self, attempt: Attempt, now: dt.datetime) -> dt.timedelta | None:
        """How long the receiver asked to be left alone: a 429's or 503's Retry-After, at most
        max_delay; None when it asked nothing this honours."""
        if attempt.http_status not in HOLD_STATUSES or (seconds := retry_after_seconds(attempt.retry_after, now)) is None:
            return None
        return dt.timedelta(seconds=min(seconds, self.max_delay_seconds))


def retry_after_seconds(value: str, now: dt.datetime) -> float | None:
    """A Retry-After header's wait in seconds (RFC 9110 section 10.2.3: delay-seconds, or an
    HTTP-date, which is read against `now`); None for anything else."""
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value) if len(value) <= 15 else float("inf")
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as HTTP-dates always are
        when = when.replace(tzinfo=dt.UTC)
    return max((when - now).total_seconds(), 0.0)


Send = Callable[[str, bytes, dict], Attempt]  # (url, body, headers) -> Attempt

# What a receiver's text may not bring into the attempt log, the disabled reason or a log line:
# C0 and C1 controls (CR, LF, ESC and the terminal sequences it starts, NUL), DEL, the Unicode
# format characters (bidirectional overrides) and line and paragraph separators.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2028\u2029\u2060-\u206f\ufeff]")


def printable(text: str) -> str:
    """`text` with every control or format character a space: what is kept of a receiver's words."""
    return _UNPRINTABLE.sub(" ", text)


class Outcome(NamedTuple):
    """What an attempt leaves in the database: its row, its delivery's new state, and the reason
    its endpoint is disabled with, when this attempt gave up."""

    delivery_number: int
    attempt: dict
    status: str
    first_attempt_at: dt.datetime
    next_attempt_at: dt.datetime
    disable: str | None = None
    hold: dt.datetime | None = None  # no attempt to the endpoint before this (its Retry-After)


def _stopped(deadline: float | None, stopping: threading.Event | None) -> bool:
    return (stopping is not None and stopping.is_set()) or (deadline is not None and time.monotonic() >= deadline)


@dataclasses.dataclass
class Run:
    """What one job run keeps between its batches."""

    # Deliveries this run held back (an earlier event of their payment was pending and not in the
    # same batch): not claimed again in this run. Everything else released (another replica's run
    # ending, this run's own hand-off) may be claimed again at once.
    held_back: set = dataclasses.field(default_factory=set)
    finished: set = dataclasses.field(default_factory=set)  # endpoints with nothing more due in this run
    failing: set = dataclasses.field(default_factory=set)  # endpoints that failed in this run
    delivered: int = 0
    failed: int = 0
    gave_up: int = 0
    late: int = 0  # attempts whose outcome was not written: their lease had passed to another


Render = Callable[..., str]  # (event id, type, time, reason, payment after the change, refund or None) -> the body


class Dispatcher:
    """`queries`: storage's WebhookQueries; `send`: server/infra/webhook_sender.py's Sender;
    `render`: the edge's event body (server/edge/webhook_body.py), the API's own JSON."""

    def __init__(self, *, queries, send: Send, render: Render, policy: RetryPolicy, lease_seconds: float,
                 concurrency: int = 1, clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
                 observe: Callable[[str], None] = lambda outcome: None,
                 release_connection: Callable[[], None] = lambda: None):
        self.concurrency = concurrency  # POSTs in flight at once per endpoint (different payments)
        self.release_connection = release_connection  # a sender thread's, after it wrote an outcome
        self._last_first = ""  # the endpoint that went first in the last round (round robin)
        self.fanned_out = 0  # events fanned out, ever (the job reads the difference)
        self._lock = threading.Lock()  # the run's counters and failing set, across the senders
        self.queries = queries
        self.send = send
        self.render = render
        self.policy = policy
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.clock = clock
        self.observe = observe  # (outcome) after each attempt: the metrics

    def fan_out(self, limit: int) -> int:
        """Make the deliveries of new events, at most about `limit` delivery rows (never fewer
        than one event's): as many events as `limit` covers at one row per enabled endpoint. How
        many rows that allowance was worth: `limit` when there may be more to fan out, less when
        the outbox ran dry (the job's drain reads a short batch as "done")."""
        with self.queries.fan_out_turn() as endpoints:
            if endpoints is None:  # another replica is fanning out: this run goes on to sending
                return 0
            wanted = max(1, limit // max(1, len(endpoints)))
            events = self.queries.undispatched(wanted)
            if not events:
                return 0
            now = self.clock()
            rows = [{"event_number": e.number, "event_id": e.id, "endpoint_id": ep.id, "payment_id": e.payment_id,
                     "status": PENDING, "attempts": 0, "first_attempt_at": None, "next_attempt_at": now,
                     "lease_until": None, "created_at": now}
                    for e in events for ep in endpoints if ep.wants(TYPE_OF_ACTION[e.action])]
            self.queries.add_deliveries(rows)
            self.queries.mark_dispatched([e.number for e in events])
        with self._lock:
            self.fanned_out += len(events)
        return limit if len(events) == wanted else min(limit - 1, len(events) * max(1, len(endpoints)))

    def deliver(self, limit: int, run: Run, *, deadline: float | None = None,
                stopping: threading.Event | None = None) -> int:
        """One round: each enabled endpoint that still has due deliveries in this run gets one
        batch of up to `limit`, in turn (round robin: each round starts one endpoint further on,
        by id, so each is first in turn), within its share of the time the run has left (what is
        left divided by the endpoints still to go in the round): a slow or hanging endpoint uses
        its share and no more, and what a fast one leaves goes to the later turns. How many were
        looked at, 0 when there is nothing more to do."""
        looked = 0
        now = self.clock()
        order = []
        for endpoint in self._in_turn(self.queries.enabled_endpoints()):
            if endpoint.id in run.failing or endpoint.id in run.finished:
                continue
            if endpoint.not_before is not None and endpoint.not_before > now:
                run.finished.add(endpoint.id)  # its receiver asked for a wait (Retry-After)
                continue
            order.append(endpoint)
        for i, endpoint in enumerate(order):
            if _stopped(deadline, stopping):
                break
            share = None if deadline is None else time.monotonic() + (deadline - time.monotonic()) / (len(order) - i)
            looked += self._batch(endpoint, limit, run, share, stopping)
        return looked

    def _in_turn(self, endpoints: list) -> list:
        """The endpoints by id, starting after the one that started the last round."""
        endpoints = sorted(endpoints, key=lambda e: e.id)
        after = [e for e in endpoints if e.id > self._last_first]
        order = after + [e for e in endpoints if e.id <= self._last_first]
        if order:
            self._last_first = order[0].id
        return order

    def _batch(self, endpoint, limit: int, run: Run, deadline: float | None, stopping) -> int:
        now = self.clock()
        token = secrets.token_hex(16)  # this batch's lease: every write after its attempts names it
        # Claimed and leased in one statement: another replica's claim at the same moment gets
        # the next free deliveries, not these (and does not wait for them).
        due = self.queries.claim(endpoint.id, now, limit, now + self.lease, token, skip=run.held_back)
        if len(due) < limit:
            run.finished.add(endpoint.id)
        if not due:
            return 0
        mine = {d.number for d in due}
        # A delivery may go only if every earlier pending one of its payment goes first (in this batch).
        allowed: set[int] = set()
        for numbers in self.queries.pending_order(endpoint.id, {d.payment_id for d in due}).values():
            for number in numbers:
                if number not in mine:
                    break
                allowed.add(number)
        run.held_back.update(mine - allowed)
        payloads = self.queries.payloads([d.event_number for d in due if d.number in allowed])
        chains: dict[str, list] = {}  # each payment's deliveries, in its order
        for d in sorted(due, key=lambda d: d.event_number):
            if d.number in allowed:
                chains.setdefault(d.payment_id, []).append(d)
        self._send_chains(endpoint, list(chains.values()), payloads, mine, token, run, deadline, stopping)
        return len(due)

    def _send_chains(self, endpoint, chains: list, payloads: dict, mine: set, token: str, run: Run,
                     until: float | None, stopping) -> None:
        """Send the chains (each payment's deliveries, in order) from up to `concurrency` threads
        of this batch's own, and wait for them until `until` (its share of the run's time) or the
        server stopping. Then the batch's outcomes are written in one transaction and its other
        leases released; an attempt still in flight is handed off: it was started before `until`,
        ends within the sender's timeout, and writes its own outcome under the same lease, while
        the run goes on (and, at the run's end, gives the job's turn back) without waiting for it."""
        state = {"handed_off": False}
        outcomes: list[Outcome] = []
        in_flight: set[int] = set()
        queue = list(chains)

        def attempt_next(d) -> bool:
            with self._lock:
                if state["handed_off"] or endpoint.id in run.failing or _stopped(until, stopping):
                    return False  # a failed attempt ends this endpoint's turn in the run
                in_flight.add(d.number)
            return True

        def finished(outcome: Outcome) -> None:
            with self._lock:
                in_flight.discard(outcome.delivery_number)
                if not state["handed_off"]:
                    outcomes.append(outcome)
                    return
            try:  # the batch has moved on: this attempt writes its own outcome, under its lease
                self._write(endpoint.id, [outcome], [], token, run)
            except Exception:  # the lease runs out and another run sends it again: at least once
                log.warning("cannot write a webhook attempt's outcome", exc_info=True,
                            extra={"delivery": outcome.delivery_number})
            finally:
                self.release_connection()

        def worker() -> None:
            while True:
                with self._lock:
                    if not queue:
                        return
                    chain = queue.pop(0)
                for d in chain:
                    if not attempt_next(d):
                        break
                    outcome = self._attempt(d, endpoint, *payloads[d.event_number], run)
                    finished(outcome)
                    if outcome.status != DELIVERED:
                        break

        threads = [threading.Thread(target=worker, name="webhook-send", daemon=True)
                   for _ in range(min(self.concurrency, len(chains)))]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive() and not (stopping is not None and stopping.is_set()):
                    wait = 0.05 if until is None else min(0.05, until - time.monotonic())
                    if wait <= 0:
                        break
                    t.join(wait)
        finally:
            with self._lock:
                state["handed_off"] = True
                done, held = list(outcomes), set(in_flight)
            # The batch's attempts in one transaction, not a commit each (SQLite: 3.5 ms an attempt
            # went to commits). A run that dies before this line sends them again: at least once.
            self._write(endpoint.id, done, sorted(mine - {o.delivery_number for o in done} - held), token, run)

    def _write(self, endpoint_id: str, outcomes: list, release: list[int], token: str, run: Run) -> None:
        late = self.queries.record_attempts(outcomes, endpoint_id, token)
        self.queries.release(release, token)  # due again next run
        if late:
            with self._lock:
                run.late += len(late)
            for _ in late:
                self.observe("late")

    def _attempt(self, d, endpoint, event, payment, refund, run: Run) -> Outcome:
        started = self.clock()
        kind = TYPE_OF_ACTION[event.action]
        raw = self.render(event.id, kind, event.at, reason_of(event), payment_after(payment, event), refund).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "payments-webhooks/1",
            **signed_headers(endpoint.signing_secrets(started), d.event_id, int(started.timestamp()), raw),
            "Payments-Event-Id": d.event_id,
            "Payments-Event-Type": kind,
        }
        result = self.send(endpoint.url, raw, headers)
        at = self.clock()
        first = d.first_attempt_at or started
        attempt = {"delivery_number": d.number, "at": started, "http_status": result.http_status,
                   "error": printable(result.error)[:500], "duration_ms": result.duration_ms}
        if result.ok:
            with self._lock:
                run.delivered += 1
            self.observe("delivered")
            return Outcome(d.number, attempt, DELIVERED, first, at)
        with self._lock:
            run.failing.add(d.endpoint_id)
        next_at = at + self.policy.delay(d.attempts + 1)
        hold = None
        if (asked := self.policy.asked_wait(result, at)) is not None:
            hold = at + asked
            next_at = max(next_at, hold)
        gone = None
        if result.http_status == GONE:
            gone = (f"disabled at {at.isoformat(timespec='seconds')}: the endpoint answered 410 Gone to event "
                    f"{d.event_id} (it wants no more webhooks); enable it again to resume")
        if (next_at - first).total_seconds() <= self.policy.window_seconds:
            with self._lock:
                run.failed += 1
            self.observe("gone" if gone else "failed")
            return Outcome(d.number, attempt, PENDING, first, next_at, disable=gone, hold=hold)
        with self._lock:
            run.gave_up += 1
        self.observe("gave_up")
        return Outcome(d.number, attempt, GAVE_UP, first, at, disable=gone or (
            f"disabled at {at.isoformat(timespec='seconds')}: event {d.event_id} could not be delivered in "
            f"{d.attempts + 1} attempts since {first.isoformat(timespec='seconds')} (last: {printable(result.error)[:200]})"))
