"""Forged tokens: a bearer token whose signature does not verify costs Envoy an ES256 verification
that no cache skips (jwt_authn remembers only tokens that verified). envoy/envoy.yaml's Lua filter
keeps a bucket of bad signatures per client address (an IPv6 address's /64:
tests/e2e/test_proxied_edge.py): BAD_SIGNATURES at once, refilled at BAD_SIGNATURES_PER_SECOND. With
it empty, every request of that address that carries an Authorization header, however written, gets
429 TOO_MANY_BAD_TOKENS (gRPC: RESOURCE_EXHAUSTED) with Retry-After, its token never looked at. A bad
signature on a token that names no key id (checked against every key) empties the bucket at once.
Tokens that fail for any other reason (expired, unknown key, another audience) never count: a client
whose token ran out is never refused here. A token over 4 KiB is refused before it is parsed.
Envoy's `jwt_authn.denied` counter says how many tokens were checked and refused, so it shows
that a refused address costs no verification.

Last, the flood the attack run measured: 50 addresses sending forged tokens as fast as they are
answered, Envoy held to the pod's CPU limit (k8s/base: 250m for the envoy container) as a cgroup
quota, while a customer reads a payment every 100 ms."""

from __future__ import annotations

import json
import re
import statistics
import time
import uuid
from pathlib import Path

import grpc
import pytest

from server.edge.pb import payments_pb2 as pb
from tests.conftest import ALICE
from tests.faults.conftest import payment_stub
from tests.support import attacks, jwt_attacks
from tests.support.cpu_quota import cpu_quota, pod_cpu_limit, throttled
from tests.support.loops import paced_reads, run_for
from tests.support.deploy import ROOT
from tests.support.rest import Client, loopback_address
from tests.support.stack import Envoy, Server, prepare_workdir

ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
RESOURCE_EXHAUSTED, UNAUTHENTICATED = 8, 16


def budget() -> tuple[int, int]:
    """(BAD_SIGNATURES, BAD_SIGNATURES_PER_SECOND) as envoy.yaml's Lua filter sets them."""
    found = re.search(r"local BAD_SIGNATURES, BAD_SIGNATURES_PER_SECOND, BAD_ADDRESSES = (\d+), (\d+), (\d+)",
                      ENVOY_YAML.read_text())
    assert found, "the Lua filter's bucket of bad signatures is gone from envoy.yaml"
    return int(found[1]), int(found[2])


def token_bytes() -> int:
    found = re.search(r"local TOKEN_BYTES = (\d+)", ENVOY_YAML.read_text())
    assert found
    return int(found[1])


def forged(keys: Path, kid: bool = True, **claims) -> str:
    """A well-formed token with this deployment's key id (or none), signed by a key that is not its own."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    stranger = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    payload = jwt_attacks.claims(jti=uuid.uuid4().hex, **claims)
    if kid:
        return jwt_attacks.sign(stranger, payload, kid=json.loads((keys / "jwks.json").read_text())["keys"][0]["kid"])
    import jwt

    return jwt.encode(payload, serialization.load_pem_private_key(stranger, None), algorithm="ES256",
                      headers={"typ": "at+jwt"})


def exhaust(client: Client, keys: Path, path: str, limit: int) -> None:
    """Spend an address's bucket: `limit` bad signatures, each checked (401), then a refusal."""
    for _ in range(limit):
        answer = client.get(path, token=forged(keys))
        assert (answer.status, *reason(answer)) == (401, UNAUTHENTICATED, "INVALID_TOKEN"), answer.text
    answer = client.get(path, token=forged(keys))
    assert (answer.status, *reason(answer)) == (429, RESOURCE_EXHAUSTED, "TOO_MANY_BAD_TOKENS"), answer.text


def denied(envoy: Envoy) -> int:
    """Tokens jwt_authn checked and refused so far (each forged one a verification)."""
    [count] = attacks.envoy_stats(envoy, "jwt_authn.denied").values()
    return count


def reason(answer) -> tuple[int, str]:
    code, why, _ = answer.error()
    return code, why


@pytest.fixture(scope="module")
def payment(edge, token_for):
    created = edge.api.post("/v1/payments", {"email": ALICE.email, "amount": "1250"}, token=token_for(ALICE))
    assert created.status == 200, created.text
    return created.json["id"]


