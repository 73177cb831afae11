"""The customer an attack must not hurt: while an attack runs, a bystander (another customer, from
other loopback addresses than the attacker's) does what customers do, and each step must succeed
within DEADLINE.

A check is: GET /ready; REST create, get and list of its own payments; native gRPC through Envoy
create and get (and straight to the server's port, when asked); a REST login from an address no
attack uses. Every step is timed, and every failure is kept (a step that fails does not stop the
others), so a test's message says everything that went wrong at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time

import grpc

from server.edge.pb import payments_pb2 as pb
from server.edge.pb import payments_pb2_grpc as pb_grpc
from tests.support import attacks
from tests.support.rest import Client, loopback_address

DEADLINE = 5.0  # seconds: what a customer waits for one call
PASSWORD = "the bystander's own password"

_ids = itertools.count(1)


@dataclasses.dataclass
class Check:
    tag: str
    latencies: dict[str, float] = dataclasses.field(default_factory=dict)  # step -> seconds
    failures: list[str] = dataclasses.field(default_factory=list)  # "step: what happened"
    steps: int = 0
    failed_steps: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        times = ", ".join(f"{step} {seconds * 1000:.0f} ms" for step, seconds in self.latencies.items())
        return (f"{self.tag}: {times}" + (f"; FAILED: {'; '.join(self.failures)}" if self.failures else ""))


class Bystander:
    """`api`: a REST client for Envoy; `envoy_target` / `direct_target`: host:port for gRPC through
    Envoy / straight to the server; `token`: a customer's token (not the attacker's); `email`: an
    account register() made, for the logins."""

    def __init__(self, api: Client, envoy_target: str, token: str, email: str, direct_target: str | None = None,
                 owner_email: str = "alice@example.com"):
        self.api, self.envoy_target, self.direct_target = api, envoy_target, direct_target
        self.token, self.email, self.owner_email = token, email, owner_email
        self.checks: list[Check] = []

    @classmethod
    def register(cls, api: Client, envoy_target: str, token: str, email: str, **kw) -> "Bystander":
        """The bystander's login account is made first (from an address of its own)."""
        answer = api.from_address(loopback_address()).post("/v1/auth/register", {"email": email, "password": PASSWORD})
        assert answer.status == 200, answer.text
        return cls(api, envoy_target, token, email, **kw)

    # One check.

    def check(self, tag: str, *, direct: bool = False, login: bool = True) -> Check:
        """Every step once, each within DEADLINE; `direct`: gRPC to the server's port as well."""
        check = Check(tag)
        rest = self.api.from_address(loopback_address())
        self._step(check, "ready", lambda: self._rest_ok(rest.get("/ready"), "ready"))
        created = self._step(check, "rest create", lambda: self._rest_ok(rest.post(
            "/v1/payments", {"email": self.owner_email, "amount": "700", "request_id": f"{tag}-{next(_ids)}"},
            token=self.token), "create"))
        if created is not None:
            self._step(check, "rest get", lambda: self._rest_ok(rest.get(f"/v1/payments/{created['id']}",
                                                                         token=self.token), "get"))
        self._step(check, "rest list", lambda: self._rest_ok(rest.get("/v1/payments?page_size=5", token=self.token),
                                                             "list"))
        targets = [("grpc via envoy", self.envoy_target)]
        if direct and self.direct_target:
            targets.append(("grpc direct", self.direct_target))
        for name, target in targets:
            self._grpc(check, name, target, tag)
        if login:
            self._step(check, "rest login", lambda: self._login(self.api.from_address(loopback_address())))
        self.checks.append(check)
        return check

    def _grpc(self, check: Check, name: str, target: str, tag: str) -> None:
        md = (("authorization", f"Bearer {self.token}"),)
        # A channel of its own: a client of its own, not one sharing a connection with anyone.
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = pb_grpc.PaymentServiceStub(channel)
            request = pb.CreatePaymentRequest(payment=pb.Payment(email=self.owner_email, amount=1250, currency="IDR",
                                                                 request_id=f"{tag}-{name.split()[-1]}-{next(_ids)}"))
            created = self._step(check, f"{name} create",
                                 lambda: stub.CreatePayment(request, metadata=md, timeout=DEADLINE))
            if created is not None:
                self._step(check, f"{name} get",
                           lambda: stub.GetPayment(pb.GetPaymentRequest(id=created.id), metadata=md, timeout=DEADLINE))

    def _login(self, client: Client):
        answer = client.post("/v1/auth/login", {"email": self.email, "password": PASSWORD})
        got = self._rest_ok(answer, "login")
        if "access_token" not in got:
            raise AssertionError(f"login answered without a token: {answer.text[:200]}")
        return got

    @staticmethod
    def _rest_ok(answer, what: str) -> dict:
        if answer.status != 200:
            raise AssertionError(f"{what} {answer.status} {answer.text[:200]}")
        return answer.json if answer.text else {}

    def _step(self, check: Check, step: str, call):
        check.steps += 1
        started = time.monotonic()
        try:
            result = call()
        except grpc.RpcError as e:
            check.failed_steps += 1
            check.failures.append(f"{step}: {e.code().name} {e.details()!r} after {time.monotonic() - started:.1f} s")
            return None
        except (AssertionError, OSError) as e:
            check.failed_steps += 1
            check.failures.append(f"{step}: {e} after {time.monotonic() - started:.1f} s")
            return None
        took = check.latencies[step] = time.monotonic() - started
        if took > DEADLINE:
            check.failed_steps += 1
            check.failures.append(f"{step}: took {took:.1f} s (deadline {DEADLINE:.0f} s)")
        return result

    # Checks in a loop, while an attack runs.

    def keep_checking(self, tag: str, *, direct: bool = False, login: bool = True, pause: float = 0.2) -> "Checking":
        """`with bystander.keep_checking("during") as checking:` checks back to back (a pause
        between) on a thread until the block ends; checking.checks afterwards."""
        return Checking(self, tag, direct, login, pause)

    def assert_ok(self, checks: list[Check] | None = None) -> None:
        bad = [c for c in (checks if checks is not None else self.checks) if not c.ok]
        assert not bad, "the bystander was hurt:\n" + "\n".join(str(c) for c in bad)


