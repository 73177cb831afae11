"""The Kubernetes manifests as `kustomize build` renders them, parsed, and the parts of them that
the container tests and the image benchmark start pods from (a Deployment's containers)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZE = ROOT / ".tools" / "bin" / "kustomize"


def render_k8s(directory: Path | None = None) -> list[dict]:
    """`kustomize build` of a directory, by default the GKE overlay k8s/overlays/gke (the pinned
    kustomize in .tools/bin, built by `make setup`)."""
    out = subprocess.run([str(KUSTOMIZE), "build", str(directory or ROOT / "k8s" / "overlays" / "gke")],
                         check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    for obj in objects:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind}/{name} in the rendered manifests")


def pod_containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers", [])) + list(pod_spec["containers"])


def container(pod_spec: dict, name: str) -> dict:
    for c in pod_containers(pod_spec):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")
