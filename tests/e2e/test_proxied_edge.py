"""The variants that run behind Google's front ends, for real. There every request arrives from
Google's address, and the client is somewhere in X-Forwarded-For:

  envoy-cloudrun.yaml  Cloud Run's front end overwrites the header with the client's address alone;
  envoy-gke.yaml       GKE's Gateway (over TLS) appends "<client>, <load balancer address>" to
                       whatever the client sent.

Each test plays the front end (one TCP peer, 127.0.0.1, writing the header as it does): a login
flood from one client address is limited, also when the flooder writes addresses of its own into the
header, while another client's login through the same peer is answered; the access log names the
clients, not the peer or the load balancer."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import time
from typing import Callable

import pytest

from tests.faults.test_abuse import per_address_bucket
from tests.support.rest import Client
from tests.support.stack import ROOT, running_stack
from tests.support.tls import make_certificates

FLOODER, OTHER = "203.0.113.66", "198.51.100.7"
LOAD_BALANCER = "34.111.1.1"  # the Gateway's own address, which GKE's front end appends


@dataclasses.dataclass(frozen=True)
class FrontEnd:
    variant: str
    tls: bool
    forwarded: Callable[[str, str], str]  # (what the client sent, the client's address) -> header


FRONT_ENDS = {
    "cloudrun": FrontEnd("envoy-cloudrun.yaml", False, lambda sent, client: client),
    "gke": FrontEnd("envoy-gke.yaml", True,
                    lambda sent, client: ", ".join(a for a in (sent, client, LOAD_BALANCER) if a)),
}


@pytest.fixture(scope="module", params=sorted(FRONT_ENDS))
def edge(request, tmp_path_factory, keys_dir):
    front = FRONT_ENDS[request.param]
    work = tmp_path_factory.mktemp(f"{request.param}-edge")
    ca = make_certificates(work / "tls")[0] if front.tls else None
    with running_stack(work, keys_dir, envoy_source=ROOT / "envoy" / front.variant, ca=ca) as (_, envoy):
        yield front, Client(envoy.url, ca=ca), envoy


def login(edge, client: str, n: int = 0, sent: str = ""):
    front, api, _ = edge
    return api.post("/v1/auth/login", {"email": f"nobody{n}@example.com", "password": "not the password"},
                    headers={"X-Forwarded-For": front.forwarded(sent, client)})


def test_the_login_limit_is_per_client_behind_the_front_end(edge):
    burst = int(per_address_bucket()["max_tokens"])
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        # The flooder also writes an address of its own, a different one each time, into the header.
        answers = list(pool.map(lambda n: login(edge, FLOODER, n, sent=f"192.0.2.{n % 250}"), range(10 * burst)))
    assert 429 in {a.status for a in answers}  # the flooding client hit its own bucket
    # Through the same peer, another client is not limited by the flood.
    others = [login(edge, OTHER, n).status for n in range(3)]
    assert others == [401, 401, 401], others

    access_log = edge[2].access_log
    deadline = time.monotonic() + 5
    clients = set()
    while time.monotonic() < deadline and not {FLOODER, OTHER} <= clients:
        time.sleep(0.3)
        clients = {json.loads(line).get("client") for line in access_log.read_text().splitlines() if line.strip()}
    assert {FLOODER, OTHER} <= clients, clients
    assert clients.isdisjoint({"127.0.0.1", LOAD_BALANCER}) and not any(c.startswith("192.0.2.") for c in clients), clients


def test_an_ipv6_client_is_limited_by_its_64_not_by_each_address(edge):
    """One IPv6 host has 2^64 addresses to rotate through: a login flood that writes a new address
    of one /64 each time still meets one bucket, and another /64 is not limited by it."""
    burst = int(per_address_bucket()["max_tokens"])
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(lambda n: login(edge, f"2001:db8:7:1::{n + 1:x}", n), range(10 * burst)))
    # Envoy's own refusal, not the server's login lane being busy (which a flood from anywhere meets).
    limited = sum(a.status == 429 and a.json["details"][0]["reason"] == "RATE_LIMITED" for a in answers)
    assert limited >= 5 * burst, collections.Counter((a.status, a.text[:80]) for a in answers)
    others = [login(edge, f"2001:db8:7:2::{n + 1:x}", n).status for n in range(3)]
    assert others == [401, 401, 401], others


def test_password_guesses_from_one_64_are_counted_as_one_client(edge):
    """The server's login throttle (server/domain/login_throttle.py) behind the front end: guesses
    at one account from a new address of one /64 each time meet its wait after FREE_FAILURES, and
    the owner, from another /64, is not held up."""
    from server.domain import login_throttle

    def guess(client: str):
        front, api, _ = edge
        return api.post("/v1/auth/login", {"email": "owner64@example.com", "password": "a guess"},
                        headers={"X-Forwarded-For": front.forwarded("", client)})

    free = []
    for n in range(login_throttle.FREE_FAILURES):  # a third of a second apart: within the /64's bucket at Envoy
        free.append(guess(f"2001:db8:9:1::{n + 1:x}").status)
        time.sleep(0.35)
    assert free == [401] * login_throttle.FREE_FAILURES, free
    held = guess("2001:db8:9:1::ffff")
    assert held.status == 429 and held.json["details"][0]["reason"] == "LOGIN_THROTTLED", held.text
    assert guess("2001:db8:9:2::1").status == 401


def test_the_budget_of_bad_signatures_is_per_client_and_per_ipv6_64_behind_the_front_end(edge, keys_dir):
    """tests/faults/test_forged_tokens.py shows the bucket; here it is keyed by the client the front
    end names, an IPv6 client by its /64 (one host there has 2^64 addresses to rotate through)."""
    from tests.faults.test_forged_tokens import forged

    front, api, _ = edge

    def status(client: str, sent: str = "", kid: bool = True) -> int:
        return api.get("/v1/payments/pay_x", token=forged(keys_dir, kid=kid),
                       headers={"X-Forwarded-For": front.forwarded(sent, client)}).status

    # A bad signature without a key id empties its sender's bucket at once; it refills at one a
    # second, so what follows is sent within a second (or tried again on another /64).
    for net in range(0x10, 0x13):
        started = time.monotonic()
        assert status(f"2001:db8:5:{net:x}::1", sent="192.0.2.1", kid=False) == 401
        same = [status(f"2001:db8:5:{net:x}:ffff:ffff:ffff:fffe", sent="192.0.2.2"),
                status(f"2001:0db8:0005:{net:04x}:0:0:0:1")]  # the same /64, written in full
        if time.monotonic() - started < 0.9:
            break
    else:
        pytest.fail("three tries, and never four requests within a second")
    assert same == [429, 429], same
    assert status(f"2001:db8:5:{net + 0x100:x}::1") == 401  # another /64
    assert status(FLOODER) == 401 and status("2001:db8:5::1") == 401
