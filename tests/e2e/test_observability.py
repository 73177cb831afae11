"""Metrics, traces and trace-aware log lines, through the real Envoy (docs/observability.md).

- A scrape of the server's metrics port after a known sequence of calls counts exactly those calls,
  by method and code, with their latencies, and the payment changes they made.
- Two server processes: one scrape adds both up, and a process killed and replaced loses nothing.
- A trace id a client sends is the server span's, its database spans' and its log line's; a client
  that sends none (or an invalid one) gets a trace started at Envoy, named by Envoy's request id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.stack import free_ports, prepare_workdir, server_env, wait_until
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from tests.conftest import ALICE, own_pg_database
from tests.support.otlp import Receiver
from tests.support.rest import Client, loopback_address
from tests.support.stack import ROOT, Server, running_stack

PAYMENTS = "payments.v1.PaymentService"


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc(method: str, service: str = PAYMENTS, **more: str) -> dict[str, str]:
    return {"grpc_type": "unary", "grpc_service": service, "grpc_method": method, **more}


def test_a_scrape_counts_a_known_sequence_of_calls(stack, make_user, admin):
    user = make_user("metrics")
    api = Client(stack.url)
    port = stack.server.metrics_port
    assert port, "the server logged no metrics port"
    before = scrape(port)
    first = api.post("/v1/payments", {"email": user.email, "amount": "1000"}, token=user.token)
    second = api.post("/v1/payments", {"email": user.email, "amount": "2500"}, token=user.token)
    assert first.status == second.status == 200, (first.text, second.text)
    assert api.get(f"/v1/payments/{first.json['id']}", token=user.token).status == 200
    assert api.get("/v1/payments/pay_00000000000000000000000000", token=user.token).status == 404
    assert api.post(f"/v1/payments/{first.json['id']}:confirm", {}, token=admin.token).status == 200
    assert api.post(f"/v1/payments/{second.json['id']}:cancel", {}, token=user.token).status == 200
    assert api.post(f"/v1/payments/{second.json['id']}:cancel", {}, token=user.token).status == 200  # a retry
    assert api.post(f"/v1/payments/{second.json['id']}:cancel", {}, token=admin.token).status == 400  # not its change
    after = scrape(port)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("grpc_server_started_total", **rpc("CreatePayment")) == 2
    assert grew("grpc_server_handled_total", **rpc("CreatePayment", grpc_code="OK")) == 2
    assert grew("grpc_server_handled_total", **rpc("GetPayment", grpc_code="OK")) == 1
    assert grew("grpc_server_handled_total", **rpc("GetPayment", grpc_code="NotFound")) == 1
    assert grew("grpc_server_handled_total", **rpc("CancelPayment", grpc_code="OK")) == 2
    assert grew("grpc_server_handled_total", **rpc("CancelPayment", grpc_code="FailedPrecondition")) == 1
    assert grew("grpc_server_handling_seconds_count", **rpc("GetPayment")) == 2
    assert grew("grpc_server_handling_seconds_bucket", **rpc("GetPayment", le="+Inf")) == 2
    assert grew("grpc_server_handling_seconds_sum", **rpc("GetPayment")) > 0
    assert grew("payments_payment_events_total", event="created", reason="") == 2
    assert grew("payments_payment_events_total", event="confirmed", reason="") == 1
    assert grew("payments_payment_events_total", event="failed", reason="cancelled") == 1
    # Nothing else moved: the retried cancel and the refused one changed no payment.
    assert grew("payments_payment_events_total", event="failed", reason="expired") == 0


def test_a_refused_login_is_counted_by_reason(stack, make_user):
    user = make_user("throttled")
    # From an address of its own, within its login bucket at Envoy (10 at once, then 1 a second):
    # every 429 is the server's.
    api = Client(stack.url).from_address(loopback_address())
    before = scrape(stack.server.metrics_port)
    statuses = []
    for n in range(8):
        statuses.append(api.post("/v1/auth/login", {"email": user.email, "password": "wrong password!"}).status)
        time.sleep(0.5)
    assert 429 in statuses, statuses  # the throttle per email and address (server/domain/login_throttle.py)
    after = scrape(stack.server.metrics_port)
    refused = value(after, "payments_login_refusals_total", reason="throttled") - \
        value(before, "payments_login_refusals_total", reason="throttled")
    assert refused == statuses.count(429)


def test_two_server_processes_add_up_and_a_replaced_one_loses_nothing(tmp_path, keys_dir):
    prepare_workdir(tmp_path, keys_dir)
    base = free_ports(2)
    server = Server.start(tmp_path, server_env(tmp_path, PAYMENTS_PROCESSES="2",
                                               PAYMENTS_LISTEN_ADDR=f"127.0.0.1:{base}"))
    try:
        calls = lambda port, n: [_unauthenticated_get(port) for _ in range(n)]  # noqa: E731
        unauthenticated = rpc("GetPayment", grpc_code="Unauthenticated")
        calls(base, 3)
        calls(base + 1, 2)
        assert value(scrape(server.metrics_port), "grpc_server_handled_total", **unauthenticated) == 5
        pids = next(json.loads(line)["pids"] for line in server.log.read_text().splitlines()
                    if '"server processes started"' in line)
        os.kill(pids[1], signal.SIGKILL)
        wait_until("a replacement", lambda: server.log.read_text().count('"listening"') >= 3 or None,
                   server.proc, server.log)
        calls(base + 1, 1)
        assert value(scrape(server.metrics_port), "grpc_server_handled_total", **unauthenticated) == 6
    finally:
        server.stop()


def test_a_reflection_stream_is_counted_as_a_bidi_stream(stack):
    labels = {"grpc_type": "bidi_stream", "grpc_service": "grpc.reflection.v1alpha.ServerReflection",
              "grpc_method": "ServerReflectionInfo"}
    before = scrape(stack.server.metrics_port)
    listed = subprocess.run([str(ROOT / ".tools" / "bin" / "grpcurl"), "-plaintext", stack.grpc_target, "list"],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0 and PAYMENTS in listed.stdout.split(), listed.stderr
    after = scrape(stack.server.metrics_port)
    assert value(after, "grpc_server_started_total", **labels) > value(before, "grpc_server_started_total", **labels)
    assert value(after, "grpc_server_handled_total", **labels, grpc_code="OK") > \
        value(before, "grpc_server_handled_total", **labels, grpc_code="OK")


def test_without_an_otlp_endpoint_the_sdk_is_never_loaded():
    """Tracing unconfigured costs a header lookup: the OpenTelemetry SDK is not even imported."""
    probe = ("import sys; from server.infra import config, tracing; from server.edge import app, interceptor; "
             "tracing.configure(config.Settings()); "
             "print(tracing.enabled(), sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("OTEL_")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False []", out.stdout


def _unauthenticated_get(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.PaymentServiceStub(channel).GetPayment(pb.GetPaymentRequest(id="pay_x"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


TRACED = {"OTEL_BSP_SCHEDULE_DELAY": "100", "GOOGLE_CLOUD_PROJECT": "payments-test"}


@pytest.fixture(scope="module")
def traced(tmp_path_factory, keys_dir):
    """A stack whose server exports spans to a real OTLP receiver (flushed every 100 ms)."""
    with Receiver() as receiver, running_stack(
            tmp_path_factory.mktemp("traced"), keys_dir,
            server_overrides={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **TRACED}) as (server, envoy):
        yield receiver, server, envoy


def test_on_postgresql_the_prepared_queries_are_spans_of_the_call(tmp_path, keys_dir, token_for):
    """The fast path's server-side prepared statements (PostgreSQL) are traced like SQLite's."""
    with own_pg_database(f"payments_test_{os.getpid()}_traced") as url, Receiver() as receiver, running_stack(
            tmp_path, keys_dir, database_url=url,
            server_overrides={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **TRACED}) as (_, envoy):
        trace_id = "5bf92f3577b34da6a3ce929d0e0e4736"
        answer = Client(envoy.url).get("/v1/payments?page_size=5", token=token_for(ALICE),
                                       headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        assert answer.status == 200, answer.text
        spans = receiver.of_trace(trace_id, at_least=2)
        [call] = [s for s in spans if s.name == f"{PAYMENTS}/ListPayments"]
        queries = [s for s in spans if s.name == "db.query"]
        assert queries and all(q.parent_span_id == call.span_id for q in queries)
        systems = {a.value.string_value for q in queries for a in q.attributes if a.key == "db.system"}
        assert systems == {"postgresql"}


def access_lines(server, method: str) -> list[dict]:
    lines = []
    for line in server.log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "server.access" and entry.get("method") == method:
            lines.append(entry)
    return lines


def wait_for_line(server, method: str, trace_field: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for entry in access_lines(server, method):
            if entry.get("logging.googleapis.com/trace", "").endswith(trace_field):
                return entry
        time.sleep(0.1)
    raise AssertionError(f"no access line of {method} with trace {trace_field}")


def test_a_clients_trace_id_reaches_the_servers_spans_and_its_log_line(traced, token_for):
    receiver, server, envoy = traced
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    answer = Client(envoy.url).get("/v1/payments/pay_00000000000000000000000000", token=token_for(ALICE),
                                   headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert answer.status == 404, answer.text
    spans = receiver.of_trace(trace_id, at_least=2)
    calls = [s for s in spans if s.name == f"{PAYMENTS}/GetPayment"]
    assert len(calls) == 1, [s.name for s in spans]
    call = calls[0]
    assert call.parent_span_id.hex() == parent and call.kind == call.SPAN_KIND_SERVER
    attributes = {a.key: a.value.string_value for a in call.attributes}
    assert attributes["rpc.system"] == "grpc" and attributes["rpc.method"] == "GetPayment"
    assert attributes["rpc.grpc.status_code"] == "NOT_FOUND"
    queries = [s for s in spans if s.name == "db.query"]
    assert queries and all(q.parent_span_id == call.span_id for q in queries)
    assert all("pay_0000" not in a.value.string_value for q in queries for a in q.attributes)  # SQL, no values
    line = wait_for_line(server, "/payments.v1.PaymentService/GetPayment", trace_id)
    assert line["logging.googleapis.com/trace"] == f"projects/payments-test/traces/{trace_id}"
    assert line["logging.googleapis.com/spanId"] == call.span_id.hex()
    assert line["logging.googleapis.com/trace_sampled"] is True and line["severity"] == "INFO"


@pytest.mark.parametrize("sent", [None, "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                                  "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "garbage",
                                  "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"])
def test_without_a_valid_traceparent_envoy_starts_a_trace_named_by_its_request_id(traced, token_for, sent):
    receiver, server, envoy = traced
    headers = {"traceparent": sent} if sent else {}

    def envoy_lines() -> list[dict]:  # Envoy's access lines of GET /v1/payments (flushed every 200 ms)
        entries = [json.loads(line) for line in envoy.access_log.read_text().splitlines() if line.startswith("{")]
        return [e for e in entries if e.get("path") == "/v1/payments" and e.get("method") == "GET"]

    earlier = len(envoy_lines())
    answer = Client(envoy.url).get("/v1/payments", token=token_for(ALICE), headers=headers)
    assert answer.status == 200, answer.text
    wait_until("Envoy's access line", lambda: len(envoy_lines()) > earlier or None, envoy.proc, envoy.log)
    line = envoy_lines()[-1]
    trace_id = line["request_id"].replace("-", "")
    assert line["traceparent"].startswith(f"00-{trace_id}-") and line["traceparent"] != sent
    assert [s for s in receiver.of_trace(trace_id) if s.name == f"{PAYMENTS}/ListPayments"]
    wait_for_line(server, "/payments.v1.PaymentService/ListPayments", trace_id)


def test_lines_outside_a_call_carry_no_trace_and_every_line_a_severity(traced):
    _, server, _ = traced
    entries = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    assert entries and all(e.get("severity") in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") for e in entries)
    started = [e for e in entries if e.get("message") == "listening"]
    assert started and "logging.googleapis.com/trace" not in started[0]
