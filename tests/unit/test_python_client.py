"""clients/python's policy against a real gRPC server on loopback (the client's own generated
servicers, scripted per test): the token is fetched once, cached, renewed before it expires and
kept through a failed renewal while it is valid; every call carries a deadline; a create is
retried only on the codes payments_client.retry names, always with the request_id of its first
attempt; other calls are not; and every failure is a typed error with the ErrorInfo reason.
Time is a clock the test moves; the deadlines are real."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time
import tomllib
from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from hypothesis import given, settings, strategies as st

from tests.support.python_client import ROOT, generated_copy, import_from, shared_copy


# gRPC sends a deadline as a timeout rounded up, so the server may see a few ms more than was set.
SLACK = 0.05


@pytest.fixture(scope="module")
def copy_dir(tmp_path_factory):
    return shared_copy(tmp_path_factory)


@pytest.fixture(scope="module")
def pc(copy_dir):
    return import_from(copy_dir)


@pytest.fixture(scope="module")
def pb(pc):
    from payments_client._pb import payments_pb2, payments_pb2_grpc

    return payments_pb2, payments_pb2_grpc


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(code: grpc.StatusCode, reason: str, message: str = "refused", retry_after: float | None = None,
            fields: tuple = ()) -> grpc.Status:
    """What the service's edge/status.py sends: a google.rpc.Status with ErrorInfo (and RetryInfo,
    BadRequest), in grpc-status-details-bin."""
    details = [error_details_pb2.ErrorInfo(reason=reason, domain="payments.v1", metadata={"k": "v"})]
    if retry_after is not None:
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(retry_after),
                                                                                       nanos=int(retry_after % 1 * 1e9))))
    if fields:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in fields]))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)

    @dataclasses.dataclass
    class _Status(grpc.Status):
        code: grpc.StatusCode
        details: str
        trailing_metadata: tuple

    return _Status(code, message, (("grpc-status-details-bin", status.SerializeToString()),))


@dataclasses.dataclass
class Attempt:
    method: str
    token: str
    request_id: str
    time_remaining: float | None


class Scripted:
    """TokenService and PaymentService on 127.0.0.1: each call takes the next scripted outcome for
    its method (a grpc.Status to refuse with, a number of seconds to stall first, or None: answer),
    and is recorded with the token it carried and the deadline it had left."""

    def __init__(self, pb):
        self.pb, self.pb_grpc = pb
        self.script: dict[str, list] = {}
        self.attempts: list[Attempt] = []
        self.token_requests: list = []
        self.serverless: list = []  # what each call carried in x-serverless-authorization
        self.token_lifetime = 300
        self.issued = 0
        self.lock = threading.Lock()

    def next(self, method: str):
        with self.lock:
            queue = self.script.get(method, [])
            return queue.pop(0) if queue else None

    def play(self, method: str, context):
        outcome = self.next(method)
        if isinstance(outcome, (int, float)):
            time.sleep(outcome)
        elif outcome is not None:
            context.abort_with_status(outcome)

    def servicers(self):
        scripted = self

        class Tokens(self.pb_grpc.TokenServiceServicer):
            def CreateToken(self, request, context):  # noqa: N802
                with scripted.lock:
                    scripted.token_requests.append(request)
                scripted.play("CreateToken", context)
                with scripted.lock:
                    scripted.issued += 1
                    n = scripted.issued
                return scripted.pb.Token(access_token=f"token-{n}", token_type="Bearer",
                                         expires_in=scripted.token_lifetime, scope=request.scope)

        class Payments(self.pb_grpc.PaymentServiceServicer):
            def _record(self, name, request, context):
                metadata = dict(context.invocation_metadata())
                token = metadata.get("authorization", "")
                with scripted.lock:
                    scripted.serverless.append(metadata.get("x-serverless-authorization"))
                with scripted.lock:
                    scripted.attempts.append(Attempt(name, token.removeprefix("Bearer "),
                                                     getattr(getattr(request, "payment", None), "request_id", ""),
                                                     context.time_remaining()))
                scripted.play(name, context)

            def CreatePayment(self, request, context):  # noqa: N802
                self._record("CreatePayment", request, context)
                return scripted.pb.Payment(id="pay_1", email=request.payment.email, amount=request.payment.amount,
                                           request_id=request.payment.request_id, status=1)

            def GetPayment(self, request, context):  # noqa: N802
                self._record("GetPayment", request, context)
                return scripted.pb.Payment(id=request.id, status=1)

            def ConfirmPayment(self, request, context):  # noqa: N802
                self._record("ConfirmPayment", request, context)
                return scripted.pb.Payment(id=request.id, status=2)

        return Tokens(), Payments()

    def calls(self, method: str) -> list[Attempt]:
        return [a for a in self.attempts if a.method == method]


@pytest.fixture
def service(pb):
    scripted = Scripted(pb)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    tokens, payments = scripted.servicers()
    scripted.pb_grpc.add_TokenServiceServicer_to_server(tokens, server)
    scripted.pb_grpc.add_PaymentServiceServicer_to_server(payments, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    scripted.target = f"127.0.0.1:{port}"
    yield scripted
    server.stop(0)


class Sleeps(list):
    """A sleep that records instead of waiting (the backoff is checked by value)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def make_client(pc, service):
    made = []

    def make(deadline: float = 2.0, clock: Clock | None = None, **policy):
        clock = clock or Clock()
        tokens = pc.ClientCredentials("cli_shop", "pmt_cs_secret", scope="payments.create", clock=clock)
        sleeps = Sleeps()
        retry = pc.RetryPolicy(sleep=sleeps, jitter=lambda top: top, **policy)
        client = pc.PaymentsClient(service.target, tokens, deadline=deadline, retry=retry)
        made.append(client)
        return client, tokens, sleeps, clock

    yield make
    for client in made:
        client.close()


