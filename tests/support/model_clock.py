"""The clock of the model-based tests of sessions and service clients: the rules' wall clock and
the revocation checks' monotonic clock, moved together, in whole milliseconds, by the test."""

from __future__ import annotations

import datetime as dt


class ModelClock:
    def __init__(self):
        self.ms = 0
        self.start = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)

    def wall(self) -> dt.datetime:
        return self.start + dt.timedelta(milliseconds=self.ms)

    def mono(self) -> float:
        return 1000.0 + self.ms / 1000
