"""`python -m server`: the entry point of `make run` and of the server image."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from server.infra import config, logs


def main() -> int:
    try:
        settings = config.load()
    except config.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    from server.edge import app  # after logging is set up, so start-up logs are JSON too

    try:
        running = app.build(settings)
    except (OSError, ValueError, RuntimeError) as e:
        logging.getLogger("server").error("cannot start: %s", e)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
