"""This project against what a team would pick instead, in one interleaved run: REST
`GET /v1/payments/{id}`, the first page of `GET /v1/payments` and `POST /v1/payments` (a create with
a fresh request_id each) with wrk, the same token, the same SQLite file and rows, the same JSON bytes
(checked before anything is measured; a page's next_page_token is each side's own; a create's id and
times are each side's own, and its replay must repeat the first answer byte for byte), against

    this project, 1 server process     behind Envoy (PAYMENTS_PROCESSES=1)
    this project, N server processes   behind Envoy (PAYMENTS_PROCESSES=N, the CPUs available)
    FastAPI + uvicorn, 1 worker        bench/peer/app.py, `async def`, PyJWT on every request
    FastAPI + uvicorn, 2 workers

In each of --rounds rounds every contender runs back to back, so the machine's drift hits all of
them alike; each row is a contender's median round. CPU is every process of the contender (the
server's processes and Envoy; uvicorn's supervisor and workers) over the run, per request.
Ratios are against FastAPI with 2 workers, the strongest peer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import loadgen

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


@dataclasses.dataclass
class Contender:
    label: str
    url: str  # base URL of the REST API
    pids: list[int]  # the processes whose CPU counts (their descendants too)


@dataclasses.dataclass
class VersusRow:
    label: str
    operation: str
    result: loadgen.Result
    cpu_cores: float

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_cores / self.result.rps * 1e6 if self.result.rps else 0.0


class Peer:
    """uvicorn serving bench/peer/app.py on a port of its own."""

    def __init__(self, work: Path, port: int, workers: int, database: Path, jwks: Path, payment_ttl_seconds: int):
        self.log = work / f"peer-{workers}.log"
        env = {**os.environ, "PEER_DB": str(database), "PEER_JWKS": str(jwks),
               "PEER_PAYMENT_TTL_SECONDS": str(payment_ttl_seconds)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(PEER_PYTHON), "-m", "uvicorn", "app:app", "--app-dir", str(ROOT / "bench" / "peer"),
                 "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/docs", timeout=1).read()
                if len(tree(self.proc.pid)) > workers or workers == 1:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"uvicorn did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


def fetch(url: str, token: str) -> bytes:
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read()


def post(url: str, token: str, body: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body.encode(), method="POST", headers={
        "authorization": f"Bearer {token}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# What each side makes its own in a create's answer: its id and its times.
_OWN = ("id", "created_at", "updated_at", "expires_at")


def same_create(contenders: list[Contender], body: str, token: str) -> None:
    """The same answer to the same create (but for each side's own id and times, which must still be
    there, with the same time to live), the same bytes again for its replay, 409 for a different body
    under the same request_id."""
    answers = {}
    for n, c in enumerate(contenders):
        request_id = f"versus-check-{uuid.uuid4().hex[:12]}-{n}"
        status, first = post(f"{c.url}/v1/payments", token, body.replace("{{n}}", request_id))
        replay_status, replay = post(f"{c.url}/v1/payments", token, body.replace("{{n}}", request_id))
        conflict, _ = post(f"{c.url}/v1/payments", token, body.replace("{{n}}", request_id).replace('"1250"', '"1251"'))
        if (status, replay_status, conflict) != (200, 200, 409) or replay != first:
            raise SystemExit(f"versus: {c.label} creates differently: {status} {first!r}, replay {replay_status} "
                             f"{replay!r}, different body {conflict}")
        answer = json.loads(first)
        created, expires = (dt.datetime.fromisoformat(answer[k].replace("Z", "+00:00")) for k in ("created_at", "expires_at"))
        if answer["updated_at"] != answer["created_at"] or not answer["id"].startswith("pay_"):
            raise SystemExit(f"versus: {c.label} answers a create with {first!r}")
        answer.update({k: type(answer[k]).__name__ for k in _OWN}, request_id="", ttl=str(expires - created))
        answers[c.label] = json.dumps(answer)  # the same keys in the same order, the same values
    expected = next(iter(answers.values()))
    for label, answer in answers.items():
        if answer != expected:
            raise SystemExit(f"versus: {label} answers a create differently:\n{answer}\n{expected}")


def comparable(body: bytes) -> dict:
    """An answer without what each side makes its own way (the page token)."""
    answer = json.loads(body)
    answer.pop("next_page_token", None)
    return answer


def same_answer(contenders: list[Contender], path: str, token: str) -> None:
    answers = {c.label: fetch(f"{c.url}{path}", token) for c in contenders}
    first = next(iter(answers.values()))
    for label, body in answers.items():
        if json.dumps(comparable(body)) != json.dumps(comparable(first)):  # the same bytes, in the same order
            raise SystemExit(f"versus: {label} answers {path} differently:\n{body!r}\n{first!r}")
    if "next_page_token" in json.loads(first):
        assert all("next_page_token" in json.loads(b) for b in answers.values()), f"versus: a side does not page {path}"


def operations(payment_id: str, email: str) -> dict[str, tuple[str, str, str | None]]:
    """What each contender is asked, by operation (method, path, body): a payment of the bench
    payer's, its first page, a new payment of theirs (wrk makes each request_id unique)."""
    create = '{"email":"%s","amount":"1250","currency":"IDR","request_id":"{{n}}"}' % email
    return {"GetPayment": ("GET", f"/v1/payments/{payment_id}", None),
            "ListPayments": ("GET", "/v1/payments?page_size=20", None),
            "CreatePayment": ("POST", "/v1/payments", create)}


def run(contenders: list[Contender], payment_id: str, token: str, *, seconds: float, rounds: int,
        concurrency: int, email: str, only: list[str] | None = None) -> list[VersusRow]:
    rows: dict[tuple[str, str], list[VersusRow]] = {}
    for operation, (method, path, body) in operations(payment_id, email).items():
        if only and operation not in only:
            continue
        if body is None:
            same_answer(contenders, path, token)
        else:
            same_create(contenders, body, token)
        for n in range(rounds):
            for c in contenders:
                url = f"{c.url}{path}"
                if n == 0:
                    loadgen.wrk(url, method, token, body=body, seconds=1, concurrency=concurrency)  # warm
                pids = [p for root in c.pids for p in tree(root)]
                before, start = cpu_seconds(pids), time.monotonic()
                result = loadgen.wrk(url, method, token, body=body, seconds=seconds, concurrency=concurrency)
                cores = (cpu_seconds(pids) - before) / (time.monotonic() - start)
                rows.setdefault((operation, c.label), []).append(VersusRow(c.label, operation, result, cores))
                print(f"  versus {operation:12} {c.label:34} {result.rps:8.0f} req/s  p99 {result.p99_ms:6.2f} ms  "
                      f"CPU {cores:4.2f} cores  errors {result.errors}", flush=True)
    return [sorted(r, key=lambda row: row.result.rps)[len(r) // 2] for r in rows.values()]


def report(rows: list[VersusRow], reference: str) -> str:
    lines = ["| operation | contender | req/s (median round) | p99 ms | CPU cores | CPU µs per request | errors "
             f"| req/s vs {reference} | p99 vs {reference} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = next(x for x in rows if x.label == reference and x.operation == r.operation)
        lines.append(f"| {r.operation} | {r.label} | {r.result.rps:.0f} | {r.result.p99_ms:.1f} | {r.cpu_cores:.2f} "
                     f"| {r.cpu_us_per_request:.0f} | {r.result.errors} | {r.result.rps / ref.result.rps:.2f}x "
                     f"| {r.result.p99_ms / ref.result.p99_ms:.2f}x |")
    return "\n".join(lines)
