"""clients/python as the tests use it: a copy of its handwritten code in a temporary directory with
its stubs generated there by its own command (clients/python/gen.sh), so every run proves that the
one command makes what the package needs, and nothing in the tree is written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON_CLIENT = ROOT / "clients" / "python"


def generated_copy(dest: Path) -> Path:
    """dest/python: payments_client (with _gen made by gen.sh), shop and pyproject.toml."""
    copy = dest / "python"
    ignore = shutil.ignore_patterns("_gen", "__pycache__")
    for package in ("payments_client", "shop"):
        shutil.copytree(PYTHON_CLIENT / package, copy / package, ignore=ignore)
    shutil.copy2(PYTHON_CLIENT / "pyproject.toml", copy / "pyproject.toml")
    made = subprocess.run([str(PYTHON_CLIENT / "gen.sh"), str(copy)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    return copy


def import_from(copy: Path):
    """The payments_client package of `copy`, imported into this process."""
    if str(copy) not in sys.path:
        sys.path.insert(0, str(copy))
    import payments_client

    assert Path(payments_client.__file__).parent == copy / "payments_client", payments_client.__file__
    return payments_client


_shared: list[Path] = []


def shared_copy(tmp_path_factory) -> Path:
    """One generated copy per test session: the package can be imported into a process only once."""
    if not _shared:
        _shared.append(generated_copy(tmp_path_factory.mktemp("python-client")))
    return _shared[0]
