"""Google service accounts as callers, end to end: the real server and Envoy, configured for one
deployment (PAYMENTS_GOOGLE_AUDIENCE, the service account pinned by its `sub` and mapped to a
service client, Google's keys from a local stand-in: devstack/google_standin.py, which Envoy
fetches too), on SQLite and PostgreSQL.

A pinned account's Google ID token is its client, with the client's permissions, over REST and
gRPC through Envoy and gRPC straight to the server, and through the Python client's GoogleIdToken
source (the metadata server's identity endpoint, stood in for). Any other Google principal, another
audience, a key Google does not publish, an expired token: refused, with the reason. Revoking the
client refuses its Google tokens too, within the revocation bound.
"""

from __future__ import annotations

import os
import time

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from tests.conftest import own_pg_database, rich_status
from tests.e2e.conftest import registered
from devstack.google_standin import GoogleStandIn, ServiceAccount
from tests.support.python_client import import_from, shared_copy
from tests.support.rest import Client, loopback_address
from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD, running_stack

AUDIENCE = "https://payments-123456789.europe-west1.run.app"
REVOCATION_CHECK = 1.0


def admin_login(api: Client) -> str:
    login = api.from_address(loopback_address()).post("/v1/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
    assert login.status == 200, login.text
    return login.json["access_token"]


@pytest.fixture(scope="module")
def google():
    standin = GoogleStandIn()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def shopping():
    return ServiceAccount("shopping")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def deployment(request, tmp_path_factory, keys_dir, google, shopping):
    """The client is made first (an admin's call), then the server restarts with the deployment's
    Google settings naming it, as an operator would set them."""
    work = tmp_path_factory.mktemp(f"google-{request.param}")
    with contextlib_database(request.param) as url:
        with running_stack(work, keys_dir, database_url=url) as (_, envoy):
            api = Client(envoy.url)
            made = api.post("/v1/clients", {"name": "shopping on cloud run", "permissions": ["payments.create", "payments.read"]},
                            token=admin_login(api))
            assert made.status == 200, made.text
            client_id = made.json["client"]["id"]
        settings = {"PAYMENTS_GOOGLE_AUDIENCE": AUDIENCE, "PAYMENTS_GOOGLE_JWKS_URL": google.certs_url,
                    "PAYMENTS_GOOGLE_SERVICE_ACCOUNTS": f"{shopping.sub}={client_id}",
                    "PAYMENTS_REVOCATION_CHECK_SECONDS": str(REVOCATION_CHECK)}
        with running_stack(work, keys_dir, database_url=url, server_overrides=settings,
                           google_jwks=google.certs_url) as (server, envoy):
            yield server, envoy, client_id


def contextlib_database(kind: str):
    import contextlib

    if kind == "sqlite":
        return contextlib.nullcontext("")
    return own_pg_database(f"payments_test_{os.getpid()}_google")


@pytest.fixture(scope="module")
def api(deployment) -> Client:
    return Client(deployment[1].url)


@pytest.fixture
def buyer(api) -> str:
    return registered(api, "buyer")


def test_a_pinned_accounts_token_is_its_client_over_rest(api, google, shopping, buyer, deployment):
    token = google.mint(shopping, AUDIENCE)
    made = api.post("/v1/payments", {"email": buyer, "amount": "150000", "request_id": "order-g1"}, token=token)
    assert made.status == 200, made.text
    again = api.post("/v1/payments", {"email": buyer, "amount": "150000", "request_id": "order-g1"}, token=token)
    assert again.json["id"] == made.json["id"]  # idempotent for the client, as for its own tokens
    assert api.get(f"/v1/payments/{made.json['id']}", token=token).status == 200
    # The client's permissions, not more: it does not hold payments.confirm.
    refused = api.post(f"/v1/payments/{made.json['id']}:confirm", {}, token=token)
    assert refused.status == 403 and refused.error()[1] == "PERMISSION_MISSING", refused.text
    # Managing clients and logging out are for persons: the token is valid, the method is not its.
    listing = api.get("/v1/clients", token=token)
    assert (listing.status, listing.error()[1]) == (403, "PERSONS_ONLY"), listing.text
    logout = api.post("/v1/auth/logout", {}, token=token)
    assert (logout.status, logout.error()[1]) == (403, "PERSONS_ONLY"), logout.text


def test_person_only_methods_answer_a_google_token_alike_on_every_way_in(deployment, google, shopping):
    """REST through Envoy (above), gRPC through Envoy and gRPC on the server's own port: the same
    PERMISSION_DENIED / PERSONS_ONLY for a valid Google token on a person-only method."""
    server, envoy, _ = deployment
    md = (("authorization", f"Bearer {google.mint(shopping, AUDIENCE)}"),)
    for target in (f"127.0.0.1:{envoy.port}", f"127.0.0.1:{server.port}"):
        with grpc.insecure_channel(target) as channel:
            for call, request in ((pb_grpc.ClientServiceStub(channel).ListClients, pb.ListClientsRequest()),
                                  (pb_grpc.ClientServiceStub(channel).RevokeClient, pb.RevokeClientRequest(id="x")),
                                  (pb_grpc.AuthServiceStub(channel).Logout, pb.LogoutRequest())):
                with pytest.raises(grpc.RpcError) as e:
                    call(request, metadata=md, timeout=10)
                code, info, _ = rich_status(e.value)
                assert (code, info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERSONS_ONLY"), (target, call)


def test_the_python_client_gets_it_from_the_metadata_server_and_calls_over_grpc(deployment, google, shopping, buyer,
                                                                                 tmp_path_factory):
    pc = import_from(shared_copy(tmp_path_factory))
    google.workload = shopping
    tokens = pc.GoogleIdToken(AUDIENCE, metadata_url=google.identity_url)
    with pc.PaymentsClient(f"127.0.0.1:{deployment[1].port}", tokens) as client:
        payment = client.create_payment(buyer, 2500, request_id="order-g2")
        assert client.get_payment(payment.id).id == payment.id
        with pytest.raises(pc.errors.PermissionDenied) as refused:
            client.confirm_payment(payment.id)
    assert refused.value.reason == "PERMISSION_MISSING"
    assert tokens.fetches == 1  # cached: one token for every call
    asked = google.identity_requests[-1]
    assert asked["flavor"] == "Google" and asked["query"] == {"audience": AUDIENCE, "format": "full"}


def test_straight_to_the_server_the_answers_are_the_same(deployment, google, shopping, buyer, tmp_path_factory):
    pc = import_from(shared_copy(tmp_path_factory))
    server = deployment[0]
    stranger = ServiceAccount("stranger", project="elsewhere")
    with pc.PaymentsClient(f"127.0.0.1:{server.port}", pc.StaticToken(google.mint(shopping, AUDIENCE))) as client:
        assert client.create_payment(buyer, 100, request_id="order-g3").status == 1  # PENDING
    with pc.PaymentsClient(f"127.0.0.1:{server.port}", pc.StaticToken(google.mint(stranger, AUDIENCE))) as client:
        with pytest.raises(pc.errors.PermissionDenied) as refused:
            client.create_payment(buyer, 100, request_id="order-g4")
    assert refused.value.reason == "SERVICE_ACCOUNT_NOT_ALLOWED"


@pytest.mark.parametrize("case, status, reason, source", [
    ("stranger", 403, "SERVICE_ACCOUNT_NOT_ALLOWED", None),  # Google-signed, our audience: the server says no
    ("audience", 403, "WRONG_AUDIENCE", None),
    ("unpublished key", 401, "INVALID_TOKEN", "envoy"),  # Envoy already
    ("expired", 401, "INVALID_TOKEN", "envoy"),
])
def test_other_tokens_are_refused_with_their_reason(api, google, shopping, buyer, case, status, reason, source):
    from cryptography.hazmat.primitives.asymmetric import rsa

    token = {
        "stranger": lambda: google.mint(ServiceAccount("stranger", project="elsewhere"), AUDIENCE),
        "audience": lambda: google.mint(shopping, "https://other-service.example.com"),
        "unpublished key": lambda: google.mint(shopping, AUDIENCE,
                                               key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        "expired": lambda: google.mint(shopping, AUDIENCE, issued=time.time() - 7200),
    }[case]()
    answer = api.post("/v1/payments", {"email": buyer, "amount": "100"}, token=token)
    assert answer.status == status, answer.text
    _, got, body = answer.error()
    assert got == reason, body
    info = next(d for d in body["details"] if d["@type"].endswith("ErrorInfo"))
    assert info.get("metadata", {}).get("source") == source, body


def test_revoking_the_client_refuses_its_google_tokens_within_the_bound(api, deployment, google, shopping, buyer):
    token = google.mint(shopping, AUDIENCE)
    assert api.get("/v1/payments?page_size=1", token=token).status == 200
    revoked = api.post(f"/v1/clients/{deployment[2]}:revoke", {}, token=admin_login(api))
    assert revoked.status == 200, revoked.text
    deadline = time.monotonic() + REVOCATION_CHECK + 5
    while time.monotonic() < deadline:
        answer = api.get("/v1/payments?page_size=1", token=token)
        if answer.status == 401:
            break
        time.sleep(0.1)
    assert answer.status == 401, answer.text
    fresh = api.post("/v1/payments", {"email": buyer, "amount": "100"}, token=google.mint(shopping, AUDIENCE))
    assert fresh.status == 401, fresh.text
