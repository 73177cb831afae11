"""A webhook event's JSON body: a fast path for protobuf's JSON printer, and the printer itself.

The body must be the API's own JSON: the payment exactly as GetPayment returns it over REST (Envoy's
transcoder prints snake_case names, int64 as strings, enums by name, fields at their defaults left
out, timestamps in RFC 3339 with 0, 3, 6 or 9 fractional digits). `reference_body` gets that from
json_format (preserving_proto_field_name prints what Envoy prints). It is rendered inside every
payment change's transaction, and json_format walks the message field by field in Python: 60 µs of
a create's CPU, while the SQLite write lock is held. `event_body` builds the same dict directly in
about a sixth of that; tests/unit/test_webhooks.py proves the two equal for arbitrary payments.
"""

from __future__ import annotations

import datetime as dt
import json

from google.protobuf import json_format

from server.edge.pb import payments_pb2 as pb
from server.edge.servicers import REASON_TO_PB, STATUS_TO_PB, payment_fields, refund_fields, timestamp

# The enums' JSON: their names, from the edge's one mapping of the stored words.
_STATUS = {word: pb.Payment.Status.Name(number) for word, number in STATUS_TO_PB.items()}
_REASON = {word: pb.Payment.FailureReason.Name(number) for word, number in REASON_TO_PB.items()}
_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def _time(value: dt.datetime) -> str:
    """google.protobuf.Timestamp's JSON, from the UTC, microsecond values storage hands out."""
    micros = value.microsecond
    spec = "seconds" if micros == 0 else "milliseconds" if micros % 1000 == 0 else "microseconds"
    return value.isoformat(timespec=spec)[:-6] + "Z"  # "+00:00" -> "Z"


def payment_json(row) -> dict:
    """pb.Payment's JSON object, in field-number order, defaults left out."""
    out: dict = {"id": row.id} if row.id else {}
    if row.email:
        out["email"] = row.email
    if row.amount:
        out["amount"] = str(row.amount)
    if row.currency:
        out["currency"] = row.currency
    if row.description:
        out["description"] = row.description
    if row.status in _STATUS:
        out["status"] = _STATUS[row.status]
    if row.failure_reason in _REASON:
        out["failure_reason"] = _REASON[row.failure_reason]
    if row.request_id:
        out["request_id"] = row.request_id
    for name in ("created_at", "updated_at", "expires_at"):
        out[name] = _time(getattr(row, name))
    if row.owner_id:
        out["owner_id"] = row.owner_id
    if row.deleted_at is not None:
        out["deleted_at"] = _time(row.deleted_at)
    if row.refunded_amount:
        out["refunded_amount"] = str(row.refunded_amount)
        if row.refunded_amount == row.amount:
            out["fully_refunded"] = True
    return out


def refund_json(row) -> dict:
    """pb.Refund's JSON object, in field-number order, defaults left out."""
    out: dict = {}
    for name in ("id", "payment_id"):
        if getattr(row, name):
            out[name] = getattr(row, name)
    out["amount"] = str(row.amount)  # at least 1
    if row.currency:
        out["currency"] = row.currency
    out["reason"] = row.reason  # the enum's name, as stored
    for name in ("note", "request_id", "created_by"):
        if getattr(row, name):
            out[name] = getattr(row, name)
    out["created_at"] = _time(row.created_at)
    out["refunded_amount_after"] = str(row.refunded_amount_after)  # at least the amount
    return out


def event_json(event_id: str, kind: str, at: dt.datetime, reason: str | None, payment, refund=None) -> dict:
    out: dict = {"id": event_id, "type": kind, "created_at": _time(at)}
    if reason in _REASON:
        out["reason"] = _REASON[reason]
    out["payment"] = payment_json(payment)
    if refund is not None:
        out["refund"] = refund_json(refund)
    return out


def event_body(event_id: str, kind: str, at: dt.datetime, reason: str | None, payment, refund=None) -> str:
    return _compact(event_json(event_id, kind, at, reason, payment, refund))


def event_message(event_id: str, kind: str, at: dt.datetime, reason: str | None, payment,
                  refund=None) -> pb.WebhookEvent:
    """The event as a message: what GetWebhookEvent answers (with deliveries added) and what
    protobuf's printer would make the body from."""
    return pb.WebhookEvent(id=event_id, type=kind, created_at=timestamp(at),
                           reason=REASON_TO_PB.get(reason or "", pb.Payment.FAILURE_REASON_UNSPECIFIED),
                           payment=payment_fields(payment),
                           refund=refund_fields(refund) if refund is not None else None)


def reference_json(event_id: str, kind: str, at: dt.datetime, reason: str | None, payment, refund=None) -> dict:
    """The same through protobuf's own printer: what event_json must equal."""
    return json_format.MessageToDict(event_message(event_id, kind, at, reason, payment, refund),
                                      preserving_proto_field_name=True)
