"""Login abuse: a flood from one address, and guessing against one account.

Envoy limits sign-up, login and token requests per client address (envoy.yaml, local_ratelimit on
the route of AuthService's Register and Login and TokenService's CreateToken, which REST and native
gRPC calls both end on: one bucket for the three), before the server spends a password hash;
Refresh and Logout, which hash nothing, have a looser bucket of their own. The server slows failed
logins per email (server/domain/login_throttle.py). Payment calls have no such limit and keep
working. Clients are told apart by their address: each test client binds an address of its own in
127.0.0.0/8.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
import yaml

from server.domain import login_throttle
from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from tests.conftest import ALICE
from devstack.envoyconf import CONFIG
from tests.support import attacks
from tests.support.rest import loopback_address

RESOURCE_EXHAUSTED = 8
PASSWORD = "correct horse battery"
HASHING = ("/payments.v1.AuthService/Register", "/payments.v1.AuthService/Login",
           "/payments.v1.TokenService/CreateToken")  # what REST sign-up, login and /oauth2/token become
SESSIONS = ("/payments.v1.AuthService/Refresh", "/payments.v1.AuthService/Logout")


def route_limits(path: str) -> dict:
    """The rate limit envoy.yaml gives the route a gRPC path (or a REST call transcoded to it) takes."""
    route = attacks.configured_route(path)[1]
    assert route["route"]["cluster"] == "payments_auth", path
    return route["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]


def auth_limits() -> dict:
    """The rate limit of sign-up, login and token requests (one route for the three)."""
    return route_limits(HASHING[1])


PER_CLIENT = {"v4_prefix_mask_len": 32, "v6_prefix_mask_len": 64}  # an IPv6 client is its /64


def bucket(limits: dict) -> dict:
    [descriptor] = limits["descriptors"]
    assert descriptor["entries"] == [{"key": "masked_remote_address"}]
    return descriptor["token_bucket"]


def per_address_bucket() -> dict:
    """The hashing calls' per-address bucket (max_tokens at once, tokens_per_fill each fill_interval)."""
    return bucket(auth_limits())


def refill_rate(token_bucket: dict) -> float:
    """Tokens a second."""
    return int(token_bucket["tokens_per_fill"]) / float(token_bucket["fill_interval"].rstrip("s"))


def test_the_calls_that_hash_share_one_tight_bucket_and_refresh_and_logout_have_a_looser_one():
    """Register, Login and CreateToken take one route, so an address spends one bucket on them
    all: 10 at once, then 1 a second. Refresh and Logout hash nothing and are what every signed-in
    client behind one address (a NAT) sends: 20 at once, then 5 a second, a bucket of their own."""
    config, hashing = attacks.configured_route(HASHING[0])
    assert all(attacks.configured_route(path)[1] == hashing for path in HASHING)
    assert bucket(route_limits(HASHING[0])) == {"max_tokens": 10, "tokens_per_fill": 1, "fill_interval": "1s"}
    _, sessions = attacks.configured_route(SESSIONS[0])
    assert sessions != hashing and attacks.configured_route(SESSIONS[1])[1] == sessions
    assert bucket(route_limits(SESSIONS[0])) == {"max_tokens": 20, "tokens_per_fill": 5, "fill_interval": "1s"}
    assert route_limits(SESSIONS[0])["stat_prefix"] != route_limits(HASHING[0])["stat_prefix"]


def test_every_per_address_limit_counts_an_ipv6_client_by_its_64():
    """Every Envoy variant's per-address buckets (every request, sign-up/login/token, refresh/logout,
    public health, Watch) key an IPv6 client by its /64: by the full address, one host rotated
    through 2^64 buckets."""
    def limits(node):
        if isinstance(node, dict):
            if "rate_limits" in node:
                yield node
            for value in node.values():
                yield from limits(value)
        elif isinstance(node, list):
            for value in node:
                yield from limits(value)

    for variant in sorted(CONFIG.parent.glob("envoy*.yaml")):
        by_address = {id(limit): limit for limit in limits(yaml.safe_load(variant.read_text()))  # aliases once
                      if any("address" in key for rule in limit["rate_limits"] for a in rule["actions"] for key in a)}
        assert len(by_address) == 5, variant.name  # every request, sign-up/login/token, refresh/logout, health, Watch
        for limit in by_address.values():
            assert limit["rate_limits"] == [{"actions": [{"masked_remote_address": PER_CLIENT}]}], variant.name
            assert [d["entries"] for d in limit["descriptors"]] == [[{"key": "masked_remote_address"}]], variant.name


def test_no_bucket_for_the_whole_envoy_that_a_few_addresses_could_drain():
    """A per-Envoy login bucket (50/s) was drained by ten addresses within their own buckets, and
    a stranger's logins were refused: the only login buckets are per address (test_login_flood.py
    shows the stranger served while 200 addresses flood)."""
    for path in HASHING + SESSIONS:
        limits = route_limits(path)
        assert not limits.get("always_consume_default_token_bucket")
        assert int(limits["token_bucket"]["tokens_per_fill"]) >= 100_000  # the default bucket: never the one that binds
        assert limits["rate_limits"] == [{"actions": [{"masked_remote_address": PER_CLIENT}]}]


