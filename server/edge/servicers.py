"""The gRPC servicers: thin translations between protobuf messages and the rules.

Each method reads the request, asks PaymentRules or Accounts, and builds the response, as in
Google's bookstore-grpc sample. What a rule raises is mapped to a status, and the database
connection given back, once for every call by the interceptor (server/edge/interceptor.py); the
caller comes from the same place (server.edge.auth.caller()).
"""

from __future__ import annotations

import datetime as dt

from google.protobuf import empty_pb2

from server.edge import admission, auth
from server.edge.admission import CLIENT_ADDRESS_HEADER
from server.domain.accounts import Accounts
from server.domain.payments import PaymentDraft, PaymentRules
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from server.domain.records import EventRecord, PaymentRecord, RefundRecord
from server.domain.refunds import RefundDraft, RefundRules

STATUS_TO_PB = {"pending": pb.Payment.PENDING, "success": pb.Payment.SUCCESS, "failed": pb.Payment.FAILED}
_STATUS_FROM_PB = {v: k for k, v in STATUS_TO_PB.items()}
REASON_TO_PB = {"cancelled": pb.Payment.CANCELLED, "expired": pb.Payment.EXPIRED}


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)


def timestamp(value: dt.datetime | None) -> dict | None:
    """A google.protobuf.Timestamp (as the dict the message constructor takes), three times faster
    than Timestamp.FromDatetime and a copy; there are three of them in every payment."""
    if value is None:
        return None
    since = value - _EPOCH  # storage hands out timezone-aware values
    return {"seconds": since.days * 86400 + since.seconds, "nanos": since.microseconds * 1000}


def payment_fields(row: PaymentRecord) -> dict:
    """A payment as the keyword arguments of pb.Payment (a dict, because a list response would
    copy each finished message into itself)."""
    return {
        "id": row.id,
        "email": row.email,
        "amount": row.amount,
        "currency": row.currency,
        "description": row.description,
        "status": STATUS_TO_PB[row.status],
        "failure_reason": REASON_TO_PB.get(row.failure_reason or "", pb.Payment.FAILURE_REASON_UNSPECIFIED),
        "request_id": row.request_id or "",
        "created_at": timestamp(row.created_at),
        "updated_at": timestamp(row.updated_at),
        "expires_at": timestamp(row.expires_at),
        "owner_id": row.owner_id or "",
        "deleted_at": timestamp(row.deleted_at),
        "refunded_amount": row.refunded_amount or 0,
        "fully_refunded": bool(row.refunded_amount) and row.refunded_amount == row.amount,
    }


_REFUND_REASON_TO_PB = {name: value for name, value in pb.Refund.Reason.items() if value}
REFUND_REASON_FROM_PB = {value: name for name, value in _REFUND_REASON_TO_PB.items()}


def refund_fields(row: RefundRecord) -> dict:
    """A refund as the keyword arguments of pb.Refund."""
    return {
        "id": row.id,
        "payment_id": row.payment_id,
        "amount": row.amount,
        "currency": row.currency,
        "reason": _REFUND_REASON_TO_PB[row.reason],
        "note": row.note,
        "request_id": row.request_id or "",
        "created_by": row.created_by,
        "created_at": timestamp(row.created_at),
        "refunded_amount_after": row.refunded_amount_after,
    }


_ACTION_TO_PB = {name.lower(): value for name, value in pb.PaymentEvent.Action.items() if value}


def event_fields(event: EventRecord) -> dict:
    return {
        "id": event.id,
        "payment_id": event.payment_id,
        "time": timestamp(event.at),
        "action": _ACTION_TO_PB[event.action],
        "from_status": STATUS_TO_PB.get(event.from_status or "", pb.Payment.STATUS_UNSPECIFIED),
        "to_status": STATUS_TO_PB[event.to_status],
        "failure_reason": REASON_TO_PB.get(event.failure_reason or "", pb.Payment.FAILURE_REASON_UNSPECIFIED),
        "actor_id": event.actor_id,
        "actor_role": event.actor_role,
        "refund_id": event.refund_id or "",
        "refunded_amount": event.refunded_amount or 0,
    }


def payment_to_pb(row: PaymentRecord) -> pb.Payment:
    return pb.Payment(**payment_fields(row))