# --- tokens ----------------------------------------------------------------------------------

def test_the_token_is_fetched_once_by_client_credentials_and_cached(make_client, service):
    client, tokens, _, _ = make_client()
    for _ in range(5):
        client.get_payment("pay_1")
    [request] = service.token_requests
    assert (request.grant_type, request.client_id, request.client_secret, request.scope) == (
        "client_credentials", "cli_shop", "pmt_cs_secret", "payments.create")
    assert [a.token for a in service.attempts] == ["token-1"] * 5


def test_it_is_renewed_a_minute_before_it_expires_not_at_expiry(make_client, service):
    client, tokens, _, clock = make_client()
    client.get_payment("pay_1")
    clock.now += 300 - 60 - 0.001  # just before the renewal point
    client.get_payment("pay_1")
    clock.now += 0.002  # 60 s before expiry: renewed while the old one is still good
    client.get_payment("pay_1")
    assert [a.token for a in service.attempts] == ["token-1", "token-1", "token-2"]


def test_a_short_lived_token_is_renewed_at_half_its_life(make_client, service):
    service.token_lifetime = 40
    client, _, _, clock = make_client()
    client.get_payment("pay_1")
    clock.now += 19.9
    client.get_payment("pay_1")
    clock.now += 0.2
    client.get_payment("pay_1")
    assert [a.token for a in service.attempts] == ["token-1", "token-1", "token-2"]


def test_a_failed_renewal_keeps_the_valid_token_and_fails_once_it_has_expired(make_client, service, pc):
    client, tokens, _, clock = make_client(attempts=1)
    client.get_payment("pay_1")
    down = refusal(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
    service.script["CreateToken"] = [down, down]
    clock.now += 250  # renewal due, the token service is down: the old token still serves
    client.get_payment("pay_1")
    clock.now += 46  # 4 s left: less than the 5 s margin
    with pytest.raises(pc.errors.Unavailable) as refused:
        client.get_payment("pay_1")
    assert refused.value.reason == "DATABASE_UNAVAILABLE"
    assert [a.token for a in service.attempts] == ["token-1", "token-1"]
    client.get_payment("pay_1")  # the token service is back
    assert service.attempts[-1].token == "token-2" and tokens.fetches == 4


def test_concurrent_callers_share_one_fetch(make_client, service):
    service.script["CreateToken"] = [0.3]  # a slow token service
    client, tokens, _, _ = make_client()
    with futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: client.get_payment("pay_1"), range(8)))
    assert len(service.token_requests) == 1 and {a.token for a in service.attempts} == {"token-1"}


