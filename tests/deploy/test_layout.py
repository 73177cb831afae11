"""Who may import whom, across the repository's top-level folders: the benchmarks and the dev stack
run without the tests (`make bench`, `make run`), so what they share with the tests lives in
devstack/, which the tests import, never the other way round."""

from __future__ import annotations

import ast

import pytest

from tests.support.deploy import ROOT


def _imported(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", ["bench", "devstack"])
def test_benchmarks_and_the_dev_stack_import_nothing_from_the_tests(folder):
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files
    reaching = {str(f.relative_to(ROOT)): sorted(n for n in _imported(f) if n == "tests" or n.startswith("tests."))
                for f in files}
    assert {f: names for f, names in reaching.items() if names} == {}
