"""The benchmark's peer: `GET /v1/payments/{id}` as a team would write it with FastAPI instead of
this project, the way FastAPI's documentation teaches (an `async def` path operation, a header
dependency, PyJWT verifying the bearer token on every request), served by uvicorn with 1 or 2
workers. It reads the same SQLite file and the same ES256 keys as the server under test, applies the
same rule (a customer sees their own payments, an admin any), and answers the same JSON bytes as
the project's REST API through Envoy (proto3 JSON: int64 as a string, enums by name, defaults left
out); bench/run.py checks that before measuring. Its dependencies are bench/peer/requirements.lock,
in a virtualenv of its own (.venv-peer), never the server's.

    PEER_DB=... PEER_JWKS=... uvicorn app:app --app-dir bench/peer --workers 2 --port PORT
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3

import jwt
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import Response

ISSUER, AUDIENCE = os.environ.get("PEER_ISSUER", "payments"), os.environ.get("PEER_AUDIENCE", "payments-api")
with open(os.environ["PEER_JWKS"]) as f:
    KEYS = {k["kid"]: jwt.PyJWK(k) for k in json.load(f)["keys"]}
# One connection per worker process; uvicorn runs every `async def` on the event loop's thread.
DB = sqlite3.connect(f"file:{os.environ['PEER_DB']}?mode=ro", uri=True, check_same_thread=False)
COLUMNS = ("id", "email", "amount", "currency", "description", "status", "failure_reason", "request_id",
           "created_at", "updated_at", "expires_at", "owner_id", "deleted_at")
QUERY = f"SELECT {', '.join(COLUMNS)} FROM payments WHERE id = ? AND deleted_at IS NULL"
OWNER = COLUMNS.index("owner_id")

app = FastAPI()


def _timestamp(value: str | None) -> str | None:
    """proto3 JSON's form of a stored timestamp: RFC 3339, UTC, 0, 3 or 6 fractional digits."""
    if not value:
        return None
    at = dt.datetime.fromisoformat(value)
    text = at.strftime("%Y-%m-%dT%H:%M:%S")
    if at.microsecond:
        text += f".{at.microsecond:06d}"[:4] if at.microsecond % 1000 == 0 else f".{at.microsecond:06d}"
    return text + "Z"


def _json(row: tuple) -> bytes:
    p = dict(zip(COLUMNS, row))
    fields = {
        "id": p["id"], "email": p["email"], "amount": str(p["amount"]) if p["amount"] else None,
        "currency": p["currency"], "description": p["description"], "status": p["status"].upper(),
        "failure_reason": (p["failure_reason"] or "").upper() or None, "request_id": p["request_id"],
        "created_at": _timestamp(p["created_at"]), "updated_at": _timestamp(p["updated_at"]),
        "expires_at": _timestamp(p["expires_at"]), "owner_id": p["owner_id"], "deleted_at": _timestamp(p["deleted_at"]),
    }
    return json.dumps({k: v for k, v in fields.items() if v}, separators=(",", ":")).encode()


@app.get("/v1/payments/{payment_id}")
async def get_payment(payment_id: str, authorization: str = Header(default="")) -> Response:
    scheme, _, token = authorization.partition(" ")
    try:
        key = KEYS[jwt.get_unverified_header(token)["kid"]]
        claims = jwt.decode(token, key.key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER)
    except (jwt.InvalidTokenError, KeyError):
        raise HTTPException(status_code=401, detail="invalid token")
    if scheme.lower() != "bearer":
        raise HTTPException(status_code=401, detail="bearer token required")
    row = DB.execute(QUERY, (payment_id,)).fetchone()
    if row is None or (claims.get("role") != "admin" and row[OWNER] != claims["sub"]):
        raise HTTPException(status_code=404, detail="payment not found")
    return Response(_json(row), media_type="application/json")
