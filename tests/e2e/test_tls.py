"""Envoy's TLS listener (envoy/envoy-tls.yaml, the config a load balancer that speaks HTTP/2 over TLS
reaches) for real, with a certificate made for the test: curl verifying it with --cacert, grpcurl
over TLS with reflection, and the Swagger UI page over HTTPS in headless Chromium calling the API
over HTTPS."""

from __future__ import annotations

import json
import ssl
import subprocess
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.support.stack import ROOT, Envoy, running_stack, serve_files
from tests.support.swagger_ui import CHROMIUM, CHROMIUM_ARGS, open_page, sign_up_log_in_and_create
from tests.support.tls import make_certificates

GRPCURL = str(ROOT / ".tools" / "bin" / "grpcurl")
TLS_CONFIG = ROOT / "envoy" / "envoy-tls.yaml"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory, keys_dir):
    """server + Envoy on envoy-tls.yaml, and openapi/ served over HTTPS with the same certificate."""
    work = tmp_path_factory.mktemp("tls")
    ca, spki = make_certificates(work / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(work / "tls" / "tls.crt", work / "tls" / "tls.key")
    ui = serve_files(ROOT / "openapi", ("127.0.0.1", 0), tls=context)
    ui_origin = f"https://localhost:{ui.server_address[1]}"
    try:
        with running_stack(work, keys_dir, envoy_env={"PAYMENTS_CORS_ORIGINS": ui_origin},
                           envoy_source=TLS_CONFIG, ca=ca) as (_, envoy):
            yield envoy, ca, spki, ui_origin
    finally:
        ui.shutdown()
        ui.server_close()


def curl(ca: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--cacert", str(ca), *args], capture_output=True, text=True, timeout=30)


def register_and_login(envoy: Envoy, ca: Path) -> str:
    email = f"tls-{uuid.uuid4().hex[:8]}@example.com"
    body = json.dumps({"email": email, "password": PASSWORD})
    assert curl(ca, "--fail-with-body", "-H", "content-type: application/json", "-d", body,
                f"{envoy.url}/v1/auth/register").returncode == 0
    login = curl(ca, "--fail-with-body", "-H", "content-type: application/json", "-d", body,
                 f"{envoy.url}/v1/auth/login")
    assert login.returncode == 0, login.stdout + login.stderr
    return json.loads(login.stdout)["access_token"]


def test_https_with_a_verified_certificate_http2_and_hsts(tls_stack):
    envoy, ca, _, _ = tls_stack
    token = register_and_login(envoy, ca)
    r = curl(ca, "--http2", "-D", "-", "-o", "/dev/null", "-w", "%{http_version}",
             "-H", f"authorization: Bearer {token}", f"{envoy.url}/v1/payments")
    assert r.returncode == 0, r.stderr
    head = r.stdout.lower()
    assert head.startswith("http/2 200")  # ALPN chose h2
    assert "strict-transport-security: max-age=31536000; includesubdomains" in head
    assert r.stdout.strip().endswith("2")
    # HTTP/1.1 over TLS works too (ALPN http/1.1).
    r = curl(ca, "--http1.1", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", f"{envoy.url}/ready")
    assert r.stdout == "200 1.1", r.stderr


def test_the_certificate_is_checked_and_plain_http_is_not_served(tls_stack):
    envoy, ca, _, _ = tls_stack
    untrusted = subprocess.run(["curl", "-sS", "-o", "/dev/null", f"{envoy.url}/ready"],
                               capture_output=True, text=True, timeout=30)
    assert untrusted.returncode == 60, untrusted.stderr  # CURLE_PEER_FAILED_VERIFICATION
    plain = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                            f"http://127.0.0.1:{envoy.port}/ready"], capture_output=True, text=True, timeout=30)
    assert plain.stdout in ("000", "400") and plain.stdout != "200"
    old = curl(ca, "--tls-max", "1.1", "-o", "/dev/null", f"{envoy.url}/ready")
    assert old.returncode != 0  # TLS 1.0 and 1.1 are refused


def test_grpcurl_over_tls_with_reflection(tls_stack):
    envoy, ca, _, _ = tls_stack
    token = register_and_login(envoy, ca)
    target = f"localhost:{envoy.port}"
    listed = subprocess.run([GRPCURL, "-cacert", str(ca), "-H", f"authorization: Bearer {token}", target, "list"],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert "payments.v1.PaymentService" in listed.stdout.split()
    page = subprocess.run([GRPCURL, "-cacert", str(ca), "-H", f"authorization: Bearer {token}",
                           "-d", '{"page_size": 5}', target, "payments.v1.PaymentService/ListPayments"],
                          capture_output=True, text=True, timeout=30)
    assert page.returncode == 0, page.stderr
    assert json.loads(page.stdout or "{}").get("payments", []) == []  # a new customer owns nothing
    # Without the authority, grpcurl refuses the certificate.
    refused = subprocess.run([GRPCURL, target, "list"], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "certificate" in refused.stderr


def test_swagger_ui_over_https_calls_the_api_over_https(tls_stack):
    envoy, _, spki, ui_origin = tls_stack
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: scripts/system-deps.sh test installs it"
    # A browser of its own that trusts exactly this test's certificate (and no other error).
    with sync_playwright() as p:
        trusting = p.chromium.launch(executable_path=CHROMIUM,
                                     args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki}"])
        try:
            _, page = open_page(trusting, f"{ui_origin}/ui/?api={envoy.url}")
            payment = sign_up_log_in_and_create(page, envoy.url, f"tls-ui-{uuid.uuid4().hex[:8]}@example.com")
            assert payment["status"] == "PENDING", payment
        finally:
            trusting.close()
