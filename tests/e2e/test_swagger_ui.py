"""Swagger UI in a real browser (Debian's headless Chromium, driven by Playwright) against the
real Envoy and server: what a person does on the page, step by step.

The page is served from its own origin, as `make run` serves it, so every "Try it out" call is a
cross-origin request to Envoy: this also proves the CORS policy and the initializer's API address.
Screenshots go to test-artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import UI_PORT
from tests.support.stack import serve_files
from tests.support.swagger_ui import Operation, authorize, browser, open_page  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "openapi"  # the directory `make run` serves: the document and ui/
ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def ui_origin():
    """openapi/ over HTTP on a free loopback port, like the static server of `make run`."""
    assert (SITE / "ui" / "node_modules" / "swagger-ui-dist" / "swagger-ui-bundle.js").exists(), \
        "Swagger UI is not installed: run `make setup`"
    server = serve_files(SITE, ("127.0.0.1", UI_PORT))  # an origin Envoy allows
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def page(browser, ui_origin, stack):
    context, page = open_page(browser, f"{ui_origin}/ui/?api={stack.url}")
    yield page
    context.close()


def test_register_login_authorize_create_and_list_from_swagger_ui(page, stack, ui_origin):
    email = f"swagger-{uuid.uuid4().hex[:10]}@example.com"

    status, registered = Operation(page, "Auth", "Register").try_it_out().execute({"email": email, "password": PASSWORD})
    assert status == 200, registered
    assert (registered["email"], registered["role"]) == (email, "customer")

    login = Operation(page, "Auth", "Login").try_it_out()
    status, tokens = login.execute({"email": email, "password": PASSWORD})
    assert status == 200, tokens
    assert tokens["token_type"] == "Bearer" and tokens["access_token"].count(".") == 2
    assert login.request_url() == f"{stack.url}/v1/auth/login"  # straight to Envoy, cross-origin

    listing = Operation(page, "Payments", "ListPayments").try_it_out()
    status, refused = listing.execute()
    assert status == 401, refused
    assert refused["code"] == 16  # UNAUTHENTICATED, in the documented google.rpc.Status shape

    authorize(page, f"Bearer {tokens['access_token']}")

    create = Operation(page, "Payments", "CreatePayment").try_it_out()
    status, payment = create.execute({"email": email, "amount": "150000", "currency": "IDR",
                                      "description": "Paid from Swagger UI", "request_id": uuid.uuid4().hex})
    assert status == 200, payment
    assert payment["id"].startswith("pay_")
    assert (payment["email"], payment["amount"], payment["currency"], payment["status"]) == \
        (email, "150000", "IDR", "PENDING")
    assert create.request_url() == f"{stack.url}/v1/payments"
    assert "Authorization: Bearer " in create.curl()

    status, page_of_payments = listing.execute()
    assert status == 200, page_of_payments
    assert [p["id"] for p in page_of_payments["payments"]] == [payment["id"]]
    assert page_of_payments["payments"][0]["description"] == "Paid from Swagger UI"

    ARTIFACTS.mkdir(exist_ok=True)
    listing.block.screenshot(path=str(ARTIFACTS / "swagger-ui-list-payments.png"))
    create.block.screenshot(path=str(ARTIFACTS / "swagger-ui-create-payment.png"))
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(ARTIFACTS / "swagger-ui.png"))

    # Everything the page loaded came from its own origin or the API: no CDN, works offline.
    foreign = [u for u in page.requested if not u.startswith((ui_origin + "/", stack.url + "/"))]
    assert foreign == []


def test_an_admin_creates_a_service_client_and_it_gets_a_token_from_swagger_ui(page, stack):
    """The "Service clients" operations on the page: log in as the admin, Authorize, CreateClient
    (its secret shown once), then the token endpoint's form (RFC 6749 4.4.2) filled field by field."""
    from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD

    status, tokens = Operation(page, "Auth", "Login").try_it_out().execute({"email": ADMIN_EMAIL,
                                                                             "password": ADMIN_PASSWORD})
    assert status == 200, tokens
    authorize(page, f"Bearer {tokens['access_token']}")
    status, made = Operation(page, "Service_clients", "CreateClient").try_it_out().execute(
        {"name": "shopping", "permissions": ["payments.create", "payments.read"]})
    assert status == 200, made
    assert made["secret"].startswith("pmt_cs_") and made["client"]["id"].startswith("cli_")

    grant = Operation(page, "Service_clients", "CreateToken").try_it_out()
    for name, value in (("grant_type", "client_credentials"), ("client_id", made["client"]["id"]),
                        ("client_secret", made["secret"]), ("scope", "payments.read")):
        grant.block.locator(f'tr[data-param-name="{name}"] input').fill(value)
    status, token = grant.execute()
    assert status == 200, token
    assert (token["token_type"], token["expires_in"], token["scope"]) == ("Bearer", 300, "payments.read")
    assert grant.request_url() == f"{stack.url}/oauth2/token"
    assert "application/x-www-form-urlencoded" in grant.curl()