def test_wrong_credentials_are_a_typed_error_and_not_retried(make_client, service, pc):
    service.script["CreateToken"] = [refusal(grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT")] * 3
    client, *_ = make_client()
    with pytest.raises(pc.errors.Unauthenticated) as refused:
        client.create_payment("buyer@example.com", 1000, request_id="order-1")
    assert (refused.value.reason, refused.value.domain) == ("INVALID_CLIENT", "payments.v1")
    assert len(service.token_requests) == 1 and service.attempts == []


def test_throttled_credentials_are_not_retried(make_client, service, pc):
    service.script["CreateToken"] = [refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_ATTEMPTS", retry_after=1)]
    client, _, sleeps, _ = make_client()
    with pytest.raises(pc.errors.ResourceExhausted) as refused:
        client.create_payment("buyer@example.com", 1000, request_id="order-1")
    assert refused.value.reason == "TOO_MANY_ATTEMPTS" and refused.value.retry_after == 1.0
    assert len(service.token_requests) == 1 and sleeps == []


def test_a_refused_token_is_dropped_renewed_and_the_call_repeated_once(make_client, service, pc):
    client, *_ = make_client()
    client.get_payment("pay_1")
    service.script["CreatePayment"] = [refusal(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")]
    client.create_payment("buyer@example.com", 1000, request_id="order-1")
    assert [(a.method, a.token) for a in service.attempts] == [
        ("GetPayment", "token-1"), ("CreatePayment", "token-1"), ("CreatePayment", "token-2")]
    service.script["CreatePayment"] = [refusal(grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")] * 2
    with pytest.raises(pc.errors.Unauthenticated) as refused:
        client.create_payment("buyer@example.com", 1000, request_id="order-2")
    assert refused.value.reason == "TOKEN_REVOKED"
    assert [a.token for a in service.calls("CreatePayment")][-2:] == ["token-2", "token-3"]


def test_behind_cloud_runs_invoker_check_the_token_goes_in_both_headers(pc, service):
    with pc.PaymentsClient(service.target, pc.StaticToken("id-token"),
                           auth_headers=("authorization", "x-serverless-authorization")) as client:
        client.get_payment("pay_1")
    with pc.PaymentsClient(service.target, pc.StaticToken("id-token")) as client:
        client.get_payment("pay_1")
    assert [a.token for a in service.attempts] == ["id-token", "id-token"]
    assert service.serverless == ["Bearer id-token", None]


def test_the_secret_is_in_no_representation(pc):
    tokens = pc.ClientCredentials("cli_shop", "pmt_cs_do_not_print")
    assert "pmt_cs_do_not_print" not in repr(tokens) and "pmt_cs_do_not_print" not in str(tokens)


# --- deadlines and retries -------------------------------------------------------------------

@pytest.mark.parametrize("code, reason", [
    (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
    (grpc.StatusCode.ABORTED, "ABORTED"),
])
def test_a_create_is_retried_on_transient_codes_with_its_first_request_id(make_client, service, code, reason):
    service.script["CreatePayment"] = [refusal(code, reason)] * 2
    client, _, sleeps, _ = make_client()
    payment = client.create_payment("buyer@example.com", 1000)
    creates = service.calls("CreatePayment")
    assert len(creates) == 3 and len({a.request_id for a in creates}) == 1
    assert re.fullmatch(r"pc-[0-9a-f]{32}", creates[0].request_id) and payment.request_id == creates[0].request_id
    assert sleeps == [0.1, 0.2]  # full jitter's top, doubling


def test_a_lost_answer_is_retried_after_the_attempts_deadline_with_the_same_request_id(make_client, service):
    service.script["CreatePayment"] = [1.0]  # the first attempt outlives its real 0.3 s deadline
    client, *_ = make_client(deadline=0.3)
    payment = client.create_payment("buyer@example.com", 1000, request_id="order-1042")
    creates = service.calls("CreatePayment")
    assert [a.request_id for a in creates] == ["order-1042", "order-1042"] and payment.id == "pay_1"


def test_every_call_carries_a_deadline_cut_to_what_the_budget_leaves(make_client, service):
    client, *_ = make_client(deadline=2.0)
    client.create_payment("buyer@example.com", 1000, request_id="order-1")
    client.get_payment("pay_1")
    client.confirm_payment("pay_1")
    assert all(a.time_remaining is not None and 0 < a.time_remaining <= 2.0 + SLACK for a in service.attempts), service.attempts
    client, *_ = make_client(deadline=5.0, budget=0.5)
    client.get_payment("pay_1")
    assert 0 < service.attempts[-1].time_remaining <= 0.5 + SLACK


def test_the_services_retry_info_is_waited_at_least(make_client, service):
    service.script["CreatePayment"] = [refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", retry_after=1.5)]
    client, _, sleeps, _ = make_client()
    client.create_payment("buyer@example.com", 1000, request_id="order-1")
    assert sleeps == [1.5]


def test_retries_stop_at_the_attempt_limit(make_client, service, pc):
    service.script["CreatePayment"] = [refusal(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")] * 9
    client, _, sleeps, _ = make_client(attempts=4)
    with pytest.raises(pc.errors.Unavailable):
        client.create_payment("buyer@example.com", 1000, request_id="order-1")
    assert len(service.calls("CreatePayment")) == 4 and sleeps == [0.1, 0.2, 0.4]


def test_retries_stop_when_the_wait_would_pass_the_budget(make_client, service, pc):
    service.script["CreatePayment"] = [refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_BUSY", retry_after=30)]
    client, _, sleeps, _ = make_client(budget=20)
    with pytest.raises(pc.errors.ResourceExhausted) as refused:
        client.create_payment("buyer@example.com", 1000, request_id="order-1")
    assert refused.value.retry_after == 30 and sleeps == [] and len(service.calls("CreatePayment")) == 1


@pytest.mark.parametrize("code, reason, error", [
    (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAYMENT", "InvalidArgument"),
    (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_CONFLICT", "AlreadyExists"),
    (grpc.StatusCode.FAILED_PRECONDITION, "NO_ACCOUNT", "FailedPrecondition"),
    (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING", "PermissionDenied"),
    (grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND", "NotFound"),
    (grpc.StatusCode.INTERNAL, "INTERNAL", "Internal"),
    (grpc.StatusCode.UNKNOWN, "", "PaymentsError"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_THROTTLED", "ResourceExhausted"),
])
def test_a_create_is_not_retried_on_other_codes_and_the_error_is_typed(make_client, service, pc, code, reason, error):
    service.script["CreatePayment"] = [refusal(code, reason, "it says why", fields=(("payment.amount", "too big"),))]
    client, _, sleeps, _ = make_client()
    with pytest.raises(pc.PaymentsError) as refused:
        client.create_payment("buyer@example.com", 1000, request_id="order-1")
    assert type(refused.value) is getattr(pc.errors, error)
    assert (refused.value.code, refused.value.reason, refused.value.message) == (code, reason, "it says why")
    assert refused.value.field_violations == [("payment.amount", "too big")] and refused.value.metadata == {"k": "v"}
    assert len(service.calls("CreatePayment")) == 1 and sleeps == []


def test_confirm_is_not_retried(make_client, service, pc):
    service.script["ConfirmPayment"] = [refusal(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")]
    client, _, sleeps, _ = make_client()
    with pytest.raises(pc.errors.Unavailable):
        client.confirm_payment("pay_1")
    assert len(service.calls("ConfirmPayment")) == 1 and sleeps == []


def test_a_read_is_retried_like_a_create(make_client, service):
    service.script["GetPayment"] = [refusal(grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")]
    client, *_ = make_client()
    assert client.get_payment("pay_1").id == "pay_1" and len(service.calls("GetPayment")) == 2


def test_nothing_listening_is_unavailable_without_a_reason_after_every_attempt(pc):
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        sleeps = Sleeps()
        client = pc.PaymentsClient(f"127.0.0.1:{port}", pc.StaticToken("t"), deadline=1,
                                   retry=pc.RetryPolicy(attempts=3, sleep=sleeps, jitter=lambda top: top))
        with pytest.raises(pc.errors.Unavailable) as refused:
            client.create_payment("buyer@example.com", 1000, request_id="order-1")
        client.close()
    assert refused.value.reason == "" and sleeps == [0.1, 0.2]


def test_an_amount_is_an_int_never_a_float(pc):
    client = pc.PaymentsClient("127.0.0.1:1", pc.StaticToken("t"))
    for amount in (10.0, "10", True):
        with pytest.raises(TypeError):
            client.create_payment("buyer@example.com", amount)
    client.close()


# --- webhooks --------------------------------------------------------------------------------

def standard_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(33)).decode()


def signed(secret: str, body: bytes, msg_id: str = "evt_1", at: float | None = None) -> dict:
    import standardwebhooks

    at = time.time() if at is None else at
    import datetime as dt

    stamp = dt.datetime.fromtimestamp(int(at), tz=dt.timezone.utc)
    signature = standardwebhooks.Webhook(secret).sign(msg_id, stamp, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at)), "webhook-signature": signature}


def test_the_verifier_accepts_what_the_reference_library_signs_and_nothing_altered(pc):
    verify = pc.webhooks.verify
    secret, body = standard_secret(), b'{"id": "evt_1", "type": "payment.succeeded"}'
    headers = signed(secret, body)
    assert verify(secret, headers, body)
    assert not verify(secret, headers, body + b" ")
    assert not verify(standard_secret(), headers, body)
    assert not verify(secret, {**headers, "webhook-id": "evt_2"}, body)
    assert not verify(secret, signed(secret, body, at=time.time() - 301), body)  # a replay
    assert not verify(secret, signed(secret, body, at=time.time() + 301), body)
    old = standard_secret()  # during a rotation, one signature per secret, space-separated
    both = {**headers, "webhook-signature": signed(old, body)["webhook-signature"] + " " + headers["webhook-signature"]}
    assert verify(secret, both, body) and verify(old, both, body)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["webhook-id", "webhook-timestamp", "webhook-signature"]), st.text()),
       st.binary(max_size=64), st.text())
def test_the_verifier_answers_false_never_raises_on_headers_it_did_not_sign(pc, headers, body, secret):
    """Whatever arrives unsigned: a real key and an arbitrary secret string both answer False."""
    assert pc.webhooks.verify(standard_secret(), headers, body) is False
    assert pc.webhooks.verify(secret, headers, body) is False
    assert pc.webhooks.verify("whsec_" + secret, headers, body) is False


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789", max_size=6000) | st.text(max_size=40), st.text(max_size=40), st.text(max_size=80))
def test_the_verifier_answers_false_for_any_timestamp_however_long(pc, stamp, msg_id, signature):
    """A timestamp of thousands of digits (past Python's integer-string limit) is False, not a
    ValueError out of the receiver."""
    secret = standard_secret()
    headers = {"webhook-id": msg_id or "evt_1", "webhook-timestamp": stamp, "webhook-signature": signature or "v1,x"}
    assert pc.webhooks.verify(secret, headers, b"{}") is False
    assert pc.webhooks.verify(secret, {**headers, "webhook-timestamp": "9" * 5000}, b"{}") is False


# --- the package on its own ------------------------------------------------------------------

def test_it_imports_without_the_server_or_its_stubs(tmp_path):
    copy = generated_copy(tmp_path)
    probe = ("import sys, payments_client, shop.app; "
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('server', 'payments', 'peewee', 'jwt')); "
             "print(bad)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={"PYTHONPATH": str(copy), "PATH": os.environ.get("PATH", "")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_its_pins_are_the_versions_the_tests_run():
    pins = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"]["dependencies"]
    locked = dict(re.findall(r"^([a-z0-9-]+)==(\S+)", (ROOT / "requirements.lock").read_text(), re.M))
    assert pins and all(pin.split("==")[1] == locked[pin.split("==")[0]] for pin in pins), (pins, locked)


def test_the_shop_settles_an_order_once_per_event_and_ignores_a_repeat(pc, copy_dir):
    from shop.app import Order, Shop

    secret = standard_secret()
    said: list[dict] = []
    shop = Shop(payments=None, webhook_secret=secret, say=said.append)
    shop.orders["ord_1"] = Order(id="ord_1", email="b@example.com", amount=1, status="awaiting_payment", payment_id="pay_1")
    body = json.dumps({"id": "evt_1", "type": "payment.succeeded", "payment": {"id": "pay_1", "request_id": "ord_1"}}).encode()
    assert shop.webhook(signed(secret, body), body) == 200
    assert shop.webhook(signed(secret, body), body) == 200  # the same event again (a retry)
    failed = json.dumps({"id": "evt_2", "type": "payment.failed", "reason": "CANCELLED",
                         "payment": {"id": "pay_1", "request_id": "ord_1"}}).encode()
    assert shop.webhook(signed(secret, failed), failed) == 200  # a paid order stays paid
    assert shop.orders["ord_1"].status == "paid" and said == [{"event": "order_paid", "order": "ord_1", "payment": "pay_1"}]


def test_a_google_id_token_is_fetched_from_the_metadata_server_and_renewed_before_its_exp(pc):
    from devstack.google_standin import GoogleStandIn, ServiceAccount

    google = GoogleStandIn()
    google.workload = ServiceAccount("shopping")
    clock, wall = Clock(), Clock()
    wall.now = time.time()
    tokens = pc.GoogleIdToken("https://payments.example.com", metadata_url=google.identity_url, clock=clock,
                              wall_clock=lambda: wall.now)
    try:
        first = tokens.token()
        assert tokens.token() == first and len(google.identity_requests) == 1
        claims = pc.tokens.unverified_claims(first)
        assert (claims["aud"], claims["sub"]) == ("https://payments.example.com", google.workload.sub)
        assert google.identity_requests[0] == {"query": {"audience": "https://payments.example.com", "format": "full"},
                                               "flavor": "Google"}
        renew_at = 1000.0 + (claims["exp"] - wall.now) - 60  # the lifetime is read from its exp
        clock.now = renew_at - 0.01
        assert tokens.token() == first and len(google.identity_requests) == 1
        clock.now = renew_at + 0.01
        tokens.token()
        assert len(google.identity_requests) == 2
        google.stop()
        clock.now += 4000  # the cached one has expired and the metadata server is gone
        with pytest.raises(pc.errors.Unavailable) as refused:
            tokens.token()
        assert refused.value.reason == "METADATA_UNAVAILABLE"
    finally:
        with contextlib.suppress(OSError):
            google.stop()


def test_the_documented_defaults_backoff_cap_and_jitter(pc):
    policy = pc.RetryPolicy()
    assert (policy.attempts, policy.budget, policy.base, policy.cap) == (4, 20.0, 0.1, 2.0)
    assert pc.PaymentsClient("127.0.0.1:1", pc.StaticToken("t")).deadline == 5.0
    busy = pc.errors.ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", reason="SERVER_BUSY")
    top = pc.RetryPolicy(jitter=lambda top: top)
    assert [top.delay(n, busy) for n in range(1, 8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    waits = [policy.delay(5, busy) for _ in range(200)]  # full jitter: anywhere from 0 to the cap's top
    assert all(0 <= w <= 1.6 for w in waits) and min(waits) < 0.4 and max(waits) > 1.2
    ca = pc.tokens.ClientCredentials("cli_x", "pmt_cs_x")
    assert (ca.renew_before, ca.min_left, ca.deadline) == (60.0, 5.0, 5.0)


def test_it_builds_into_a_wheel_of_its_own_with_its_stubs(tmp_path):
    import zipfile

    copy = generated_copy(tmp_path)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "out"), str(copy)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "out").glob("payments_client-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"payments_client/client.py", "payments_client/_gen/payments/v1/payments_pb2_grpc.py",
            "payments_client/_gen/protoc_gen_openapiv2/options/annotations_pb2.py"} <= names
    assert not [n for n in names if n.startswith(("shop/", "server/", "tests/"))]  # the example and the server stay out
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines() if line.startswith("Requires-Dist")]
    assert sorted(requires) == ["Requires-Dist: googleapis-common-protos==1.76.0", "Requires-Dist: grpcio-tools==1.85.1; "
                                'extra == "gen"', "Requires-Dist: grpcio==1.85.3", "Requires-Dist: protobuf==7.36.2"], requires
