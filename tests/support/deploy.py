"""What the deployment checks read: the Dockerfiles, the compose file, the rendered Kubernetes
manifests and the Envoy config, parsed into plain Python values.

These are the checks a file can answer on its own (lint, pins, wiring between the files);
tests/containers builds the images and runs them with podman.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shlex
import subprocess
from pathlib import Path, PurePosixPath

import yaml

# The rendered manifests come from devstack/manifests.py, which the image benchmark uses too.
from devstack.manifests import container, find, pod_containers, render_k8s  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
KUSTOMIZE = ROOT / ".tools" / "bin" / "kustomize"
DOCKERFILES = {kind: ROOT / f"Dockerfile.{kind}" for kind in ("server", "envoy", "swagger-ui")}
ENVOY_CONFIG = ROOT / "envoy" / "envoy.yaml"


@dataclasses.dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the logical line, continuations joined

    def json_args(self) -> list[str]:
        """The exec form of CMD/ENTRYPOINT (a JSON array)."""
        return json.loads(self.args)


@dataclasses.dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction]
    text: str  # the stage's instructions as written, for comparing stages across files

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    @property
    def workdir(self) -> PurePosixPath:
        path = PurePosixPath("/")
        for i in self.all("WORKDIR"):
            path = path / i.args.strip()
        return path

    def env(self) -> dict[str, str]:
        """ENV key=value pairs (the only ENV form these Dockerfiles use)."""
        values: dict[str, str] = {}
        for i in self.all("ENV"):
            for word in shlex.split(i.args):
                key, _, value = word.partition("=")
                values[key] = value
        return values

    def copies(self) -> list[tuple[str | None, list[str], PurePosixPath]]:
        """(--from stage or None, sources, absolute destination) of every COPY."""
        result = []
        for i in self.all("COPY"):
            words = i.args.split()
            source_stage = None
            while words[0].startswith("--"):
                flag = words.pop(0)
                if flag.startswith("--from="):
                    source_stage = flag.split("=", 1)[1]
            *sources, dest = words
            result.append((source_stage, sources, self.workdir / dest))
        return result


def parse_dockerfile(path: Path) -> list[Stage]:
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=words[0], instructions=[], text=""))
            continue
        stages[-1].instructions.append(Instruction(keyword, args.strip()))
        stages[-1].text += f"{keyword} {args.strip()}\n"
    return stages


@functools.cache
def dockerfile(kind: str) -> tuple[Stage, ...]:
    return tuple(parse_dockerfile(DOCKERFILES[kind]))


def final_stage(kind: str) -> Stage:
    return dockerfile(kind)[-1]


def stage(kind: str, name: str) -> Stage:
    return next(s for s in dockerfile(kind) if s.name == name)


def image_command(kind: str) -> list[str]:
    """ENTRYPOINT + CMD of the final image, as Docker runs them (exec form only)."""
    final = final_stage(kind)
    entry, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    return (entry.json_args() if entry else []) + (cmd.json_args() if cmd else [])


# --- .dockerignore (the semantics of Docker's pattern matcher, for the patterns used here) ---

def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax: `*` and `?` stay within one path element, `**/` spans any number
    of directories (none included)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(f"^{out}$")


def dockerignore_excludes(ignore_file: Path):
    """A predicate: is this repository-relative path left out of the build context?"""
    rules = []
    for raw in ignore_file.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = str(PurePosixPath(pattern.strip("/")))
        rules.append((negate, _pattern_regex(pattern)))

    def excluded(rel: str) -> bool:
        parts = PurePosixPath(rel).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negate, regex in rules:
            if any(regex.match(p) for p in prefixes):
                result = not negate
        return result

    def prunable(rel_dir: str) -> bool:
        """Nothing below this excluded directory can be admitted again by a `!` pattern."""
        return excluded(rel_dir) and not any(
            negate and ("**" in regex.pattern or regex.pattern.startswith("^" + re.escape(rel_dir + "/")))
            for negate, regex in rules)

    excluded.prunable = prunable
    return excluded


def context_files(excluded) -> list[str]:
    """The files `docker build .` would send (a walk of the repository root, skipping directories
    the ignore file leaves out entirely)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = Path(dirpath).relative_to(ROOT).as_posix()
        rel = "" if rel == "." else rel + "/"
        dirnames[:] = [d for d in dirnames if not excluded.prunable(rel + d)]
        files.extend(rel + f for f in filenames if not excluded(rel + f))
    return files


# --- compose, Kubernetes, Envoy ---

def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 anchors: a name may be anchored again, later aliases refer to the latest one
    (Envoy's parser allows it, PyYAML's does not)."""

    def compose_node(self, parent, index):
        if not self.check_event(yaml.events.AliasEvent):
            anchor = self.peek_event().anchor
            if anchor is not None:
                self.anchors.pop(anchor, None)
        return super().compose_node(parent, index)


@functools.cache
def envoy_config(path: Path = ENVOY_CONFIG) -> dict:
    return yaml.load(path.read_text(), Loader=_YamlLoader)


def envoy_listener_port(name: str = "payments_api") -> int:
    """The port of one of Envoy's listeners: the API's (payments_api) or the statistics' (metrics)."""
    listeners = {l["name"]: l for l in envoy_config()["static_resources"]["listeners"]}
    assert set(listeners) == {"payments_api", "metrics"}, set(listeners)
    return listeners[name]["address"]["socket_address"]["port_value"]


def envoy_admin_port() -> int:
    return envoy_config()["admin"]["address"]["socket_address"]["port_value"]


def envoy_backend() -> tuple[str, int]:
    """The first server process's address in Envoy's clusters (the others are on the next ports)."""
    cluster = envoy_config()["static_resources"]["clusters"][0]
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    return address["address"], address["port_value"]


def envoy_file_paths() -> list[str]:
    """Every file envoy.yaml reads (`filename:` values and the transcoder's descriptor)."""
    text = ENVOY_CONFIG.read_text()
    found = re.findall(r"\b(?:filename|proto_descriptor):\s*([^\s,{}\[\]]+)", text)
    return sorted(set(found))


def lock_versions() -> dict[str, str]:
    versions = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            versions[normalize(m.group(1))] = m.group(2)
    return versions


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


