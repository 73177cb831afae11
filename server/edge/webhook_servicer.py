"""The WebhookService servicer: thin translations between its messages and WebhookRules.

GetWebhookEvent answers an event with the fields every endpoint receives (server/edge/webhook_body.py
renders them as the body), and the deliveries.
"""

from __future__ import annotations

from google.protobuf import empty_pb2

from server.edge import auth
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from server.edge.servicers import timestamp
from server.edge.webhook_body import event_message
from server.domain.webhooks import EndpointChange, EndpointRecord, EventView, WebhookRules

_DELIVERY_STATUS = {"pending": pb.WebhookDelivery.PENDING, "succeeded": pb.WebhookDelivery.SUCCEEDED,
                    "failed": pb.WebhookDelivery.FAILED}


def endpoint_pb(row: EndpointRecord) -> pb.WebhookEndpoint:
    return pb.WebhookEndpoint(id=row.id, url=row.url, event_types=row.event_types.split(), enabled=row.enabled,
                              description=row.description, disabled_reason=row.disabled_reason or "",
                              created_at=timestamp(row.created_at), updated_at=timestamp(row.updated_at),
                              previous_secret_expires_at=timestamp(row.previous_secret_expires_at))


def delivery_pb(delivery, attempts) -> pb.WebhookDelivery:
    return pb.WebhookDelivery(
        endpoint_id=delivery.endpoint_id, status=_DELIVERY_STATUS[delivery.status],
        next_attempt_at=timestamp(delivery.next_attempt_at) if delivery.status == "pending" else None,
        attempts=[pb.WebhookAttempt(time=timestamp(a.at), http_status=a.http_status, error=a.error,
                                    duration_ms=a.duration_ms) for a in attempts])


def event_pb(view: EventView) -> pb.WebhookEvent:
    """The event as it is delivered, with its deliveries."""
    message = event_message(view.event.id, view.type, view.event.at, view.reason, view.payment, view.refund)
    message.deliveries.extend(delivery_pb(d, attempts) for d, attempts in view.deliveries)
    return message


class WebhookServicer(pb_grpc.WebhookServiceServicer):
    def __init__(self, rules: WebhookRules):
        self.rules = rules

    def CreateWebhookEndpoint(self, request, context):
        e = request.endpoint
        row, secret = self.rules.create(auth.caller(), url=e.url, event_types=list(e.event_types), enabled=e.enabled,
                                        description=e.description)
        return pb.WebhookEndpointWithSecret(endpoint=endpoint_pb(row), secret=secret)

    def ListWebhookEndpoints(self, request, context):
        rows, token = self.rules.list(auth.caller(), page_size=request.page_size, page_token=request.page_token)
        return pb.ListWebhookEndpointsResponse(endpoints=[endpoint_pb(r) for r in rows], next_page_token=token)

    def GetWebhookEndpoint(self, request, context):
        return endpoint_pb(self.rules.get(auth.caller(), request.id))

    def UpdateWebhookEndpoint(self, request, context):
        change = EndpointChange(
            url=request.url if request.HasField("url") else None,
            event_types=list(request.event_types),
            enabled=request.enabled if request.HasField("enabled") else None,
            description=request.description if request.HasField("description") else None)
        return endpoint_pb(self.rules.update(auth.caller(), request.id, change))

    def DeleteWebhookEndpoint(self, request, context):
        self.rules.delete(auth.caller(), request.id)
        return empty_pb2.Empty()

    def RotateWebhookSecret(self, request, context):
        row, secret = self.rules.rotate(auth.caller(), request.id, request.previous_secret_ttl_seconds)
        return pb.WebhookEndpointWithSecret(endpoint=endpoint_pb(row), secret=secret)

    def ListWebhookEvents(self, request, context):
        views, token = self.rules.events(auth.caller(), page_size=request.page_size, page_token=request.page_token,
                                         payment_id=request.payment_id, event_type=request.type)
        return pb.ListWebhookEventsResponse(events=[event_pb(v) for v in views], next_page_token=token)

    def GetWebhookEvent(self, request, context):
        return event_pb(self.rules.event(auth.caller(), request.id))

    def RedeliverWebhookEvent(self, request, context):
        delivery, attempts = self.rules.redeliver(auth.caller(), request.id, request.endpoint_id)
        return delivery_pb(delivery, attempts)
