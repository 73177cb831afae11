"""The client a service uses to take payments: native gRPC (to Envoy, or to the server directly),
a bearer token from a pluggable source on every call, a deadline on every call, retries only where
they are safe (payments_client.retry), and typed errors (payments_client.errors)."""

from __future__ import annotations

import uuid
from typing import Callable, TypeVar

import grpc

from payments_client import errors
from payments_client._pb import payments_pb2, payments_pb2_grpc
from payments_client.retry import NO_RETRY, RetryPolicy, retryable
from payments_client.tokens import TokenSource

T = TypeVar("T")

Payment = payments_pb2.Payment


class PaymentsClient:
    """`target`: host:port of Envoy's gRPC port (or the server's). `tokens`: where the bearer token
    comes from (tokens.ClientCredentials, tokens.GoogleIdToken, ...). `deadline`: seconds each
    attempt may take. `credentials`: grpc.ssl_channel_credentials() for TLS; plaintext (h2c) if
    None. `auth_headers`: the metadata keys the token goes in, each as `Bearer <token>`; behind
    Cloud Run's own invoker check, ("authorization", "x-serverless-authorization"): Cloud Run checks
    the second, the service the first (docs/cloudrun.md)."""

    def __init__(self, target: str, tokens: TokenSource, *, deadline: float = 5.0, retry: RetryPolicy | None = None,
                 credentials: grpc.ChannelCredentials | None = None, channel: grpc.Channel | None = None,
                 auth_headers: tuple[str, ...] = ("authorization",)):
        if channel is None:
            channel = (grpc.secure_channel(target, credentials) if credentials is not None
                       else grpc.insecure_channel(target))
        self.channel = channel
        self.tokens = tokens
        bind = getattr(tokens, "bind", None)
        if bind is not None:
            bind(channel)
        self.deadline = deadline
        self.retry = retry or RetryPolicy()
        self.auth_headers = auth_headers
        self._payments = payments_pb2_grpc.PaymentServiceStub(channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PaymentsClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- calls -------------------------------------------------------------------------------

    def create_payment(self, email: str, amount: int, *, currency: str = "", description: str = "",
                       request_id: str = "") -> Payment:
        """A PENDING payment of `amount` (an int in the currency's minor unit, never a float).
        `request_id` makes it idempotent (an order's id is a good one); without one, a random id
        is made here, once, so that the retries of this call still carry the same one."""
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise TypeError("amount is an int count of the currency's minor unit")
        payment = Payment(email=email, amount=amount, currency=currency, description=description,
                          request_id=request_id or f"pc-{uuid.uuid4().hex}")
        request = payments_pb2.CreatePaymentRequest(payment=payment)
        return self._call(self._payments.CreatePayment, request, self.retry)

    def get_payment(self, payment_id: str) -> Payment:
        return self._call(self._payments.GetPayment, payments_pb2.GetPaymentRequest(id=payment_id), self.retry)

    def confirm_payment(self, payment_id: str) -> Payment:
        return self._call(self._payments.ConfirmPayment, payments_pb2.ConfirmPaymentRequest(id=payment_id), NO_RETRY)

    def cancel_payment(self, payment_id: str) -> Payment:
        return self._call(self._payments.CancelPayment, payments_pb2.CancelPaymentRequest(id=payment_id), NO_RETRY)

    # --- the policy ----------------------------------------------------------------------------

    def _call(self, method: Callable[..., T], request, policy: RetryPolicy) -> T:
        """One call: the same request object at every attempt (so the same request_id), each
        attempt with a deadline within the policy's budget; an UNAUTHENTICATED answer renews the
        token and repeats once, without counting as an attempt."""
        started = policy.clock()
        attempt, renewed = 0, False
        while True:
            attempt += 1
            left = policy.budget - (policy.clock() - started)
            token = ""
            try:
                token = self.tokens.token()  # a token service that is down is retried like the call
                return method(request, timeout=max(0.001, min(self.deadline, left)),
                              metadata=tuple((name, f"Bearer {token}") for name in self.auth_headers))
            except grpc.RpcError as raw:
                error = errors.from_rpc_error(raw)
            except errors.PaymentsError as refused:
                error = refused
            if error.code == grpc.StatusCode.UNAUTHENTICATED and token and not renewed:
                self.tokens.invalidate(token)
                renewed, attempt = True, attempt - 1
                continue
            if attempt >= policy.attempts or not retryable(error):
                raise error
            wait = policy.delay(attempt, error)
            if policy.clock() - started + wait >= policy.budget:
                raise error
            policy.sleep(wait)