def test_an_address_past_its_budget_of_bad_signatures_is_refused_without_a_verification(edge, keys_dir, token_for, payment):
    limit, per_second = budget()
    attacker, other = edge.api.from_address(loopback_address()), edge.api.from_address(loopback_address())
    path = f"/v1/payments/{payment}"
    started = denied(edge.envoy)
    exhaust(attacker, keys_dir, path, limit)
    assert denied(edge.envoy) == started + limit
    for _ in range(3 * limit):
        answer = attacker.get(path, token=forged(keys_dir))
        assert (answer.status, *reason(answer)) == (429, RESOURCE_EXHAUSTED, "TOO_MANY_BAD_TOKENS"), answer.text
        assert 1 <= int(answer.headers["retry-after"]) <= -(-1 // per_second)
    # However the header is written: jwt_authn finds "Bearer " anywhere in its values.
    for headers in ({"Authorization": f"xBearer {forged(keys_dir)}"}, {"Authorization": f"Basic Bearer {forged(keys_dir)}"},
                    {"Authorization": f"junk, Bearer {forged(keys_dir)}"}, {"authorization": f"bearer {forged(keys_dir)}"}):
        answer = attacker.get(path, headers=headers)
        assert (answer.status, *reason(answer)) == (429, RESOURCE_EXHAUSTED, "TOO_MANY_BAD_TOKENS"), (headers, answer.text)
    assert denied(edge.envoy) == started + limit  # nothing more was verified
    # The address is refused whatever token it sends while its bucket is empty (shared addresses
    # share the bucket: envoy/README.md).
    assert attacker.get(path, token=token_for(ALICE)).status == 429
    # Another address is served, and has a bucket of its own.
    assert other.get(path, token=token_for(ALICE)).status == 200
    answer = other.get(path, token=forged(keys_dir))
    assert (answer.status, *reason(answer)) == (401, UNAUTHENTICATED, "INVALID_TOKEN")
    # Requests that carry no Authorization header are not refused by it: a login from that address goes on.
    login = attacker.post("/v1/auth/login", {"email": "nobody@example.com", "password": "not the password"})
    assert login.status == 401, login.text


def test_a_bad_signature_without_a_key_id_empties_the_bucket_at_once(edge, keys_dir, payment):
    """jwt_authn checks a token that names no key id against every key of the JWKS."""
    attacker, path = edge.api.from_address(loopback_address()), f"/v1/payments/{payment}"
    answer = attacker.get(path, token=forged(keys_dir, kid=False))
    assert (answer.status, *reason(answer)) == (401, UNAUTHENTICATED, "INVALID_TOKEN"), answer.text
    answer = attacker.get(path, token=forged(keys_dir))
    assert (answer.status, *reason(answer)) == (429, RESOURCE_EXHAUSTED, "TOO_MANY_BAD_TOKENS"), answer.text


@pytest.mark.parametrize("how", ["junk before it", "an escaped key named like kid"])
def test_a_token_without_a_key_id_is_found_however_it_is_dressed(edge, keys_dir, payment, how):
    """jwt_authn takes the token from the first "Bearer " on, skipping what cannot start one, and
    reads the JOSE header's top-level keys only."""
    attacker, path = edge.api.from_address(loopback_address()), f"/v1/payments/{payment}"
    if how == "junk before it":
        headers = {"Authorization": f"Bearer ~{forged(keys_dir, kid=False)}"}
    else:
        import base64

        token = forged(keys_dir, kid=False)
        jose = base64.urlsafe_b64encode(b'{"alg":"ES256","a\\"kid":"x","typ":"at+jwt"}').rstrip(b"=").decode()
        headers = {"Authorization": "Bearer " + ".".join([jose, *token.split(".")[1:]])}
    before = denied(edge.envoy)
    first = attacker.get(path, headers=headers)
    assert first.status == 401 and denied(edge.envoy) == before + 1, first.text  # one check: every key
    answer = attacker.get(path, token=forged(keys_dir))
    assert (answer.status, *reason(answer)) == (429, RESOURCE_EXHAUSTED, "TOO_MANY_BAD_TOKENS"), answer.text


def test_long_tokens_that_fail_take_from_the_bucket_by_their_length(edge, keys_dir, payment):
    """Reading a token costs by its length, whatever then fails: an expired 3 KB token takes three
    from the bucket; this API's own (~500 bytes) take none (the test above: 40 expired in a row)."""
    limit, _ = budget()
    attacker, path = edge.api.from_address(loopback_address()), f"/v1/payments/{payment}"
    long_expired = jwt_attacks.sign((keys_dir / "jwt-private.pem").read_bytes(),
                                    jwt_attacks.claims(iat=1, nbf=1, exp=2, filler="x" * 2300))
    assert 3 * 1024 <= len("Bearer " + long_expired) < 4 * 1024
    statuses = [attacker.get(path, token=long_expired).status for _ in range(limit // 3 + 3)]
    assert statuses[:limit // 3] == [401] * (limit // 3) and statuses[-1] == 429, statuses


def test_a_token_too_long_to_be_one_is_refused_before_it_is_read(edge, keys_dir, payment):
    """Parsing a token costs Envoy by its length (an 11 KB expired token cost twice a forged one)."""
    client, before = edge.api.from_address(loopback_address()), denied(edge.envoy)
    token = forged(keys_dir, filler="x" * token_bytes())
    answer = client.get(f"/v1/payments/{payment}", token=token)
    code, why, body = answer.error()
    assert (answer.status, code, why) == (401, UNAUTHENTICATED, "INVALID_TOKEN") and "too long" in body["message"], answer.text
    assert denied(edge.envoy) == before  # jwt_authn never saw it


def test_tokens_that_fail_without_a_signature_check_never_use_the_budget(edge, keys_dir, token_for, payment):
    limit, _ = budget()
    client = edge.api.from_address(loopback_address())
    stale = jwt_attacks.attacks((keys_dir / "jwt-private.pem").read_bytes(), json.loads((keys_dir / "jwks.json").read_text()))
    for name, status in [("expired", 401), ("unknown_kid", 401), ("wrong_aud", 403), ("garbage", 401), ("alg_none", 401)]:
        for _ in range(2 * limit):
            answer = client.get(f"/v1/payments/{payment}", token=stale[name])
            assert answer.status == status, (name, answer.text)
    # A client whose token ran out, after many tries with it, is served with its new one.
    assert client.get(f"/v1/payments/{payment}", token=token_for(ALICE)).status == 200


def test_the_bucket_refills_at_its_rate(edge, keys_dir, payment):
    limit, per_second = budget()
    attacker, path = edge.api.from_address(loopback_address()), f"/v1/payments/{payment}"
    exhaust(attacker, keys_dir, path, limit)
    wait = int(attacker.get(path, token=forged(keys_dir)).headers["retry-after"])
    time.sleep(wait + 0.2)
    answer = attacker.get(path, token=forged(keys_dir))
    assert (answer.status, *reason(answer)) == (401, UNAUTHENTICATED, "INVALID_TOKEN"), answer.text  # one refilled
    answer = attacker.get(path, token=forged(keys_dir))
    assert answer.status == 429, answer.text  # and spent


def test_a_grpc_client_past_its_budget_gets_resource_exhausted_with_retry_after(edge, keys_dir, payment):
    """Native gRPC through Envoy, from 127.0.0.1 (this module's other tests use addresses of their
    own); over HTTP/2 a request may also carry the header twice, and jwt_authn reads both."""
    limit, per_second = budget()
    channel, stub = payment_stub(edge.envoy.url.removeprefix("http://"))
    codes = []
    with channel:
        for _ in range(limit + 2):
            try:
                stub.GetPayment(pb.GetPaymentRequest(id=payment), timeout=5,
                                metadata=[("authorization", f"Bearer {forged(keys_dir)}")])
            except grpc.RpcError as e:
                codes.append(e.code())
                trailing = dict(e.trailing_metadata() or ())
        before = denied(edge.envoy)
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetPayment(pb.GetPaymentRequest(id=payment), timeout=5,
                            metadata=[("authorization", "Basic abc"), ("authorization", f"Bearer {forged(keys_dir)}")])
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * limit + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, codes
    assert 1 <= int(trailing["retry-after"]) <= -(-1 // per_second)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert denied(edge.envoy) == before


# The flood at the pod's CPU limit.

FLOODERS = 50
FLOOD_SECONDS = 8


@pytest.fixture
def envoy_quota():
    with cpu_quota(pod_cpu_limit("envoy")) as group:
        yield group


def test_a_forged_token_flood_from_many_addresses_leaves_customers_served_at_envoys_cpu_limit(tmp_path, keys_dir, token_for, envoy_quota):
    limit, per_second = budget()
    prepare_workdir(tmp_path, keys_dir)
    server = Server.start(tmp_path)
    try:
        envoy = Envoy.start(tmp_path, server.port)
        try:
            (envoy_quota / "cgroup.procs").write_text(str(envoy.proc.pid))  # every thread of Envoy
            flood(envoy, keys_dir, token_for, envoy_quota, limit, per_second)
        finally:
            envoy.stop()
    finally:
        server.stop()


def flood(envoy: Envoy, keys: Path, token_for, quota: Path, limit: int, per_second: int) -> None:
    api = Client(envoy.url)
    me, token = api.from_address(loopback_address()), token_for(ALICE)
    payment = me.post("/v1/payments", {"email": ALICE.email, "amount": "1250"}, token=token).json["id"]
    tokens = [forged(keys) for _ in range(20)]
    throttled_before, denied_before = throttled(quota), denied(envoy)
    answers: list[int] = []
    reads: list[tuple[int, float]] = []

    def attack(stop):
        client, n = api.from_address(loopback_address()), 0
        while not stop.is_set():
            answers.append(client.get(f"/v1/payments/{payment}", token=tokens[n % len(tokens)]).status)
            n += 1

    seconds = run_for(FLOOD_SECONDS, [attack] * FLOODERS + [paced_reads(me, f"/v1/payments/{payment}", token, reads)])

    verified, refused = answers.count(401), answers.count(429)
    latencies = sorted(seconds for _, seconds in reads)
    print(f"forged-token flood: {verified} verified, {refused} refused; the customer's reads: median {statistics.median(latencies) * 1000:.0f} ms, slowest {latencies[-1] * 1000:.0f} ms")
    assert set(answers) <= {401, 429}, set(answers)
    assert refused > 3 * verified, (verified, refused)  # the flood was real, and mostly refused unverified
    assert denied(envoy) - denied_before == verified <= FLOODERS * (limit + per_second * seconds)
    assert throttled(quota) > throttled_before, "the quota never bit: the test did not reproduce the limit"
    assert {status for status, _ in reads} == {200}, reads
    assert len(reads) >= FLOOD_SECONDS  # the customer kept reading
    assert latencies[-1] < 5.0 and statistics.median(latencies) < 0.5, (statistics.median(latencies), latencies[-5:])
