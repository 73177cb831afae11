"""Loops the flood tests run side by side for a while: attackers, probes, and a customer reading
a payment at a steady pace."""

from __future__ import annotations

import threading
import time
from typing import Callable

Loop = Callable[[threading.Event], None]


def run_for(seconds: float, loops: list[Loop]) -> float:
    """Each loop(stop) on a thread of its own for `seconds`, then stop set and every thread joined;
    returns how long they ran."""
    stop = threading.Event()
    threads = [threading.Thread(target=loop, args=(stop,)) for loop in loops]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return time.monotonic() - started


def paced_reads(client, path: str, token: str, into: list[tuple[int, float]], pause: float = 0.1) -> Loop:
    """A customer's GET of `path` every `pause` seconds: (status, seconds it took) into `into`."""
    def loop(stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            status = client.get(path, token=token).status
            into.append((status, time.monotonic() - started))
            time.sleep(pause)

    return loop
