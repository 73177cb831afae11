"""The one place that imports the generated stubs, so a missing generation step fails with the
command that fixes it instead of a bare ModuleNotFoundError deep in an import chain."""

from __future__ import annotations

try:
    from payments_client._gen.payments.v1 import payments_pb2, payments_pb2_grpc
except ModuleNotFoundError as missing:  # pragma: no cover - exercised only on a fresh checkout
    if not (missing.name or "").startswith("payments_client._gen"):
        raise
    raise ImportError("payments_client's generated stubs are missing: run clients/python/gen.sh") from missing

__all__ = ["payments_pb2", "payments_pb2_grpc"]
