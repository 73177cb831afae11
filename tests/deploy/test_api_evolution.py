"""The API cannot change in a way that breaks its callers by accident (docs/versioning.md).

`buf lint` holds the proto to buf's STANDARD rules (the exceptions, each with its reason, are in
buf.yaml); `buf breaking` (category FILE) compares the proto with the one at the commit api-baseline
names, and `oasdiff breaking` does the same for the OpenAPI 3.0 document REST callers generate
clients from. buf reads images that protoc builds with scripts/gen.sh's include paths, so nothing
comes from the network; the baseline comes from git, so a shallow clone cannot run these.

The last tests make each kind of edit on a copy of the proto in a temporary directory (never the
real file) and show which check refuses it: a renamed field, a removed RPC and a removed response
field fail both, a moved REST route only oasdiff (buf does not read google.api.http), and a new
optional field or enum value neither.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import google.api
import grpc_tools
import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".tools" / "bin"
BUF, OASDIFF = TOOLS / "buf", TOOLS / "oasdiff"
BASELINE_FILE = ROOT / "api-baseline"
PROTO = Path("proto/payments/v1/payments.proto")
DOCUMENT_3 = Path("openapi/payments.openapi.json")
# What scripts/gen.sh reads: a copy of these is a tree it generates from as it does in the repo (with
# an OUT_DIR of its own it runs no Go and writes nothing back).
GEN_INPUTS = ("proto", "scripts/gen.sh", "scripts/openapi_polish.py", "scripts/envoy_variants.py", "scripts/rest_bindings.py",
              "envoy/envoy.yaml")

# oasdiff's levels, where its defaults do not match AIP-180 for this API (docs/versioning.md):
OASDIFF_LEVELS = {
    # proto3 JSON leaves default values out, so every response property is optional in the document
    # and oasdiff would call its removal harmless; a field callers read that disappears is breaking.
    "response-optional-property-removed": "err",
    # Schema names are type names in generated clients (components["schemas"]["Payment"]).
    "api-schema-removed": "err",
    # A new enum value is an additive change (AIP-180; buf agrees): callers treat a value they do
    # not know as unknown (AIP-126), which docs/versioning.md promises them.
    "response-property-enum-value-added": "info",
}


def baseline_rev() -> str:
    revs = [line.strip() for line in BASELINE_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert len(revs) == 1, f"api-baseline names one commit or tag, not {revs}"
    return revs[0]


def git(*args: str, text: bool = True):
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=text, timeout=60).stdout


def run(argv: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kwargs)


def image(tree: Path, out: Path) -> Path:
    """A buf image of tree/proto: protoc with scripts/gen.sh's include paths (our protos, the
    vendored openapiv2 options, googleapis-common-protos, grpcio-tools' google/protobuf)."""
    site = Path(google.api.__path__[0]).parents[1]
    wkt = Path(grpc_tools.__path__[0]) / "_proto"
    proto = tree / "proto"
    files = sorted(p.relative_to(proto).as_posix() for p in proto.rglob("*.proto")
                   if p.relative_to(proto).parts[0] != "vendor")
    built = run([sys.executable, "-m", "grpc_tools.protoc", "-I", proto, "-I", proto / "vendor" / "grpc-gateway",
                 "-I", site, "-I", wkt, "--include_imports", "--include_source_info", "-o", out, *files])
    assert built.returncode == 0, built.stderr
    return out


def buf(*args) -> list[dict]:
    """buf's findings with this repository's buf.yaml, on our files only (--path payments, not the
    imports): one {"path", "start_line", "type" (the rule), "message"} each. Exit status 0 is none,
    100 some; anything else is buf itself failing."""
    result = run([BUF, *args, "--path", "payments", "--config", ROOT / "buf.yaml", "--error-format", "json"], cwd=ROOT)
    assert result.returncode in (0, 100), f"buf failed: {result.stderr}"
    findings = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert bool(findings) == (result.returncode == 100), result
    return findings


def show(findings: list[dict]) -> str:
    return "\n".join(f"{f['path']}:{f.get('start_line', 0)}: {f['type']}: {f['message']}" for f in findings)


