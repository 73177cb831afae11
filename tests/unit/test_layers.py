"""The domain stands on its own (README, server/domain/ports.py): no module of server/domain
imports peewee, grpc or the infrastructure, and the server's assembly hands the rules every port
they use, so the rules run as well on adapters a test hands them (tests/unit/test_domain_ports.py)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from server.domain import ports

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = ROOT / "server" / "domain"
# What the rules must not know of: SQL, the wire, and the adapters (whichever of them is meant).
FORBIDDEN = ("peewee", "playhouse", "psycopg2", "grpc", "grpc_status", "grpc_health", "grpc_reflection",
             "google.rpc", "argon2", "jwt", "apscheduler", "server.infra", "server.edge")


def _forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def forbidden_imports(source: str, package: str = "server.domain") -> list[str]:
    """The forbidden modules a module's source imports, however it spells the import: `import x`,
    `from x import y`, a relative `from ..infra import y`, or importlib/__import__ with a literal."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            candidates = [module] + [f"{module}.{a.name}" for a in node.names]
            found += [m for m in candidates if _forbidden(m)][:1]
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                if _forbidden(str(node.args[0].value)):
                    found.append(str(node.args[0].value))
    return found


def test_the_checker_sees_every_spelling_of_an_import():
    source = "\n".join([
        "import peewee",
        "import grpc.aio as aio",
        "from server.infra.storage import User",
        "from server.infra import passwords",
        "from server import infra",
        "from ..infra import tokens",
        "import importlib; importlib.import_module('server.edge.app')",
        "__import__('playhouse.pool')",
        "import hashlib, datetime",
        "from server.domain.records import PaymentRecord",
        "from . import ports",
    ])
    assert forbidden_imports(source) == ["peewee", "grpc.aio", "server.infra.storage", "server.infra",
                                         "server.infra", "server.infra", "server.edge.app", "playhouse.pool"]


@pytest.mark.parametrize("path", sorted(DOMAIN.glob("*.py")), ids=lambda p: p.name)
def test_no_domain_module_imports_sql_grpc_or_the_infrastructure(path):
    assert forbidden_imports(path.read_text()) == [], path


def test_importing_the_whole_domain_loads_none_of_them():
    """In a fresh interpreter, so what this test process already loaded cannot hide an import."""
    modules = [f"server.domain.{p.stem}" for p in sorted(DOMAIN.glob("*.py")) if p.stem != "__init__"]
    probe = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
             f"print('\\n'.join(sorted(m for m in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                            check=True, timeout=60).stdout.split()
    assert "server.domain.accounts" in loaded and "server.domain.sessions" in loaded
    assert [m for m in loaded if _forbidden(m)] == []


def test_the_assembly_hands_every_port(settings, monkeypatch):
    """With no default adapter installed, the server still builds and serves sign-up, login,
    refresh and a checked call, and the jobs get their session store: app.py hands each port."""
    from server.edge import app
    from server.edge.pb import payments_pb2 as pb
    from server.edge.pb import payments_pb2_grpc as pb_grpc
    from server.infra import jobs

    monkeypatch.setattr(ports, "_defaults", {})
    with pytest.raises(LookupError):
        ports.default(ports.SessionStore)
    running = app.build(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            auth = pb_grpc.AuthServiceStub(channel)
            auth.Register(pb.RegisterRequest(email="ports@example.com", password="a long password"))
            login = auth.Login(pb.LoginRequest(email="ports@example.com", password="a long password"))
            again = auth.Refresh(pb.RefreshRequest(refresh_token=login.refresh_token))
            assert again.refresh_token != login.refresh_token
            metadata = (("authorization", f"Bearer {again.access_token}"),)
            pb_grpc.PaymentServiceStub(channel).ListPayments(pb.ListPaymentsRequest(), metadata=metadata)
        assert [job.name for job in jobs.payment_jobs(settings, running.rules)]
    finally:
        running.stop(grace=0.5)
