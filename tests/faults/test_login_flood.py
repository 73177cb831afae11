"""A login flood spread over many addresses, each within its own limit, leaves a stranger's login
served.

Envoy limits sign-up and login per client address only (envoy.yaml, the AuthService route): there
is no bucket for the whole Envoy, which a handful of addresses could drain and so refuse everyone
else's logins. What bounds the hashing is the server's auth lane, which serves client addresses in
turn (server/edge/admission.py), so a stranger's login waits for at most one hash per address
ahead of it. Here ten addresses each log in 5 times a second (their bucket's rate) for 15 s,
with right and wrong passwords, and a login from an address none of them uses succeeds every
second, within 5 s each time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import uuid

import pytest

from tests.support import attacks
from tests.support.bystander import DEADLINE

FLOODERS = 10
RATE = 5  # logins a second from each flooding address: its bucket's refill rate
SECONDS = 15.0
PASSWORD = "a flooder's own password"
STRANGER_PASSWORD = "the stranger's password"


def outcome(answer) -> str:
    if answer.status in (200, 401):
        return str(answer.status)
    try:
        return f"{answer.status} {answer.error()[1]}"
    except (AssertionError, ValueError):
        return f"{answer.status} {answer.text[:80]}"


@pytest.mark.timeout(120)
def test_a_login_flood_from_many_addresses_within_their_limits_leaves_a_strangers_login_served(edge):
    api = edge.api
    flooders = [f"127.73.0.{i}" for i in range(1, FLOODERS + 1)]
    stranger = api.from_address("127.74.0.1")
    for address in flooders:
        answer = api.from_address(address).post("/v1/auth/register", {"email": f"flooder-{address}@example.com",
                                                                      "password": PASSWORD})
        assert answer.status == 200, answer.text
    assert stranger.post("/v1/auth/register", {"email": "stranger@example.com",
                                               "password": STRANGER_PASSWORD}).status == 200
    time.sleep(1.0)  # the sign-ups' tokens come back to each bucket

    flood: collections.Counter = collections.Counter()
    flood_latencies: list[float] = []
    lock = threading.Lock()

    def login(address: str, n: int) -> None:
        # Right and wrong passwords in turn; a wrong one for an unknown email each time, so the
        # per-account throttle (no hash) never answers instead of the server's hashing.
        body = ({"email": f"flooder-{address}@example.com", "password": PASSWORD} if n % 2 == 0 else
                {"email": f"nobody-{uuid.uuid4().hex[:12]}@example.com", "password": "not the password"})
        started = time.monotonic()
        try:
            got = outcome(api.from_address(address).post("/v1/auth/login", body))
        except OSError as e:
            got = f"error {e}"
        with lock:
            flood[got] += 1
            flood_latencies.append(time.monotonic() - started)

    stop = threading.Event()

    def pace(pool: concurrent.futures.Executor) -> None:
        """Every flooder at RATE a second, whether or not its earlier logins were answered."""
        start = time.monotonic()
        for n in range(int(RATE * SECONDS)):
            for i, address in enumerate(flooders):
                at = start + n / RATE + i / (RATE * FLOODERS)
                if stop.wait(max(0.0, at - time.monotonic())):
                    return
                pool.submit(login, address, n)

    stranger_logins: list[tuple[float, str]] = []
    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        pacer = threading.Thread(target=pace, args=(pool,), daemon=True)
        pacer.start()
        time.sleep(1.0)  # the flood is on
        try:
            while pacer.is_alive():
                started = time.monotonic()
                try:
                    got = outcome(stranger.post("/v1/auth/login", {"email": "stranger@example.com",
                                                                   "password": STRANGER_PASSWORD}))
                except OSError as e:
                    got = f"error {e}"
                stranger_logins.append((time.monotonic() - started, got))
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        finally:
            stop.set()
            pacer.join(timeout=10)
    waits = [s for s, _ in stranger_logins]
    print(f"\nflood: {sum(flood.values())} logins from {FLOODERS} addresses in {SECONDS:.0f} s: {dict(flood)}; "
          f"p50 {attacks.median(flood_latencies):.2f} s, max {max(flood_latencies, default=0):.2f} s")
    print(f"stranger: {len(stranger_logins)} logins: {dict(collections.Counter(g for _, g in stranger_logins))}; "
          f"p50 {attacks.median(waits):.2f} s, max {max(waits, default=0):.2f} s")
    assert len(stranger_logins) >= SECONDS - 3
    refused = [(round(s, 2), got) for s, got in stranger_logins if got != "200" or s > DEADLINE]
    assert not refused, f"the stranger's logins refused or slow during the flood: {refused}"
    # Within their own buckets, the flooders were never rate limited: no bucket is shared.
    assert not [k for k in flood if "RATE_LIMITED" in k], dict(flood)
    assert edge.api.get("/ready").status == 200
