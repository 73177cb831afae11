"""`python -m server`: the entry point of `make run` and of the server image. One server process,
or several under a supervisor (PAYMENTS_PROCESSES; server/edge/processes.py)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from server.infra import config, logs

METRICS_DIR_PREFIX = "payments-metrics-"


def prepare_metrics_dir() -> None:
    """A fresh directory where each of several server processes keeps its metric values (server/infra/metrics.py),
    set before anything imports prometheus_client: that import decides where values live. Fresh,
    so counters of an earlier run are not added to this one's."""
    old = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if os.path.basename(old.rstrip("/")).startswith(METRICS_DIR_PREFIX):
        shutil.rmtree(old, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)


def main() -> int:
    try:
        settings = config.load()
    except config.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    if settings.processes > 1:  # one process counts in memory: a third of the cost per call
        prepare_metrics_dir()
    from server.edge import processes  # after logging is set up, so start-up logs are JSON too

    try:
        return processes.serve(settings) if settings.processes == 1 else processes.supervise(settings)
    finally:
        if settings.processes > 1:
            shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
