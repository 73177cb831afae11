"""Prometheus metrics, on a port of their own (PAYMENTS_METRICS_ADDR; not the API's, not Envoy's).

gRPC calls use go-grpc-prometheus's names and labels (`grpc_server_started_total`,
`grpc_server_handled_total`, `grpc_server_handling_seconds`, labelled grpc_type, grpc_service,
grpc_method and grpc_code), the ones py-grpc-prometheus and most gRPC dashboards use. The
service's own are `payments_*` (docs/observability.md lists them).

Several server processes (server/edge/processes.py) each count in files of their own under
PROMETHEUS_MULTIPROC_DIR, and one endpoint adds them up (prometheus_client's multiprocess mode): a
scrape sees the pod, whichever process served what. server/__main__.py makes that directory fresh
before anything imports prometheus_client, since that import decides where values are kept. One
process counts in memory instead (an increment costs 0.8 µs there, 2.3 µs in a file).
"""

from __future__ import annotations

import bisect
import logging
import os

from prometheus_client import (REGISTRY, CollectorRegistry, Counter, Histogram, disable_created_metrics, multiprocess,
                               start_http_server)

from server.infra.config import Settings

log = logging.getLogger("server")

# No `*_created` series beside every counter: go-grpc-prometheus has none, and scrapes stay half the size.
disable_created_metrics()

# Set by server/__main__.py before this module is first imported.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds; go-grpc-prometheus's default buckets stop at 10 s, with finer steps below 100 ms where
# this service's calls are.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)

_RPC = ("grpc_type", "grpc_service", "grpc_method")
started = Counter("grpc_server_started_total", "Total number of RPCs started on the server.", _RPC)
handled = Counter("grpc_server_handled_total",
                  "Total number of RPCs completed on the server, regardless of success or failure.",
                  _RPC + ("grpc_code",))
handling = Histogram("grpc_server_handling_seconds",
                     "Histogram of response latency (seconds) of gRPC that had been application-level "
                     "handled by the server.", _RPC, buckets=LATENCY_BUCKETS)

payment_events = Counter("payments_payment_events_total",
                         "Payment changes, counted once their transaction committed: created, confirmed, failed "
                         "(reason cancelled or expired), deleted, restored, purged, refunded.", ("event", "reason"))
job_runs = Counter("payments_job_runs_total", "Scheduled job runs by outcome (ok, interrupted, failed, skipped).",
                   ("job", "outcome"))
job_seconds = Histogram("payments_job_run_seconds", "Duration of the job runs this replica did.", ("job",),
                        buckets=JOB_BUCKETS)
job_rows = Counter("payments_job_rows_total", "Rows the job runs changed.", ("job",))
database_errors = Counter("payments_database_errors_total",
                          "Database failures answered to a client: unavailable, busy (SQLite's lock), "
                          "refused_value.", ("kind",))
unreceived_calls = Counter("payments_unreceived_calls_total",
                           "Calls ended before their request message arrived: expired (not within "
                           "PAYMENTS_REQUEST_SECONDS of their headers) or evicted (to make room for newer ones "
                           "when the lane's receiver held its count of waiting calls).", ("reason",))
login_refusals = Counter("payments_login_refusals_total",
                         "Sign-ups and logins refused before a password was checked: throttled (too many "
                         "failures for the email from this address) or busy (the hashing lane was full).",
                         ("reason",))

webhook_attempts = Counter("payments_webhook_attempts_total",
                           "Webhook POSTs by outcome: delivered (a 2xx), failed (retried later), gone (a 410: "
                           "the endpoint was disabled), gave_up (the retry window ran out; the endpoint was "
                           "disabled), late (its outcome was not written: the delivery's lease had passed to "
                           "another run, a redelivery, an enable or a delete).", ("outcome",))


_GO_SPELLINGS = {"OK": "OK", "CANCELLED": "Canceled"}  # the two Go does not spell by capitalizing words


def go_code(name: str) -> str:
    """grpc_code as go-grpc-prometheus writes it (Go's codes.Code names: NotFound, Canceled)."""
    return _GO_SPELLINGS.get(name) or "".join(part.capitalize() for part in name.split("_"))


class Rpc:
    """One method's series, resolved once; the fast path of every call's counting.

    A labels() lookup per call would cost more than the count itself, and so do the public inc() and
    observe(), which check on every call what is fixed here once (that the series is a child, not
    the labelled parent) and look for exemplars: they cost 3.5 µs a call against 1.3 µs for the
    same values added through the children's value objects (prometheus_client's own `_value`,
    `_sum`, `_buckets`, at the version requirements.lock pins; tests/e2e/test_observability.py
    reads them back through a scrape)."""

    __slots__ = ("_started", "_sum", "_buckets", "_bounds", "_handled", "_labels")

    def __init__(self, grpc_type: str, method: str):
        service, name = method.lstrip("/").rsplit("/", 1)
        self._labels = (grpc_type, service, name)
        histogram = handling.labels(*self._labels)
        self._started = started.labels(*self._labels)._value
        self._sum, self._buckets = histogram._sum, histogram._buckets
        self._bounds = list(histogram._upper_bounds)
        self._handled: dict[str, object] = {}

    def start(self) -> None:
        self._started.inc(1)

    def done(self, code: str, seconds: float) -> None:
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled[code] = handled.labels(*self._labels, go_code(code))._value
        counter.inc(1)
        self._sum.inc(seconds)
        self._buckets[bisect.bisect_left(self._bounds, seconds)].inc(1)


def payment_event(event: str, reason: str | None, count: int = 1) -> None:
    """PaymentRules' observer (server/domain/payments.py): the rules stay free of Prometheus."""
    payment_events.labels(event, reason or "").inc(count)


def webhook_attempt(outcome: str) -> None:
    """The webhook dispatcher's observer (server/domain/webhook_delivery.py)."""
    webhook_attempts.labels(outcome).inc()


def registry() -> CollectorRegistry:
    """What a scrape reads: every process's values added up, or this process's own."""
    if os.environ.get(MULTIPROC_ENV):
        collected = CollectorRegistry()
        multiprocess.MultiProcessCollector(collected)
        return collected
    return REGISTRY


def forget(pid: int) -> None:
    """A server process that ended: its counters stay in the sums (counters never go down)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


def serve(settings: Settings) -> int | None:
    """The scrape endpoint (GET /metrics) on a thread of its own; its port, or None if it is off."""
    if not settings.metrics_addr:
        return None
    host, port = settings.metrics_addr.rsplit(":", 1)
    server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry())
    bound = server.server_address[1]
    log.info("metrics listening", extra={"addr": settings.metrics_addr, "port": bound})
    return bound
