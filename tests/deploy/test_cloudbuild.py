"""cloudbuild.yaml, which docs/deploy.md's Google Cloud steps run: valid for Cloud Build, it builds the three
Dockerfiles and pushes them under the names the Kubernetes overlay deploys."""

from __future__ import annotations

import subprocess

import yaml

from tests.support import deploy as support
from tests.support.deploy import ROOT


def test_cloudbuild_config_is_valid():
    result = subprocess.run([str(support.BIN / "check-jsonschema"), "--builtin-schema", "vendor.cloudbuild",
                             str(ROOT / "cloudbuild.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cloudbuild_builds_and_pushes_every_image_as_the_overlay_names_them():
    config = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    built = {}
    for step in config["steps"]:
        args = step["args"]
        assert args[0] == "build" and args[-1] == "."
        built[args[args.index("-f") + 1]] = args[args.index("-t") + 1]
    assert built == {f"Dockerfile.{kind}": f"${{_REPO}}/{kind}:${{_TAG}}" for kind in support.DOCKERFILES}
    assert sorted(config["images"]) == sorted(built.values())
    overlay = yaml.safe_load((ROOT / "k8s" / "overlays" / "gke" / "kustomization.yaml").read_text())
    names = {i["name"]: i["newName"] for i in overlay["images"]}
    assert names["payments-server"].endswith("/payments/server")
    for kind in support.DOCKERFILES:
        assert names[f"payments-{kind}"].endswith(f"/payments/{kind}")
