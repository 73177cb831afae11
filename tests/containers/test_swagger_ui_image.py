"""The Swagger UI image for real: its read-only container serves the page, Swagger UI's files and
the committed document, and "Try it out" in headless Chromium works against the API pod, with the
API's address from a mounted config.json as a deployment would give it."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from devstack.containers import IMAGES, wait_ready
from tests.support.swagger_ui import browser, open_page, sign_up_log_in_and_create  # noqa: F401 (a fixture)

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
    for name in ("payments.swagger.json", "payments.openapi.json"):  # 2.0, and 3.0 beside it
        doc = headers(f"{ui}/{name}")
        assert doc["status"] == "200" and doc["content-type"].startswith("application/json")
        served = subprocess.run(["curl", "-sS", f"{ui}/{name}"], capture_output=True, timeout=20, check=True).stdout
        assert served == (ROOT / "openapi" / name).read_bytes()
    assert headers(f"{ui}/")["status"] == "200"  # a page that sends browsers on to ui/


def test_try_it_out_from_the_image_against_the_pod(browser, ui, pod):
    context, page = open_page(browser, f"{ui}/")  # the redirect to ui/, then the page
    try:
        # The API address comes from the mounted config.json.
        payment = sign_up_log_in_and_create(page, pod.url, f"ui-{uuid.uuid4().hex[:10]}@example.com")
        assert payment["status"] == "PENDING", payment
        foreign = [u for u in page.requested if not u.startswith((ui + "/", pod.url + "/"))]
        assert foreign == []
    finally:
        context.close()
