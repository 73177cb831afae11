"""Everything the server image installs with pip is pinned by requirements.lock: each pip step of
Dockerfile.server is resolved here (pip's dry run, against the package index) and every package it
would install must be at the lock's version. A dependency the lock leaves out would be whatever
version is newest on the day the image is built."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from tests.support.deploy import ROOT


def _name(raw: str) -> str:
    return re.sub(r"[-_.]+", "-", raw).lower()


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line):
            pins[_name(m[1])] = m[2]
    return pins


def image_pip_steps() -> list[list[str]]:
    """The arguments of each `pip install` in Dockerfile.server, without the flags that change no
    resolution (--no-cache-dir, --disable-pip-version-check)."""
    text = (ROOT / "Dockerfile.server").read_text()
    steps = [shlex.split(m[1]) for m in re.finditer(r"/bin/pip install ([^\n&\\]+)", text)]
    return [[a for a in step if a not in ("--no-cache-dir", "--disable-pip-version-check")] for step in steps]


def test_the_image_has_pip_steps_and_each_is_constrained_by_the_lock():
    steps = image_pip_steps()
    assert len(steps) == 2, steps  # the code-generation stage and the runtime venv
    for step in steps:
        assert step[:2] == ["-c", "requirements.lock"], step


@pytest.mark.parametrize("step", image_pip_steps(), ids=lambda step: " ".join(step[2:]))
def test_every_package_the_image_installs_is_pinned_by_the_lock(step, tmp_path):
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                    "--disable-pip-version-check", "--report", str(report), *step],
                   cwd=ROOT, check=True, timeout=300)
    pins = lock_pins()
    installed = {_name(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    assert installed, "pip would install nothing"
    unpinned = {name: version for name, version in installed.items() if pins.get(name) != version}
    assert not unpinned, f"installed at versions requirements.lock does not pin: {unpinned}"


def test_every_pinned_go_tool_is_built_by_the_makefile_at_the_pinned_version():
    """tools/go.mod's tool directives are the pins; the Makefile builds each one inside that module
    (go install without @version: the module's own requirement)."""
    gomod = (ROOT / "tools" / "go.mod").read_text()
    tools = set(re.search(r"^tool \((.*?)^\)", gomod, flags=re.M | re.S)[1].split())
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\tcd tools && GOBIN=\S+ go install \$\(PKG_\$\*\)$", makefile, flags=re.M)
    packages = dict(re.findall(r"^PKG_(\S+) := (\S+)$", makefile, flags=re.M))
    go_tools = re.search(r"^GO_TOOLS := (.*)$", makefile, flags=re.M)[1].split()
    run_tools = re.search(r"^RUN_TOOLS := (.*)$", makefile, flags=re.M)[1].split()
    assert set(packages.values()) == tools and not [t for t in packages.values() if "@" in t]
    listed = run_tools + [t for t in go_tools if t != "$(RUN_TOOLS)"]
    assert {f"$(TOOLS)/{name}" for name in packages} == set(listed)  # every built tool has its package
