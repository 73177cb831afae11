"""A bounded map for what a server process remembers per caller (sessions, service clients)."""

from __future__ import annotations

import collections
import threading


class Remembered:
    """A bounded map whose least recently used entry is evicted, one at a time, when it is full.

    Reads take no lock (OrderedDict's get and move_to_end are each one step under the GIL: a
    third of the cost of a locked read on the path of every call); writes and evictions do."""

    def __init__(self, bound: int):
        self.bound = bound
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        value = self._entries.get(key)
        if value is not None:
            try:
                self._entries.move_to_end(key)
            except KeyError:  # evicted by another thread in between: still a hit this time
                pass
        return value

    def put(self, key, value) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            if len(self._entries) > self.bound:
                self._entries.popitem(last=False)

    def pop(self, key) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
