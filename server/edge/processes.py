"""Several server processes, one gRPC server in each: the pattern of grpc's own
examples/python/multiprocessing. One Python process is held to about one core by the GIL, so on a
machine or pod with N CPUs, N processes serve (PAYMENTS_PROCESSES, default the CPUs available:
server/infra/cpus.py).

The processes are forked before any gRPC object exists (grpc's C core does not survive a fork with
live channels or servers), and each listens on a port of its own, `port + i`: the kernel's
SO_REUSEPORT spreads *connections*, and Envoy holds only a few long-lived HTTP/2 connections to its
upstream, so one shared port left whole connections - most of the load - on one process. Envoy's
clusters list the ports as separate endpoints instead and balance each request (envoy/envoy.yaml).

What the processes share, and how:
  - the page-token key: made here before the fork when PAYMENTS_PAGE_TOKEN_SECRET is unset, so a
    page token from one process is good in every other;
  - the scheduled jobs: process 0 runs them (the cross-replica claim would keep each tick once
    anyway, but N schedulers would each wake for nothing);
  - the database: SQLite in WAL mode takes writers from several processes (its lock is the file's);
    PostgreSQL pools are per process (PAYMENTS_DB_POOL_SIZE each);
  - stdout: every log line is one write, so lines from different processes do not interleave.
What they do not share: the verified-token and session caches (a revocation reaches each within
PAYMENTS_REVOCATION_CHECK_SECONDS, server/domain/sessions.py) and the login throttle (per email and
client address, server/domain/login_throttle.py) are per process; so is the access log's flushing
thread, started again in each child after the fork (server/infra/logs.py).

This process supervises: SIGTERM or SIGINT is passed to every server process, which drains as a
single one does (NOT_SERVING, then in-flight calls within PAYMENTS_GRACE_SECONDS); a server process
that exits on its own is replaced, unless that happened more than MAX_RESTARTS times in a minute, and
then every process is stopped and this one exits 1, so the orchestrator restarts the pod. A server
process also stops if this one dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import secrets
import signal
import threading
import time

from server.infra.config import Settings

MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
_PR_SET_PDEATHSIG = 1

log = logging.getLogger("server")


def serve(settings: Settings) -> int:
    """One server in this process until SIGTERM or SIGINT; the exit status."""
    from server.edge import app  # gRPC objects only from here on: after any fork
    from server.infra import metrics

    try:
        metrics.serve(settings)
        running = app.build(settings)
    except (OSError, ValueError, RuntimeError) as e:
        log.error("cannot start: %s", e)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    running.stop()
    return 0


def settings_for(settings: Settings, index: int, page_token_secret: bytes) -> Settings:
    host, port = settings.listen_addr.rsplit(":", 1)
    return dataclasses.replace(settings, listen_addr=f"{host}:{int(port) + index if int(port) else 0}",
                               jobs_enabled=settings.jobs_enabled and index == 0,
                               page_token_secret=page_token_secret, processes=1,
                               metrics_addr="")  # the supervisor serves every process's metrics


def _child(settings: Settings) -> None:
    try:  # stop with the supervisor, even if it is killed
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    raise SystemExit(serve(settings))


def supervise(settings: Settings) -> int:
    from server.infra import metrics

    context = multiprocessing.get_context("fork")
    secret = settings.page_token_secret or secrets.token_bytes(32)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def start(index: int) -> multiprocessing.Process:
        process = context.Process(target=_child, args=(settings_for(settings, index, secret),), name=f"server-{index}")
        process.start()
        return process

    status = 0
    workers = {i: start(i) for i in range(settings.processes)}
    try:
        metrics.serve(settings)  # after the first fork: those children hold no copy of its socket
    except OSError as e:
        log.error("cannot start: %s", e)
        stop.set()
        status = 1
    log.info("server processes started", extra={"processes": settings.processes,
                                                 "pids": [p.pid for p in workers.values()]})
    exits: collections.deque[float] = collections.deque()
    while not stop.is_set():
        multiprocessing.connection.wait([p.sentinel for p in workers.values()], timeout=0.5)
        for index, process in list(workers.items()):
            if process.is_alive() or stop.is_set():
                continue
            now = time.monotonic()
            exits.append(now)
            while exits and exits[0] < now - RESTART_WINDOW_SECONDS:
                exits.popleft()
            if len(exits) > MAX_RESTARTS:
                log.error("server processes keep exiting; stopping", extra={"server_process": index,
                                                                            "exitcode": process.exitcode})
                status = 1
                stop.set()
                break
            log.error("server process exited; starting another", extra={"server_process": index,
                                                                         "exitcode": process.exitcode})
            metrics.forget(process.pid)
            workers[index] = start(index)
    for process in workers.values():
        if process.is_alive():
            process.terminate()  # SIGTERM: each drains on its own
    deadline = time.monotonic() + settings.grace_seconds + 10
    for process in workers.values():
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.error("server process did not stop in time; killing it", extra={"pid": process.pid})
            process.kill()
            process.join()
    log.info("server processes stopped")
    return status
