"""grpc.health.v1 with its messages sent outside its lock.

grpc_health's HealthServicer (non-blocking mode, which the server uses so that a Watch holds no
thread) sends a Watch's messages while holding its lock, and a send waits for grpc's one event
thread; that thread runs each ended Watch's close callback, which takes the same lock. Two Watch
calls at once, one of them ending (cancelled by its client, ended by Envoy's stream limit or the
server's), stopped the whole server for good: the event thread waited for the lock, the lock's
holder for the event thread, and every Check, every call after it, waited behind them (12 Watch
calls 4 at a time, each cancelled after its first message; Envoy's /ready 503 from then on).

Here the lock only guards the maps and is never held across a send, so the close callbacks on the
event thread wait for nothing that waits for them. Sends take a lock of their own, which the event
thread never takes, so a status change and a new Watch's first message keep their order: a Watch
never ends on an older status than the current one.
"""

from __future__ import annotations

import threading

from grpc_health.v1 import health, health_pb2

UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health.HealthServicer):
    def __init__(self, experimental_non_blocking: bool = True, experimental_thread_pool=None):
        super().__init__(experimental_non_blocking=experimental_non_blocking,
                         experimental_thread_pool=experimental_thread_pool)
        self._sends = threading.Lock()

    def Watch(self, request, context, send_response_callback=None):
        if send_response_callback is None:  # blocking mode: grpc_health's sends only queue a message
            return super().Watch(request, context)
        service = request.service
        closed = self._on_close_callback(send_response_callback, service)
        with self._sends:
            with self._lock:
                status = self._server_status.get(service, UNKNOWN)
                self._send_response_callbacks.setdefault(service, set()).add(send_response_callback)
            if not context.add_callback(closed):  # already over: no close callback will come
                closed()
                return None
            send_response_callback(health_pb2.HealthCheckResponse(status=status))
        return None

    def _on_close_callback(self, send_response_callback, service):
        def callback():
            with self._lock:
                self._send_response_callbacks.get(service, set()).discard(send_response_callback)
            send_response_callback(None)

        return callback

    def set(self, service, status):
        with self._sends:
            self._set(service, status)

    def _set(self, service, status) -> None:
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._server_status[service] = status
            watchers = list(self._send_response_callbacks.get(service, ()))
        for send_response_callback in watchers:
            send_response_callback(health_pb2.HealthCheckResponse(status=status))

    def enter_graceful_shutdown(self):
        with self._sends:
            with self._lock:
                if self._gracefully_shutting_down:
                    return
                services = list(self._server_status)
            for service in services:
                self._set(service, NOT_SERVING)
            with self._lock:
                self._gracefully_shutting_down = True
