"""A client of the Payments API for services (the Shopping service's checkout): see README.md."""

from payments_client import errors, webhooks
from payments_client.client import Payment, PaymentsClient
from payments_client.errors import PaymentsError
from payments_client.retry import RetryPolicy
from payments_client.tokens import ClientCredentials, GoogleIdToken, StaticToken, TokenSource

__all__ = ["errors", "webhooks", "ClientCredentials", "GoogleIdToken", "Payment", "PaymentsClient", "PaymentsError", "RetryPolicy",
           "StaticToken", "TokenSource"]
