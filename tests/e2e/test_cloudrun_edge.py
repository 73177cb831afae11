"""envoy-cloudrun.yaml for real: behind Cloud Run's front end every request arrives from Google's
address, with X-Forwarded-For overwritten to the client's address alone. This test plays the front
end (one TCP peer, 127.0.0.1, writing X-Forwarded-For): a login flood from one client address is
limited while another client's login through the same peer is answered, and the access log names
the clients, not the peer."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

from tests.faults.test_abuse import per_address_bucket
from tests.support.rest import Client
from tests.support.stack import ROOT, running_stack

VARIANT = ROOT / "envoy" / "envoy-cloudrun.yaml"
FLOODER, OTHER = "203.0.113.66", "198.51.100.7"


@pytest.fixture(scope="module")
def front_end(tmp_path_factory, keys_dir):
    with running_stack(tmp_path_factory.mktemp("cloudrun-edge"), keys_dir, envoy_source=VARIANT) as (_, envoy):
        yield envoy


def login(api: Client, client: str, n: int = 0):
    return api.post("/v1/auth/login", {"email": f"nobody{n}@example.com", "password": "not the password"},
                    headers={"X-Forwarded-For": client})


def test_the_login_limit_is_per_client_behind_the_front_end(front_end):
    api = Client(front_end.url)
    burst = int(per_address_bucket()["max_tokens"])
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda n: login(api, FLOODER, n), range(10 * burst)))
    assert 429 in {a.status for a in answers}  # the flooding client hit its own bucket
    # Through the same peer, another client is not limited by the flood.
    others = [login(api, OTHER, n).status for n in range(3)]
    assert others == [401, 401, 401], others

    deadline = time.monotonic() + 5
    clients = set()
    while time.monotonic() < deadline and not {FLOODER, OTHER} <= clients:
        time.sleep(0.3)
        clients = {json.loads(line).get("client") for line in front_end.access_log.read_text().splitlines() if line.strip()}
    assert {FLOODER, OTHER} <= clients and "127.0.0.1" not in clients, clients