def register(api, email: str) -> None:
    r = api.from_address(loopback_address()).post("/v1/auth/register", {"email": email, "password": PASSWORD})
    assert r.status == 200, r.text


def test_a_flood_from_one_address_leaves_other_clients_logging_in_promptly(edge, token_for):
    burst = int(per_address_bucket()["max_tokens"])
    flood = 10 * burst
    api, flooder = edge.api, edge.api.from_address("127.66.66.66")
    register(api, "patient@example.com")
    token = token_for(ALICE)
    created = api.post("/v1/payments", {"email": ALICE.email, "amount": "1250"}, token=token)
    assert created.status == 200, created.text

    def bad_login(n: int):
        return flooder.post("/v1/auth/login", {"email": f"nobody{n}@example.com", "password": "not the password"})

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = pool.map(bad_login, range(flood))
        time.sleep(0.3)  # the flood is on
        # Another client, during the flood: its login is answered at once, and payments work.
        started = time.monotonic()
        other = api.from_address(loopback_address()).post("/v1/auth/login", {"email": "patient@example.com",
                                                                             "password": PASSWORD})
        took = time.monotonic() - started
        got = api.get(f"/v1/payments/{created.json['id']}", token=token)
        answers = list(answers)
    assert other.status == 200, other.text
    assert took < 2.0, f"a login from another address took {took:.1f} s during the flood"
    assert got.status == 200, got.text

    statuses = [a.status for a in answers]
    assert set(statuses) <= {401, 429}, statuses
    limited = [a for a in answers if a.status == 429]
    # The flooder got about its burst (plus what refilled meanwhile), the rest was refused.
    assert statuses.count(401) <= burst + refill_rate(per_address_bucket()) * 10, statuses.count(401)
    for answer in limited[:5]:
        code, reason, body = answer.error()
        assert (code, reason) == (RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert answer.headers.get("retry-after") == "1"

    # The limit is a rate, not a ban: the flooder is answered again once its bucket refills.
    deadline = time.monotonic() + 30
    while (r := bad_login(flood)).status == 429:
        assert time.monotonic() < deadline, "logins still limited 30 s after the flood"
        time.sleep(0.3)
    assert r.status == 401


def test_an_address_that_spent_its_login_bucket_cannot_sign_up_or_get_a_token_but_can_refresh(edge):
    """After the transcoder (and the Lua filter, for /oauth2/token), REST sign-up, login and token
    requests end on the one route: an address whose logins emptied the bucket is refused a sign-up
    and a token too (429 RATE_LIMITED; the token endpoint's slow_down), and not a refresh, whose
    bucket is its own."""
    flooder = edge.api.from_address(loopback_address())
    burst = int(per_address_bucket()["max_tokens"])

    def emptied() -> None:
        """Logins until Envoy refuses one: the bucket is empty, for up to a second (its refill)."""
        for n in range(10 * burst):
            answer = flooder.post("/v1/auth/login", {"email": f"nobody{n}@example.com", "password": "not the password"})
            if answer.status == 429 and answer.error()[1] == "RATE_LIMITED":
                return
            assert answer.status == 401, answer.text
        pytest.fail("the logins never emptied the bucket")

    def sign_up():
        answer = flooder.post("/v1/auth/register", {"email": f"new-{time.monotonic_ns()}@example.com",
                                                     "password": PASSWORD})
        if answer.status == 429 and answer.error()[1] == "RATE_LIMITED":
            assert answer.headers.get("retry-after") == "1", answer.headers
            return "limited"
        return answer.status

    def token():
        answer = flooder.request("POST", "/oauth2/token", raw=b"grant_type=client_credentials&client_id=cli_x"
                                 b"&client_secret=pmt_cs_x", headers={"Content-Type": "application/x-www-form-urlencoded"})
        if (answer.status, answer.json.get("error")) == (429, "slow_down"):
            assert answer.headers.get("retry-after") == "1", answer.headers
            return "limited"
        return answer.status

    def refresh():
        return flooder.post("/v1/auth/refresh", {"refresh_token": "rt_nobody_issued_this"}).status

    # Each probe right after the bucket was seen empty; a refill can come between (one a second),
    # so each gets three tries. A refresh is never refused by the login bucket.
    for probe, limited in ((sign_up, "limited"), (token, "limited")):
        got = []
        for _ in range(3):
            emptied()
            got.append(probe())
            assert refresh() == 401
            if got[-1] == limited:
                break
        assert got[-1] == limited, (probe.__name__, got)


def test_guessing_one_accounts_password_slows_the_guesser_without_holding_up_the_owner(edge):
    """The throttle counts per email and client address (server/domain/login_throttle.py): a guesser
    is slowed, the owner from elsewhere never is."""
    email = "guessed@example.com"
    register(edge.api, email)
    guesser = edge.api.from_address(loopback_address())

    def attempt(password: str):  # every guess from one address
        return guesser.post("/v1/auth/login", {"email": email, "password": password})

    # Every guess within the guesser's bucket at Envoy (10 at once, then 1 a second), so that each
    # reaches the server, whose throttle this is about: the free guesses half a second apart leave
    # tokens for 2 quick ones.
    statuses = []
    for i in range(login_throttle.FREE_FAILURES):
        statuses.append(attempt(f"guess number {i}").status)
        time.sleep(0.5)
    assert statuses == [401] * login_throttle.FREE_FAILURES
    refused = [attempt(f"guess number {i}x") for i in range(2)]
    assert {r.status for r in refused} == {429}  # then every quick guess is refused, costing no hash
    code, reason, body = refused[0].error()
    assert (code, reason) == (RESOURCE_EXHAUSTED, "LOGIN_THROTTLED")
    wait = int(refused[-1].headers["retry-after"])
    assert 1 <= wait <= login_throttle.MAX_DELAY_SECONDS
    # The owner, from another address, is not held up at all while the guesser waits.
    owner = edge.api.from_address(loopback_address())
    assert owner.post("/v1/auth/login", {"email": email, "password": PASSWORD}).status == 200
    # The guesser waits that long, and no longer: then the right password works from there too.
    time.sleep(wait + 0.2)
    assert attempt(PASSWORD).status == 200
    time.sleep(1.0)  # a token back in the guesser's bucket at Envoy
    assert attempt("wrong again, but the count was reset").status == 401


def test_native_grpc_logins_share_the_limit(edge):
    """Both protocols end on the same route, so switching protocol does not double the rate."""
    burst = int(per_address_bucket()["max_tokens"])
    with grpc.insecure_channel(f"127.0.0.1:{edge.envoy.port}") as channel:
        login = pb_grpc.AuthServiceStub(channel).Login
        futures = [login.future(pb.LoginRequest(email=f"nobody{i}@example.com", password="not the password"),
                                timeout=60) for i in range(3 * burst)]  # all in flight at once
        codes = []
        for f in futures:
            with pytest.raises(grpc.RpcError) as e:
                f.result()
            codes.append(e.value.code())
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes


def test_more_logins_at_once_than_the_server_hashes_are_refused_at_once_as_busy(edge):
    """From many addresses, so no rate limit applies: the server's auth lane admits its hashing
    threads' worth and 32 more waiting, and the rest are answered 429 SERVER_BUSY at once, JSON,
    with retry-after."""
    addresses = [loopback_address() for _ in range(90)]

    def login(address: str):
        return edge.api.from_address(address).post("/v1/auth/login", {"email": f"busy-{address}@example.com",
                                                                       "password": "not the password"})

    with concurrent.futures.ThreadPoolExecutor(len(addresses)) as pool:
        answers = list(pool.map(login, addresses))
    statuses = [a.status for a in answers]
    assert set(statuses) <= {401, 429}, statuses
    busy = [a for a in answers if a.status == 429]
    assert busy, "every login was admitted at once"
    for answer in busy[:5]:
        code, reason, _ = answer.error()
        assert (code, reason) == (RESOURCE_EXHAUSTED, "SERVER_BUSY")
        assert answer.headers.get("retry-after") == "1"


def test_token_requests_the_server_sheds_in_a_login_flood_are_503_to_retry(edge):
    """The server's own shedding (its sign-up/login/token lane full: SERVER_BUSY) reaches
    /oauth2/token as 503 temporarily_unavailable with Retry-After, never 400 invalid_request: a
    valid request an OAuth client would otherwise not retry. Logins from 90 addresses fill the lane
    while 40 token requests arrive; rounds repeat until some token request was shed."""
    import json
    import subprocess

    from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD

    admin = edge.api.from_address(loopback_address()).post("/v1/auth/login", {"email": ADMIN_EMAIL,
                                                                              "password": ADMIN_PASSWORD})
    made = edge.api.post("/v1/clients", {"name": "shop", "permissions": ["payments.read"]},
                         token=admin.json["access_token"]).json
    form = f"grant_type=client_credentials&client_id={made['client']['id']}&client_secret={made['secret']}"

    def token(_):
        out = subprocess.run(["curl", "-s", "-i", "--max-time", "30", "--interface", loopback_address(),
                              "--data-binary", form, edge.envoy.url + "/oauth2/token"],
                             capture_output=True, text=True, timeout=60)
        head, _, body = out.stdout.partition("\n\n")
        lines = head.split("\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, json.loads(body)

    def login(address: str):
        return edge.api.from_address(address).post("/v1/auth/login", {"email": f"shed-{address}@example.com",
                                                                       "password": "not the password"})

    shed = []
    for _ in range(5):
        with concurrent.futures.ThreadPoolExecutor(130) as pool:
            logins = [pool.submit(login, loopback_address()) for _ in range(90)]
            tokens = list(pool.map(token, range(40)))
            [f.result() for f in logins]
        for status, headers, body in tokens:
            assert status in (200, 503), (status, body)
            if status == 503:
                assert body["error"] == "temporarily_unavailable" and int(headers["retry-after"]) >= 1, body
                shed.append(body)
        if shed:
            break
        time.sleep(1.0)
    assert shed, "no token request was shed in five rounds: the flood did not fill the lane"
