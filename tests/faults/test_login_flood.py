"""A login flood spread over hundreds of addresses, each within its own limit, leaves other
people's logins served.

Envoy limits sign-up, login and token requests per client address only (envoy.yaml, the route of
AuthService's Register and Login and TokenService's CreateToken: 10 at once, then 1 a second);
there is no bucket for the whole Envoy, which a handful of addresses could drain and so refuse
everyone else's logins. What bounds the hashing is the server's auth lane, which serves client
addresses in turn, so a stranger's login waits for at most one hash per address ahead of it, and
when full sheds first the calls of the address whose logins fail most, then the busiest's
(server/edge/capacity.py).

Here 200 addresses each log in at their bucket's rate (1 a second: 200 logins a second, more than
the lane's two threads hash) for 15 s, half of them over REST and half over native gRPC, every
other login with a wrong password, from processes of their own. Meanwhile someone new logs in
every second, each from an address nobody has used, and is served every time within DEADLINE;
/ready stays 200, and no flooder is refused by Envoy's rate limit. With 5 a second per address
(the bucket before) the same 200 addresses sent 1,000 logins a second, more than the server could
even shed, and Envoy's login breaker refused the stranger about once in 9-15 tries. How many
addresses one pod withstands, and what a client that logs in as often as a flooder meets:
envoy/README.md, "What is still open".
"""

from __future__ import annotations

import collections
import threading
import time

import pytest

from tests.faults.test_abuse import per_address_bucket
from tests.support import attacks, login_floods
from tests.support.bystander import DEADLINE
from tests.support.login_floods import BUSY, OK, RATE_LIMITED, WRONG

FLOODERS = 200
SECONDS = 15.0
ACCOUNTS = 10  # the flood's right passwords are these accounts' (one login throttle entry each per address)
PASSWORD = "a flooder's own password"
STRANGER_PASSWORD = "the stranger's password"
OVERFLOW_STATS = ("cluster.payments_auth.upstream_rq_pending_overflow", "cluster.payments_auth.upstream_rq_active_overflow")


def login_rate() -> float:
    """Logins a second the hashing calls' bucket refills per address."""
    bucket = per_address_bucket()
    return int(bucket["tokens_per_fill"]) / float(bucket["fill_interval"].rstrip("s"))


@pytest.mark.timeout(120)
def test_a_login_flood_from_hundreds_of_addresses_within_their_limits_leaves_a_strangers_login_served(edge):
    api = edge.api
    accounts = tuple((f"flooder-{i}@example.com", PASSWORD) for i in range(ACCOUNTS))
    for i, (email, password) in enumerate(accounts):  # each from an address of its own: no bucket is spent
        answer = api.from_address(f"127.75.0.{i + 1}").post("/v1/auth/register", {"email": email, "password": password})
        assert answer.status == 200, answer.text
    assert api.from_address("127.74.0.1").post("/v1/auth/register", {"email": "stranger@example.com",
                                                                      "password": STRANGER_PASSWORD}).status == 200
    strangers = iter(login_floods.addresses(74, 1000)[250:])  # 127.74.1.1 on: someone new each time
    rate = login_rate()
    plan = login_floods.Plan("127.0.0.1", edge.envoy.port, login_floods.addresses(73, FLOODERS), rate, SECONDS,
                             protocol="mixed", accounts=accounts)
    before = attacks.envoy_stats(edge.envoy, *OVERFLOW_STATS)

    stranger_logins: list[tuple[float, str]] = []
    readiness: collections.Counter = collections.Counter()
    stop = threading.Event()

    def stranger_logs_in(address: str) -> None:
        """One person's login, from an address nobody has used; and /ready from another address."""
        started = time.monotonic()
        try:
            answer = api.from_address(address).post("/v1/auth/login", {"email": "stranger@example.com",
                                                                       "password": STRANGER_PASSWORD})
            got = login_floods.rest_outcome(answer.status, answer.text.encode())
        except OSError as e:
            got = f"error {e}"
        stranger_logins.append((time.monotonic() - started, got))
        try:
            readiness[api.from_address("127.74.0.2").get("/ready").status] += 1
        except OSError as e:
            readiness[f"error {e}"] += 1

    def strangers_log_in() -> None:
        """Someone new logs in every second, whether or not the one before was answered."""
        threads = []
        while not stop.wait(max(0.0, 1.0 - (time.monotonic() - began) % 1.0)):
            threads.append(threading.Thread(target=stranger_logs_in, args=(next(strangers),), daemon=True))
            threads[-1].start()
        for thread in threads:
            thread.join(timeout=DEADLINE + 15)

    with login_floods.flood(plan) as flood:
        flood.wait_started()
        began = time.monotonic()
        thread = threading.Thread(target=strangers_log_in, name="strangers", daemon=True)
        thread.start()
        try:
            result = flood.result()
        finally:
            stop.set()
            thread.join(timeout=DEADLINE + 20)
    took = time.monotonic() - began
    after = attacks.envoy_stats(edge.envoy, *OVERFLOW_STATS)
    overflowed = sum(after.get(k, 0) - before.get(k, 0) for k in OVERFLOW_STATS)
    waits = [s for s, _ in stranger_logins]
    print(f"\nflood: {FLOODERS} addresses at {rate:g} login/s each for {SECONDS:.0f} s (the flood and its answers "
          f"{took:.1f} s): {result}; Envoy's login breaker overflowed {overflowed} times")
    print(f"stranger: {len(stranger_logins)} logins: {dict(collections.Counter(g for _, g in stranger_logins))}; "
          f"p50 {attacks.median(waits):.2f} s, max {max(waits, default=0):.2f} s; /ready {dict(readiness)}")

    assert len(stranger_logins) >= SECONDS - 2
    refused = [(round(s, 2), got) for s, got in stranger_logins if got != OK or s > DEADLINE]
    assert not refused, f"the stranger's logins refused or slow during the flood: {refused}"
    assert set(readiness) == {200}, dict(readiness)
    assert edge.api.get("/ready").status == 200
    # Every flooder stayed within its own bucket (no bucket is shared, none is per Envoy), so none
    # of its logins was refused by Envoy's rate limit.
    assert result.outcomes[RATE_LIMITED] == 0, dict(result.outcomes)
    assert result.calls == FLOODERS * int(rate * SECONDS), result.calls
    # The flood was more than the lane hashes, so the server shed some of it, and every call was
    # answered (right passwords served, wrong ones refused), none left to time out.
    assert result.outcomes[BUSY] > 0 and result.outcomes[OK] > 0 and result.outcomes[WRONG] > 0, dict(result.outcomes)
    assert result.outcomes["timeout"] == 0, dict(result.outcomes)
