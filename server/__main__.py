"""`python -m server`: the entry point of `make run` and of the server image. One server process,
or several under a supervisor (PAYMENTS_PROCESSES; server/edge/processes.py)."""

from __future__ import annotations

import sys

from server.infra import config, logs


def main() -> int:
    try:
        settings = config.load()
    except config.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    from server.edge import processes  # after logging is set up, so start-up logs are JSON too

    return processes.serve(settings) if settings.processes == 1 else processes.supervise(settings)


if __name__ == "__main__":
    sys.exit(main())
