"""The Timestamps a caller can send: gRPC carries any int64 seconds and int32 nanos, beyond what
google.protobuf.Timestamp allows, and each such field must be refused by name (INVALID_ARGUMENT),
not fail in ToDatetime (INTERNAL). tests/service/test_clients.py sends out-of-range values to each
field listed here; this test fails when a request gains a Timestamp that list does not cover."""

from __future__ import annotations

from google.api import field_behavior_pb2

from server.edge.pb import payments_pb2

# (method, the field's path in its request): each covered by
# tests/service/test_clients.py::test_a_time_outside_timestamps_range_is_invalid_argument_naming_the_field
COVERED = {
    ("/payments.v1.ClientService/CreateClient", "client.expire_time"),
    ("/payments.v1.ClientService/SetClientExpiry", "expire_time"),
}


def _times(message, prefix: str = "", seen: frozenset = frozenset()):
    for field in message.fields:
        if field.message_type is None:
            continue
        behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        if field_behavior_pb2.OUTPUT_ONLY in behaviors:
            continue  # the server ignores what a caller puts there
        path = prefix + field.name
        if field.message_type.full_name == "google.protobuf.Timestamp":
            yield path
        elif field.message_type.full_name not in seen and field.message_type.file.package == "payments.v1":
            yield from _times(field.message_type, path + ".", seen | {message.full_name})


def test_every_timestamp_a_request_can_carry_is_covered():
    found = {(f"/{service.full_name}/{method.name}", path)
             for service in payments_pb2.DESCRIPTOR.services_by_name.values()
             for method in service.methods for path in _times(method.input_type)}
    assert found == COVERED