def oasdiff(base: Path, revision: Path, levels: Path) -> subprocess.CompletedProcess:
    """oasdiff breaking at WARN and above (WARN: "request-property-removed", a renamed request
    field). Exit status 0: nothing breaking, 1: breaking changes, 100 and above: it failed."""
    result = run([OASDIFF, "breaking", base, revision, "--fail-on", "WARN", "--severity-levels", levels,
                  "--allow-external-refs=false", "--color", "never"], cwd=ROOT)
    assert result.returncode in (0, 1), f"oasdiff failed: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def levels(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("oasdiff") / "levels.txt"
    path.write_text("".join(f"{rule} {level}\n" for rule, level in OASDIFF_LEVELS.items()))
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The baseline's proto/ (git archive) and its committed OpenAPI 3.0 document, with its image."""
    rev = baseline_rev()
    if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True).returncode:
        pytest.fail(f"api-baseline names {rev}, which this clone does not have: a shallow clone? "
                    "`git fetch --unshallow` (CI clones main in full)")
    tree = tmp_path_factory.mktemp("baseline")
    tarfile.open(fileobj=io.BytesIO(git("archive", "--format=tar", rev, "proto", text=False))).extractall(tree, filter="data")
    (tree / DOCUMENT_3).parent.mkdir(parents=True)
    (tree / DOCUMENT_3).write_text(git("show", f"{rev}:{DOCUMENT_3.as_posix()}"))
    image(tree, tree / "api.binpb")
    return tree


def edited_api(tmp_path: Path, edit) -> tuple[Path, Path]:
    """A copy of the working tree's API inputs with `edit` applied to the proto's text; its image and
    the OpenAPI 3.0 document scripts/gen.sh makes from it (the generator the committed one comes from)."""
    tree = tmp_path / "tree"
    for name in GEN_INPUTS:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, tree / name)
    proto = tree / PROTO
    before = proto.read_text()
    after = edit(before)
    assert after != before, "the edit changed nothing"
    proto.write_text(after)
    out = tmp_path / "out"
    generated = run([tree / "scripts" / "gen.sh", out], env={**os.environ, "PYTHON": sys.executable, "TOOLS_BIN": str(TOOLS)})
    assert generated.returncode == 0, generated.stderr
    return image(tree, tmp_path / "api.binpb"), out / DOCUMENT_3


# --- the API as it is --------------------------------------------------------------------------

def test_the_baseline_is_a_commit_this_branch_descends_from():
    rev = baseline_rev()
    assert re.fullmatch(r"[0-9a-f]{40}|v\d+\.\d+\.\d+", rev), f"a full commit hash or a release tag, not {rev!r}"
    ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", rev, "HEAD"], cwd=ROOT, capture_output=True)
    assert ancestor.returncode == 0, f"api-baseline {rev} is not an ancestor of HEAD: {ancestor.stderr.decode()}"


def test_buf_lint_passes(tmp_path):
    findings = buf("lint", image(ROOT, tmp_path / "api.binpb"))
    assert not findings, f"buf lint (its rules and exceptions: buf.yaml):\n{show(findings)}"


def test_the_proto_has_no_breaking_change_since_the_baseline(baseline, tmp_path):
    findings = buf("breaking", image(ROOT, tmp_path / "api.binpb"), "--against", baseline / "api.binpb")
    assert not findings, (
        f"breaking changes against api-baseline ({baseline_rev()}); ship them as payments.v2 beside v1 "
        f"(docs/versioning.md):\n{show(findings)}")


def test_the_openapi_3_document_has_no_breaking_change_since_the_baseline(baseline, levels):
    result = oasdiff(baseline / DOCUMENT_3, ROOT / DOCUMENT_3, levels)
    assert result.returncode == 0, (
        f"breaking REST changes against api-baseline ({baseline_rev()}); ship them as /v2 routes beside /v1 "
        f"(docs/versioning.md):\n{result.stdout}")


def test_the_oasdiff_levels_name_real_rules():
    listed = run([OASDIFF, "checks", "changelog"]).stdout
    rules = {line.split()[0] for line in listed.splitlines()[1:] if line.strip()}
    assert set(OASDIFF_LEVELS) <= rules, set(OASDIFF_LEVELS) - rules


