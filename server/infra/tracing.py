"""Traces: one W3C trace from the edge to the database, and log lines that name it.

Envoy gives every request a `traceparent` (the client's own when it sent a valid one; otherwise a
new trace whose id is Envoy's x-request-id: envoy/envoy.yaml's Lua filter), and the transcoder
passes it on as gRPC metadata. Here each call then has a trace id, whether or not spans are made:

  - always: log lines written during the call carry Cloud Logging's trace fields
    (`logging.googleapis.com/trace`, `.../spanId`, `.../trace_sampled`), so Cloud Logging groups a
    request's lines, and `severity` (server/infra/logs.py);
  - when an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT): OpenTelemetry spans, one per
    call (a child of the incoming traceparent) and one per database query under it, sent in
    batches by the SDK's exporter. Without an endpoint the SDK is not even imported, and a call
    costs a header lookup.

configure() runs in each server process after the fork: the SDK's export thread and gRPC channel
must belong to the process that uses them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading

from server.infra.config import Settings

log = logging.getLogger("server")

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_SAMPLED = frozenset(f"{flags:02x}" for flags in range(256) if flags & 1)  # trace-flags with "sampled" set

_tracer = None  # an OpenTelemetry Tracer once configure() found an endpoint
_propagator = None  # and W3C trace context's reader of traceparent
_project = ""  # Google Cloud project id for the log field
_call = threading.local()  # .fields: this thread's call's log fields, or None


def enabled() -> bool:
    return _tracer is not None


def configure(settings: Settings) -> None:
    global _tracer, _project, _propagator
    project = settings.trace_project
    _project = project if re.fullmatch(r"[a-z0-9.:-]*", project) else ""  # a project id's letters only
    if not settings.otlp_endpoint:
        _tracer = None
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES still win (Resource.create reads them).
    provider = TracerProvider(resource=Resource.create({"service.name": "payments"}))
    endpoint = settings.otlp_endpoint
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint,
                                                                    insecure=endpoint.startswith("http://"))))
    _tracer = provider.get_tracer("payments.server")
    _propagator = TraceContextTextMapPropagator()
    log.info("tracing to OTLP", extra={"endpoint": endpoint})


def parse(value: str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid traceparent header, else None."""
    if not value:
        return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace_id, span_id, flags = m.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN or (version == "00" and len(value) != 55):
        return None
    return trace_id, span_id, flags in _SAMPLED


def traceparent_of(metadata) -> str | None:
    for key, value in metadata:
        if key == "traceparent":
            return value
    return None


def log_fields(trace_id: str, span_id: str | None, sampled: bool) -> dict:
    fields = {"logging.googleapis.com/trace": f"projects/{_project}/traces/{trace_id}" if _project else trace_id,
              "logging.googleapis.com/trace_sampled": sampled}
    if span_id:
        fields["logging.googleapis.com/spanId"] = span_id
    return fields


def log_fragment(fields: dict) -> str:
    """The fields as the JSON members of an access line: hex ids and a project id need no
    escaping (configure() keeps a project that would out), and an encoder costs a tenth of a call's log line."""
    span = fields.get("logging.googleapis.com/spanId")
    return (f', "logging.googleapis.com/trace": "{fields["logging.googleapis.com/trace"]}"'
            + (f', "logging.googleapis.com/spanId": "{span}"' if span else "")
            + f', "logging.googleapis.com/trace_sampled": {"true" if fields["logging.googleapis.com/trace_sampled"] else "false"}')


def current_fields() -> dict | None:
    """The log fields of the call this thread serves, if it has a trace."""
    return getattr(_call, "fields", None)


class Call:
    """One call's trace, from its start to end() (server/edge/interceptor.py): meanwhile this
    thread's log lines carry its fields."""

    __slots__ = ("_span", "_token", "fields")

    def __init__(self, name: str, traceparent: str | None, attributes: dict):
        self._span = self._token = None
        parsed = parse(traceparent)
        if _tracer is None:
            self.fields = _call.fields = log_fields(parsed[0], None, parsed[2]) if parsed else None
            return
        from opentelemetry import context, trace

        parent = _propagator.extract({"traceparent": traceparent}) if parsed else None
        self._span = _tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
        self._token = context.attach(trace.set_span_in_context(self._span))
        span_context = self._span.get_span_context()
        self.fields = _call.fields = log_fields(format(span_context.trace_id, "032x"),
                                                format(span_context.span_id, "016x"), span_context.trace_flags.sampled)

    def end(self, code: str) -> None:
        _call.fields = None
        if self._span is None:
            return
        from opentelemetry import context, trace

        self._span.set_attribute("rpc.grpc.status_code", code)
        if code != "OK":
            self._span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        self._span.end()
        context.detach(self._token)


def query(sql: str, system: str):
    """A span for one database statement (its SQL text, never its parameters), when tracing."""
    if _tracer is None:
        return contextlib.nullcontext()
    from opentelemetry import trace

    return _tracer.start_as_current_span("db.query", kind=trace.SpanKind.CLIENT,
                                         attributes={"db.system": system, "db.statement": sql})


def trace_queries(database, system: str) -> None:
    """Every peewee statement on `database` (`system`: postgresql or sqlite) in a span of its own
    (the fast path calls query())."""
    if _tracer is None:
        return
    plain = database.execute_sql

    def execute_sql(sql, params=None, *args, **kwargs):
        with query(sql, system):
            return plain(sql, params, *args, **kwargs)

    database.execute_sql = execute_sql
