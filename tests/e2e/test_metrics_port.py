"""Envoy's metrics port (9902 in envoy.yaml): its own statistics in Prometheus format for a scraper,
and nothing else of the admin interface, which stays on loopback. A scrape after a known sequence
of API calls shows them counted; every admin path that changes state or shows the config, and any
method but GET, is a 404 there, and the admin interface itself is untouched by those attempts."""

from __future__ import annotations

import re
import urllib.request

import pytest

from tests.support.rest import Client


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/prometheus", timeout=10) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
        return r.read().decode()


def counter(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name}{{{wanted}}} in the scrape")


def test_a_scrape_counts_the_calls_made_before_it(stack):
    before = scrape(stack.envoy.metrics_port)
    api = Client(stack.url)
    for _ in range(5):
        assert api.get("/v1/payments/pay_doesnotexist").status == 401  # no token: answered by Envoy
    after = scrape(stack.envoy.metrics_port)
    assert "# TYPE envoy_http_downstream_rq_total counter" in after
    grew = (counter(after, "envoy_http_downstream_rq_xx", envoy_http_conn_manager_prefix="payments_api", envoy_response_code_class="4")
            - counter(before, "envoy_http_downstream_rq_xx", envoy_http_conn_manager_prefix="payments_api", envoy_response_code_class="4"))
    assert grew >= 5, grew
    assert re.search(r'^envoy_cluster_membership_healthy\{envoy_cluster_name="payments_grpc"\} 1$', after, re.M)


@pytest.mark.parametrize("method, path", [
    ("POST", "/healthcheck/fail"), ("POST", "/quitquitquit"), ("POST", "/runtime_modify?x=1"),
    ("GET", "/config_dump"), ("GET", "/stats"), ("GET", "/clusters"), ("GET", "/"),
    ("POST", "/stats/prometheus"), ("GET", "/stats/prometheus/../config_dump"), ("GET", "/ready"),
])
def test_nothing_else_of_the_admin_interface_is_reachable_there(stack, method, path):
    request = urllib.request.Request(f"http://127.0.0.1:{stack.envoy.metrics_port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 404, (method, path, refused.value.code)
    # Envoy still serves: nothing above failed its health check or stopped it.
    assert Client(stack.url).get("/ready").status == 200
