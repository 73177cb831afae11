"""The baseline: PaymentService with handlers that do nothing, on the real server's thread-pool
settings (PAYMENTS_WORKER_THREADS, PAYMENTS_MAX_CONCURRENT_RPCS), with gRPC health so Envoy can
route to it. No interceptors, no database: what Python gRPC itself can do on this machine.

    python bench/empty_server.py   # listens on PAYMENTS_LISTEN_ADDR, logs {"message": "listening", "port": N}
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

from server.infra import config  # noqa: E402
from server.edge.pb import payments_pb2 as pb  # noqa: E402
from server.edge.pb import payments_pb2_grpc as pb_grpc  # noqa: E402


class EmptyPayments(pb_grpc.PaymentServiceServicer):
    def GetPayment(self, request, context):
        return pb.Payment()

    def ListPayments(self, request, context):
        return pb.ListPaymentsResponse()

    def CreatePayment(self, request, context):
        return pb.Payment()

    def CreateRefund(self, request, context):
        return pb.Refund()


def main() -> int:
    settings = config.load()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=settings.worker_threads),
                         maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
                         options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_PaymentServiceServicer_to_server(EmptyPayments(), server)
    checks = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port(settings.listen_addr)
    server.start()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    print(json.dumps({"message": "listening", "port": port}), file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
