"""The contract from outside Python: the example clients in clients/ run their scenario against the
real stack through Envoy, as subprocesses, and what they print is checked here.

- clients/go: stubs generated from the proto by the pinned protoc-gen-go and protoc-gen-go-grpc
  (clients/go/gen.sh, into a copy of the module in a temporary directory), native gRPC (h2c) on
  Envoy's port; its typed error is another customer's payment (NOT_FOUND, PAYMENT_NOT_FOUND).
- clients/typescript: types generated from openapi/payments.openapi.json by openapi-typescript,
  calls by openapi-fetch, type-checked by tsc, REST through Envoy; its typed error is an invalid
  amount (400, INVALID_ARGUMENT, INVALID_PAYMENT).

Both register, log in, create, get, list, and confirm as the admin. `make setup` installs what they
need (the Go modules, compiled once into Go's build cache; npm ci from the lock file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.stack import ADMIN_EMAIL, ADMIN_PASSWORD, ROOT

GO_CLIENT = ROOT / "clients" / "go"
TS_CLIENT = ROOT / "clients" / "typescript"
DOCUMENT_3 = ROOT / "openapi" / "payments.openapi.json"


def run(argv: list, cwd: Path, timeout: float = 100, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def steps(result: subprocess.CompletedProcess) -> dict[str, list[dict]]:
    """The scenario's JSON lines by step name (register and login come once per customer)."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    seen: dict[str, list[dict]] = {}
    for line in result.stdout.splitlines():
        record = json.loads(line)
        seen.setdefault(record.pop("step"), []).append(record)
    return seen


def assert_the_journey(seen: dict[str, list[dict]], description: str) -> str:
    """register, login, create, get, list, confirm: what both scenarios share. The payment's id."""
    assert all(r["role"] == "customer" and r["user_id"].startswith("usr_") for r in seen["register"]), seen
    assert all(r["token_type"] == "Bearer" and int(r["expires_in"]) > 0 for r in seen["login"]), seen
    [created], [got], [listed], [confirmed] = seen["create"], seen["get"], seen["list"], seen["confirm"]
    payment = created["id"]
    assert payment.startswith("pay_") and created["status"] == "PENDING" and str(created["amount"]) == "150000"
    assert got == {"id": payment, "status": "PENDING", "description": description}
    assert payment in listed["ids"]
    assert confirmed == {"id": payment, "status": "SUCCESS"}
    return payment


# --- Go: native gRPC ---------------------------------------------------------------------------

def go_module(tmp_path: Path) -> Path:
    """A copy of clients/go with its stubs generated fresh from the proto (the tree is not written)."""
    module = tmp_path / "go"
    module.mkdir()
    for name in ("go.mod", "go.sum", "main.go"):
        shutil.copy2(GO_CLIENT / name, module / name)
    generated = run([GO_CLIENT / "gen.sh", module], cwd=ROOT)
    assert generated.returncode == 0, generated.stderr
    return module


def test_the_go_client_walks_the_scenario_over_grpc_through_envoy(stack, api, admin, tmp_path):
    result = run(["go", "run", ".", "-target", f"127.0.0.1:{stack.envoy.port}", "-admin", ADMIN_EMAIL],
                 cwd=go_module(tmp_path), env={"PAYMENTS_ADMIN_PASSWORD": ADMIN_PASSWORD})
    seen = steps(result)
    assert len(seen["register"]) == len(seen["login"]) == 2  # the buyer, then another customer
    payment = assert_the_journey(seen, "Go client")
    [error] = seen["error"]
    assert (error["code"], error["reason"], error["domain"]) == ("NotFound", "PAYMENT_NOT_FOUND", "payments.v1"), error
    # What the Go client did over gRPC is what a REST caller sees.
    over_rest = api.get(f"/v1/payments/{payment}", token=admin.token)
    assert over_rest.status == 200 and over_rest.json["status"] == "SUCCESS", over_rest.text
    assert over_rest.json["email"] == seen["register"][0]["email"] and over_rest.json["currency"] == "IDR"


# --- TypeScript: REST --------------------------------------------------------------------------

def ts_project(tmp_path: Path, document: Path = DOCUMENT_3) -> Path:
    """A copy of clients/typescript (its installed node_modules linked in) with types generated from
    `document`."""
    assert (TS_CLIENT / "node_modules" / ".package-lock.json").exists(), "run `make setup` (npm ci in clients/typescript)"
    project = tmp_path / "ts"
    project.mkdir()
    for name in ("package.json", "tsconfig.json"):
        shutil.copy2(TS_CLIENT / name, project / name)
    shutil.copytree(TS_CLIENT / "src", project / "src")
    (project / "node_modules").symlink_to(TS_CLIENT / "node_modules")
    generated = run([project / "node_modules" / ".bin" / "openapi-typescript", document, "--output", project / "gen" / "schema.d.ts"],
                    cwd=project)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    return project


def tsc(project: Path) -> subprocess.CompletedProcess:
    return run([project / "node_modules" / ".bin" / "tsc", "-p", project], cwd=project)


def test_the_typescript_client_walks_the_scenario_over_rest_through_envoy(stack, api, admin, tmp_path):
    project = ts_project(tmp_path)
    compiled = tsc(project)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    result = run(["node", project / "dist" / "scenario.js", stack.url, ADMIN_EMAIL], cwd=project,
                 env={"PAYMENTS_ADMIN_PASSWORD": ADMIN_PASSWORD})
    seen = steps(result)
    payment = assert_the_journey(seen, "TypeScript client")
    [error] = seen["error"]
    assert (error["http_status"], error["code"], error["reason"], error["domain"]) == (400, 3, "INVALID_PAYMENT", "payments.v1"), error
    over_rest = api.get(f"/v1/payments/{payment}", token=admin.token)
    assert over_rest.status == 200 and over_rest.json["status"] == "SUCCESS", over_rest.text


def test_the_typescript_client_stops_compiling_when_the_document_drops_a_field_it_reads(tmp_path):
    """The types are the contract: a document without Payment.description (what a rename would give)
    makes tsc refuse the scenario, which reads it."""
    document = json.loads(DOCUMENT_3.read_text())
    properties = document["components"]["schemas"]["Payment"]["properties"]
    properties["note"] = properties.pop("description")
    drifted = tmp_path / "drifted.openapi.json"
    drifted.write_text(json.dumps(document))
    compiled = tsc(ts_project(tmp_path, drifted))
    assert compiled.returncode != 0 and "'description' does not exist" in compiled.stdout, compiled.stdout
    assert not (tmp_path / "ts" / "dist").exists()  # noEmitOnError: nothing to run
