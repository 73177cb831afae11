"""What the model-based tests reached, printed at the end of the run (tests/conftest.py's
pytest_terminal_summary): a run that never reached a transition did not test it."""

from __future__ import annotations

import collections

REACHED: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def reached(machine: str, transition: str) -> None:
    REACHED[machine][transition] += 1


def summary() -> list[str]:
    lines = []
    for machine, counts in sorted(REACHED.items()):
        lines.append(f"{machine}: {len(counts)} transitions reached")
        for name, n in sorted(counts.items()):
            lines.append(f"  {n:6d}  {name}")
    return lines
