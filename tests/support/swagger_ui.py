"""Swagger UI driven as a person uses it, in Debian's headless Chromium (Playwright): the browser
fixture and one operation block's steps. Used against `make run`'s page (tests/e2e) and the
Swagger UI image (tests/containers)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: .ci/run installs Debian's chromium package")
        pytest.skip(f"{CHROMIUM} missing: apt-get install chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Operation:
    """One operation block of Swagger UI, used as a person would: expand, Try it out, Execute."""

    def __init__(self, page, tag: str, operation_id: str):
        self.page = page
        self.block = page.locator(f"#operations-{tag}-{operation_id}")

    def try_it_out(self) -> "Operation":
        self.block.locator(".opblock-summary-control").click()
        self.block.locator("button.try-out__btn").click()
        return self

    def execute(self, body: dict | None = None) -> tuple[int, dict]:
        """Fill the body, press Execute, and read the status and JSON body the page shows."""
        if body is not None:
            self.block.locator("textarea.body-param__text").fill(json.dumps(body))
        answer = self.block.locator(".live-responses-table")
        clear = self.block.locator("button.btn-clear")
        if clear.count():  # executed before: Clear the old answer so the new one is what is read
            clear.click()
            answer.wait_for(state="detached")
        self.block.locator("button.execute").click()
        row = answer.locator("tbody tr.response").first
        row.wait_for()
        status = int(row.locator("td.response-col_status").inner_text().strip())
        shown = row.locator("td.response-col_description .highlight-code pre").first.inner_text()
        return status, json.loads(shown)

    def request_url(self) -> str:
        return self.block.locator(".request-url pre").inner_text().strip()

    def curl(self) -> str:
        return self.block.locator(".curl-command").inner_text()


def authorize(page, value: str) -> None:
    page.locator(".auth-wrapper button.authorize").click()
    dialog = page.locator(".modal-ux")
    dialog.locator("input[type=text]").fill(value)
    dialog.locator(".auth-btn-wrapper button.authorize").click()
    # Swagger UI swaps Authorize for Logout once the value is stored.
    dialog.get_by_role("button", name="Remove authorization").wait_for()
    dialog.locator("button.btn-done").click()


def open_page(browser, url: str):
    """A new context and page at `url`, once Swagger UI has drawn the operations; page.requested
    collects every URL the page loads. Returns (context, page): the caller closes the context."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.requested = []
    page.on("request", lambda r: page.requested.append(r.url))
    page.goto(url)
    page.wait_for_selector("#operations-Auth-Register")
    return context, page


def sign_up_log_in_and_create(page, api_url: str, email: str, password: str = "correct horse battery") -> dict:
    """Register, Login (straight to api_url), Authorize, CreatePayment: the payment the page shows."""
    status, registered = Operation(page, "Auth", "Register").try_it_out().execute({"email": email, "password": password})
    assert status == 200, registered
    login = Operation(page, "Auth", "Login").try_it_out()
    status, tokens = login.execute({"email": email, "password": password})
    assert status == 200, tokens
    assert login.request_url() == f"{api_url}/v1/auth/login"
    authorize(page, f"Bearer {tokens['access_token']}")
    status, payment = Operation(page, "Payments", "CreatePayment").try_it_out().execute(
        {"email": email, "amount": "990", "currency": "JPY", "request_id": uuid.uuid4().hex})
    assert status == 200, payment
    assert (payment["email"], payment["amount"]) == (email, "990")
    return payment
