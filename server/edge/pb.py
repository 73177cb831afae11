"""The generated protobuf modules, imported from gen/python (made by `make gen`).

Generated code lives outside server/ so it is never mistaken for handwritten code; this module
is the one place that imports them (server.infra.config says where they are).
"""

from __future__ import annotations

import sys

from server.infra.config import generated_code_dir

GEN_DIR = generated_code_dir()
if not (GEN_DIR / "payments" / "v1" / "payments_pb2.py").exists():
    raise ImportError(f"generated code not found in {GEN_DIR}: run `make gen`")
if str(GEN_DIR) not in sys.path:
    sys.path.insert(0, str(GEN_DIR))

from payments.v1 import payments_pb2, payments_pb2_grpc  # noqa: E402

__all__ = ["payments_pb2", "payments_pb2_grpc", "GEN_DIR"]
