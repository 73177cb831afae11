"""The shop's checkout: an order asks the Payments service for a payment (over native gRPC, with
the order's id as the request_id, so a retried or repeated checkout never pays twice), then waits
for the service to say how it ended, by a signed webhook: `payment.succeeded` marks the order paid,
`payment.failed` (cancelled or expired) marks it failed. The shop never polls.

The orders live in memory: this is an example, not a store."""

from __future__ import annotations

import dataclasses
import json
import threading
import uuid
from typing import Callable

from payments_client import PaymentsClient, PaymentsError
from payments_client import webhooks


@dataclasses.dataclass
class Order:
    id: str
    email: str
    amount: int
    status: str = "new"  # new -> awaiting_payment -> paid | failed
    payment_id: str = ""
    failure: str = ""  # the payment's failure reason, or the error that refused the payment


class Shop:
    """`say` gets one dict per thing that happened (the runnable example prints them as JSON lines)."""

    def __init__(self, payments: PaymentsClient, webhook_secret: str, say: Callable[[dict], None] = lambda _: None):
        self.payments = payments
        self.webhook_secret = webhook_secret
        self.say = say
        self.orders: dict[str, Order] = {}
        self.seen_events: set[str] = set()
        self.lock = threading.Lock()

    def checkout(self, email: str, amount: int) -> Order:
        order = Order(id=f"ord_{uuid.uuid4().hex}", email=email, amount=amount)
        with self.lock:
            self.orders[order.id] = order
        try:
            payment = self.payments.create_payment(email, amount, description=f"Order {order.id}",
                                                   request_id=order.id)
        except PaymentsError as error:  # the payment cannot be made: the shopping transaction fails
            self._settle(order, "failed", f"{error.code.name}/{error.reason}")
            return order
        with self.lock:
            order.payment_id, order.status = payment.id, "awaiting_payment"
        self.say({"event": "payment_created", "order": order.id, "payment": payment.id})
        return order

    def webhook(self, headers: dict[str, str], body: bytes) -> int:
        """The HTTP status to answer a delivery with: 400 if it is not the service's (the service
        retries, and alerts on an endpoint that keeps failing), 200 otherwise, duplicates included
        (a retry of an event already handled must stop being sent)."""
        headers = {k.lower(): v for k, v in headers.items()}
        if not webhooks.verify(self.webhook_secret, headers, body):
            self.say({"event": "webhook_refused", "webhook_id": headers.get("webhook-id", "")})
            return 400
        event = json.loads(body)
        with self.lock:
            if event["id"] in self.seen_events:
                return 200
            self.seen_events.add(event["id"])
            order = self.orders.get(event["payment"].get("request_id", ""))
        if order is None:
            return 200  # a payment some other caller made
        if event["type"] == "payment.succeeded":
            self._settle(order, "paid")
        elif event["type"] == "payment.failed":
            self._settle(order, "failed", event.get("reason", ""))
        return 200

    def _settle(self, order: Order, status: str, failure: str = "") -> None:
        with self.lock:
            if order.status in ("paid", "failed"):
                return
            order.status, order.failure = status, failure
        self.say({"event": f"order_{status}", "order": order.id, "payment": order.payment_id,
                  **({"failure": failure} if failure else {})})
