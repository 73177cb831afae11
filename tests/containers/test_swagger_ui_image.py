"""The Swagger UI image for real: its read-only container serves the page, Swagger UI's files and
the committed document, and "Try it out" in headless Chromium works against the API pod, with the
API's address from a mounted config.json as a deployment would give it."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.support.containers import IMAGES, wait_ready
from tests.support.swagger_ui import Operation, authorize, browser  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def ui(podman, images, pod, ui_port, tmp_path_factory):
    config = tmp_path_factory.mktemp("swagger-ui") / "config.json"  # mounted as the directory ui/config/
    config.write_text(json.dumps({"api": pod.url}))
    config.parent.chmod(0o755)  # readable by the image's user, as a ConfigMap volume is
    name = f"payments-test-ui-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, "--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
           "--user=10001:10001", "-p", f"127.0.0.1:{ui_port}:8080",
           "-v", f"{config.parent}:/srv/ui/config:ro", IMAGES["swagger-ui"])
    origin = f"http://127.0.0.1:{ui_port}"
    try:
        wait_ready(f"{origin}/ui/", timeout=20)
        yield origin
    finally:
        podman("rm", "-f", "-t", "1", name, check=False)


def headers(url: str) -> dict[str, str]:
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-D", "-", url], capture_output=True, text=True,
                         timeout=20, check=True).stdout
    lines = out.replace("\r\n", "\n").strip().split("\n")
    return {"status": lines[0].split()[1], **{k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}}


def test_the_container_serves_the_page_its_files_and_the_committed_document(ui):
    assert headers(f"{ui}/ui/")["status"] == "200"
    assert headers(f"{ui}/ui/node_modules/swagger-ui-dist/swagger-ui-bundle.js")["content-type"].startswith("text/javascript")
    doc = headers(f"{ui}/payments.swagger.json")
    assert doc["status"] == "200" and doc["content-type"].startswith("application/json")
    served = subprocess.run(["curl", "-sS", f"{ui}/payments.swagger.json"], capture_output=True, timeout=20, check=True).stdout
    assert served == (ROOT / "openapi" / "payments.swagger.json").read_bytes()
    assert headers(f"{ui}/")["status"] == "200"  # a page that sends browsers on to ui/


def test_try_it_out_from_the_image_against_the_pod(browser, ui, pod):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(20_000)
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    try:
        page.goto(f"{ui}/")  # the redirect to ui/, then the page
        page.wait_for_selector("#operations-Auth-Register")
        email = f"ui-{uuid.uuid4().hex[:10]}@example.com"
        status, _ = Operation(page, "Auth", "Register").try_it_out().execute({"email": email, "password": PASSWORD})
        assert status == 200
        login = Operation(page, "Auth", "Login").try_it_out()
        status, tokens = login.execute({"email": email, "password": PASSWORD})
        assert status == 200, tokens
        assert login.request_url() == f"{pod.url}/v1/auth/login"  # the address config.json gave
        authorize(page, f"Bearer {tokens['access_token']}")
        create = Operation(page, "Payments", "CreatePayment").try_it_out()
        status, payment = create.execute({"email": email, "amount": "990", "currency": "JPY",
                                          "request_id": uuid.uuid4().hex})
        assert status == 200, payment
        assert (payment["email"], payment["amount"], payment["status"]) == (email, "990", "PENDING")
        foreign = [u for u in requested if not u.startswith((ui + "/", pod.url + "/"))]
        assert foreign == []
    finally:
        context.close()
