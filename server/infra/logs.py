"""Logging: one JSON object per line on stderr, so log pipelines (Cloud Logging, jq) need no parser.

The access log (logger "server.access", a line per call) is written in batches: a write to
stderr per call, each one letting go of the GIL and waiting to get it back behind the other
handler threads, cost a fifth of a GetPayment under load. Its lines are buffered and written
every FLUSH_SECONDS by a background thread, and at once with any other line (so a warning
or an error is never held back, and the lines stay in order). A process killed with -9
loses at most the last FLUSH_SECONDS of access lines; a normal exit writes them all. The flushing
thread is started again in every forked child (the server processes of a supervisor), and the
buffer is written out before a fork, so no child inherits lines to write twice.
Its lines are also made without logging's LogRecord and formatter (`access`), which took
more time than the rest of a GetPayment's own work.

No secret reaches the log at any level: peewee's statement log (DEBUG) would carry every
statement's parameters - password hashes, refresh token hashes, webhook secrets - so its lines
keep the SQL and drop the parameters (`SqlOnly`); access lines never hold a request or a token.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import sys
import threading
import time

from server.infra import tracing

ACCESS = "server.access"
FLUSH_SECONDS = 0.2

_RESERVED = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_encode = json.JSONEncoder(default=str).encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "severity": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # Structured fields passed as logging's `extra=` become top-level keys.
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")})
        if (trace := tracing.current_fields()) is not None:  # a line written during a call
            entry.update(trace)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _encode(entry)


class BatchingHandler(logging.StreamHandler):
    """A StreamHandler on a buffered stream: every record is written and flushed at once, as by
    any StreamHandler, while access lines (`write`) wait in the buffer for the next flush."""

    def write(self, line: str) -> None:
        """An access line, already formatted."""
        with self.lock:
            self.stream.write(line)

    def start_flushing(self, interval: float = FLUSH_SECONDS) -> None:
        """Flush every `interval` from a background thread, in this process and in every process
        forked from it (a thread does not survive a fork: without this, a child's access lines
        waited for its next line of another kind)."""
        def flush_regularly():
            while True:
                time.sleep(interval)
                self.flush()

        def start():
            threading.Thread(target=flush_regularly, name="log-flush", daemon=True).start()

        start()
        if not self._forks_handled:
            self._forks_handled = True
            os.register_at_fork(before=self.flush, after_in_child=start)

    _forks_handled = False


class SqlOnly(logging.Filter):
    """peewee logs each statement as (sql, params) at DEBUG: keep the SQL, never the parameters."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("peewee") and isinstance(record.msg, tuple) and record.msg:
            record.msg, record.args = str(record.msg[0]), ()
        return True


_access = logging.getLogger(ACCESS)
_batching: BatchingHandler | None = None  # set by configure()
_quoted: dict[str, str] = {}  # method name -> JSON string; only methods the server serves


def access(level: int, method: str, code: str, duration_ms: float, trace: dict | None = None) -> None:
    """One access line: method, status code, duration, the call's trace fields; never the request
    or its token. The same JSON as the formatter makes of the record `_access.log(level, "rpc", extra=...)`."""
    if not _access.isEnabledFor(level):
        return
    handler = _batching
    if handler is None:  # logging set up by someone else (tests, an embedding program)
        _access.log(level, "rpc", extra={"method": method, "code": code, "duration_ms": duration_ms, **(trace or {})})
        return
    quoted = _quoted.get(method) or _quoted.setdefault(method, _encode(method))
    now = dt.datetime.fromtimestamp(time.time(), dt.timezone.utc).isoformat(timespec="milliseconds")
    traced = tracing.log_fragment(trace) if trace else ""
    handler.write(f'{{"time": "{now}", "severity": "{logging.getLevelName(level)}", "logger": "{ACCESS}", '
                  f'"message": "rpc", "method": {quoted}, "code": "{code}", "duration_ms": {duration_ms!r}{traced}}}\n')


def configure(level: str = "INFO") -> None:
    global _batching
    # Buffered (not line-buffered like sys.stderr); the handler decides when lines go out.
    stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(sys.stderr.fileno(), "w", closefd=False), 1 << 16),
                              encoding="utf-8", errors="backslashreplace", write_through=False)
    handler = BatchingHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SqlOnly())
    logging.getLogger("peewee").addFilter(SqlOnly())  # whichever handler a record reaches
    handler.start_flushing()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    _batching = handler
    root.setLevel(level)
    logging.getLogger("apscheduler").setLevel(max(logging.getLevelName(level), logging.WARNING))