class PaymentServicer(pb_grpc.PaymentServiceServicer):
    def __init__(self, rules: PaymentRules, refunds: RefundRules):
        self.rules = rules
        self.refunds = refunds

    def CreatePayment(self, request, context):
        p = request.payment
        draft = PaymentDraft(email=p.email, amount=p.amount, currency=p.currency,
                             description=p.description, request_id=p.request_id)
        return payment_to_pb(self.rules.create(auth.caller(), draft))

    def ListPayments(self, request, context):
        page = self.rules.list(
            auth.caller(),
            page_size=request.page_size,
            page_token=request.page_token,
            # An enum number this server does not know stays visible to the rules, which reject it.
            status=_STATUS_FROM_PB.get(request.status, str(request.status)) if request.status else "",
            email=request.email,
            show_deleted=request.show_deleted,
        )
        # Dicts, not pb.Payment messages: the response would copy each message into itself.
        return pb.ListPaymentsResponse(payments=[payment_fields(r) for r in page.payments],
                                       next_page_token=page.next_page_token)

    def GetPayment(self, request, context):
        return payment_to_pb(self.rules.get(auth.caller(), request.id))

    def DeletePayment(self, request, context):
        self.rules.delete(auth.caller(), request.id)
        return empty_pb2.Empty()

    def ConfirmPayment(self, request, context):
        return payment_to_pb(self.rules.confirm(auth.caller(), request.id))

    def CancelPayment(self, request, context):
        return payment_to_pb(self.rules.cancel(auth.caller(), request.id))

    def ListPaymentEvents(self, request, context):
        page = self.rules.events(auth.caller(), request.payment_id, page_size=request.page_size,
                                 page_token=request.page_token)
        return pb.ListPaymentEventsResponse(events=[event_fields(e) for e in page.events],
                                            next_page_token=page.next_page_token)

    def UndeletePayment(self, request, context):
        return payment_to_pb(self.rules.undelete(auth.caller(), request.id))

    def CreateRefund(self, request, context):
        r = request.refund
        draft = RefundDraft(
            payment_id=request.payment_id, amount=r.amount,
            # An enum number this server does not know stays visible to the rules, which reject it.
            reason=REFUND_REASON_FROM_PB.get(r.reason, str(r.reason)) if r.reason else "",
            currency=r.currency, note=r.note, request_id=r.request_id,
            expected_refunded_amount=request.expected_refunded_amount
            if request.HasField("expected_refunded_amount") else None)
        return pb.Refund(**refund_fields(self.refunds.create(auth.caller(), draft)))

    def ListRefunds(self, request, context):
        page = self.refunds.list(auth.caller(), request.payment_id, page_size=request.page_size,
                                 page_token=request.page_token)
        return pb.ListRefundsResponse(refunds=[refund_fields(r) for r in page.refunds],
                                      next_page_token=page.next_page_token)

    def GetRefund(self, request, context):
        return pb.Refund(**refund_fields(self.refunds.get(auth.caller(), request.payment_id, request.id)))


class AuthServicer(pb_grpc.AuthServiceServicer):
    def __init__(self, accounts: Accounts):
        self.accounts = accounts

    def Register(self, request, context):
        user = self.accounts.register(request.email, request.password, client=client_address(context))
        return pb.RegisterResponse(user_id=user.id, email=user.email, role=user.role)

    def Login(self, request, context):
        return _login_pb(self.accounts.login(request.email, request.password, client_address(context)))

    def Refresh(self, request, context):
        return _login_pb(self.accounts.refresh(request.refresh_token))

    def Logout(self, request, context):
        self.accounts.logout(auth.caller())
        return empty_pb2.Empty()


def client_address(context) -> str:
    """The caller's client, as the lanes and the throttles count it (server/edge/admission.py
    trusted_client): what Envoy wrote in x-payments-client-address when the call
    comes through the pod's Envoy, else the TCP peer's host (a client on the gRPC port directly
    cannot claim another address); an IPv6 client by its /64."""
    claimed = None
    for key, value in context.invocation_metadata():
        if key == CLIENT_ADDRESS_HEADER:
            claimed = value if isinstance(value, str) else value.decode("latin-1")
    return admission.trusted_client(claimed, context.peer() or "")


def _login_pb(login) -> pb.LoginResponse:
    return pb.LoginResponse(access_token=login.access_token, token_type="Bearer", expires_in=login.expires_in,
                            refresh_token=login.refresh_token, refresh_expires_in=login.refresh_expires_in)