class Checking:
    def __init__(self, bystander: Bystander, tag: str, direct: bool, login: bool, pause: float):
        self.bystander, self.tag, self.direct, self.login, self.pause = bystander, tag, direct, login, pause
        self.checks: list[Check] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)

    def __enter__(self) -> "Checking":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        for n in itertools.count(1):
            if self._stop.is_set():
                return
            self.checks.append(self.bystander.check(f"{self.tag}-{n}", direct=self.direct, login=self.login))
            self._stop.wait(self.pause)

    def latencies(self, step_prefix: str = "") -> list[float]:
        return [s for c in self.checks for step, s in c.latencies.items() if step.startswith(step_prefix)]

    def failure_rate(self) -> float:
        steps = sum(c.steps for c in self.checks)
        return sum(c.failed_steps for c in self.checks) / steps if steps else 0.0

    def steps(self) -> tuple[int, int]:
        """(steps taken, steps failed) over every check."""
        return sum(c.steps for c in self.checks), sum(c.failed_steps for c in self.checks)

    def compare(self, before: list[Check], also: str = "") -> None:
        """Print the bystander's steps during the attack against its checks before it (median, p99,
        slowest; `also` appended), the first five failed checks and the slowest check."""
        baseline = [s for c in before for s in c.latencies.values()]
        during = self.latencies()
        steps, failed = self.steps()
        print(f"bystander: before p50 {attacks.median(baseline) * 1000:.1f} ms; during {steps} calls, {failed} failed, "
              f"p50 {attacks.median(during) * 1000:.1f} ms, p99 {attacks.percentile(during, 99) * 1000:.1f} ms, "
              f"max {max(during, default=0) * 1000:.0f} ms{also}")
        for check in [c for c in self.checks if not c.ok][:5]:
            print(f"  bystander {check}")
        if self.checks:
            print(f"  slowest check: {max(self.checks, key=lambda c: max(c.latencies.values(), default=0))}")

    def report(self, after: Check) -> None:
        """Print what the bystander met during the attack: its checks, steps failed, the median and
        slowest step, the first five failed checks and the check after the attack."""
        steps, failed = self.steps()
        during = self.latencies()
        median = attacks.median(during)
        print(f"bystander: {len(self.checks)} checks, {steps} calls, {failed} failed; p50 "
              f"{median * 1000:.0f} ms, max {max(during, default=0) * 1000:.0f} ms")
        for check in [c for c in self.checks if not c.ok][:5] + [after]:
            print(f"  bystander {check}")
