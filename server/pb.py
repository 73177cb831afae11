"""The generated protobuf modules, imported from gen/python (made by `make gen`).

Generated code lives outside server/ so it is never mistaken for handwritten code; this module
is the one place that knows where it is. PAYMENTS_GEN_DIR overrides it (the image uses that).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

GEN_DIR = Path(os.environ.get("PAYMENTS_GEN_DIR") or Path(__file__).resolve().parent.parent / "gen" / "python")
if not (GEN_DIR / "payments" / "v1" / "payments_pb2.py").exists():
    raise ImportError(f"generated code not found in {GEN_DIR}: run `make gen`")
if str(GEN_DIR) not in sys.path:
    sys.path.insert(0, str(GEN_DIR))

from payments.v1 import payments_pb2, payments_pb2_grpc  # noqa: E402

__all__ = ["payments_pb2", "payments_pb2_grpc", "GEN_DIR"]