# --- each check on an edit of a copy -------------------------------------------------------------

def rename_payment_description(text: str) -> str:
    # Payment.description, the field a customer writes and reads back, becomes `note` (same number).
    return re.sub(r"(message Payment \{.*?\n  string )description( = 5 )", r"\1note\2", text, count=1, flags=re.S)


def remove_rpc(name: str):
    def edit(text: str) -> str:
        start = text.index(f"  rpc {name}(")
        end = text.index("\n  }\n", start) + len("\n  }\n")
        return text[:start] + text[end:]
    return edit


def remove_deleted_at(text: str) -> str:
    # An output-only field: only answers carry it, so only oasdiff's raised level sees it go.
    return re.sub(r"(\nmessage Payment \{\n.*?)\n  google.protobuf.Timestamp deleted_at = [^\n]*", r"\1", text, count=1, flags=re.S)


def next_number(block: str, indent: str) -> int:
    """One above the highest field or value number declared at `indent` in `block`."""
    return 1 + max(int(n) for n in re.findall(rf"^{indent}(?!//)\S[^\n]* = (\d+)", block, flags=re.M))


def add_status_value(text: str) -> str:
    def add(m: re.Match) -> str:
        return f"{m[1]}    // Paid back after SUCCESS.\n    REFUNDED = {next_number(m[1], '    ')};\n{m[2]}"
    return re.sub(r"(\n  enum Status \{\n.*?\n)(  \}\n)", add, text, count=1, flags=re.S)


def move_events_route(text: str) -> str:
    return text.replace('get: "/v1/payments/{payment_id}/events"', 'get: "/v1/payments/{payment_id}/history"')


def add_optional_field(text: str) -> str:
    def add(m: re.Match) -> str:
        return (f"{m[1]}  // The payer's own reference for the payment, at most 64 characters.\n"
                f"  optional string payer_reference = {next_number(m[1], '  ')};\n{m[2]}")
    return re.sub(r"(\nmessage Payment \{\n.*?\n)(\}\n)", add, text, count=1, flags=re.S)


@pytest.mark.parametrize("edit, buf_rules, oasdiff_rule", [
    pytest.param(rename_payment_description, {"FIELD_SAME_NAME", "FIELD_SAME_JSON_NAME"}, "request-property-removed",
                 id="renamed field"),
    pytest.param(remove_rpc("ListPaymentEvents"), {"RPC_NO_DELETE"}, "api-path-removed-without-deprecation", id="removed route"),
    pytest.param(move_events_route, set(), "api-path-removed-without-deprecation", id="moved REST route"),
    pytest.param(remove_deleted_at, {"FIELD_NO_DELETE"}, "response-optional-property-removed", id="removed response field"),
    pytest.param(add_optional_field, set(), "", id="new optional field"),
    pytest.param(add_status_value, set(), "", id="new enum value"),
])
def test_each_check_refuses_a_breaking_edit_and_passes_an_additive_one(baseline, levels, tmp_path, edit, buf_rules, oasdiff_rule):
    """`buf_rules`: what buf refuses the edit with; `oasdiff_rule`: one oasdiff names ("": it passes)."""
    api_image, document = edited_api(tmp_path, edit)
    assert not buf("lint", api_image)  # every edit here is lint-clean: only the breaking checks decide
    proto = buf("breaking", api_image, "--against", baseline / "api.binpb")
    assert {f["type"] for f in proto} == buf_rules, show(proto)
    rest = oasdiff(baseline / DOCUMENT_3, document, levels)
    if oasdiff_rule:
        assert rest.returncode == 1 and f"[{oasdiff_rule}]" in rest.stdout, rest.stdout
    else:
        assert rest.returncode == 0 and "No breaking changes" in rest.stdout, rest.stdout


def test_buf_lint_refuses_a_field_name_that_is_not_snake_case(tmp_path):
    api_image, _ = edited_api(tmp_path, lambda text: add_optional_field(text).replace("payer_reference", "payerReference"))
    findings = buf("lint", api_image)
    assert [f["type"] for f in findings] == ["FIELD_LOWER_SNAKE_CASE"], show(findings)
