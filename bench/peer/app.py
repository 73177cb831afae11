"""The benchmark's peer: `GET /v1/payments/{id}` and the first page of `GET /v1/payments` as a team
would write them with FastAPI instead of this project, the way FastAPI's documentation teaches (an `async def` path operation, a header
dependency, PyJWT verifying the bearer token on every request), served by uvicorn with 1 or 2
workers. It reads the same SQLite file and the same ES256 keys as the server under test, applies the
same rule (a customer sees their own payments, an admin any), and answers the same JSON bytes as
the project's REST API through Envoy (proto3 JSON: int64 as a string, enums by name, defaults left
out; a page's next_page_token is its own HMAC of where the page ended, as the project's is);
bench/versus.py checks that before measuring. Its dependencies are bench/peer/requirements.lock,
in a virtualenv of its own (.venv-peer), never the server's.

    PEER_DB=... PEER_JWKS=... uvicorn app:app --app-dir bench/peer --workers 2 --port PORT
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
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
# Newest first, as the project pages (its index on owner_id, created_at, id serves both).
PAGE = (f"SELECT {', '.join(COLUMNS)} FROM payments WHERE owner_id = ? AND deleted_at IS NULL "
        "ORDER BY created_at DESC, id DESC LIMIT ?")
ADMIN_PAGE = (f"SELECT {', '.join(COLUMNS)} FROM payments WHERE deleted_at IS NULL "
              "ORDER BY created_at DESC, id DESC LIMIT ?")
PAGE_KEY = os.urandom(32)

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
    return json.dumps(_fields(row), separators=(",", ":")).encode()


def _fields(row: tuple) -> dict:
    p = dict(zip(COLUMNS, row))
    fields = {
        "id": p["id"], "email": p["email"], "amount": str(p["amount"]) if p["amount"] else None,
        "currency": p["currency"], "description": p["description"], "status": p["status"].upper(),
        "failure_reason": (p["failure_reason"] or "").upper() or None, "request_id": p["request_id"],
        "created_at": _timestamp(p["created_at"]), "updated_at": _timestamp(p["updated_at"]),
        "expires_at": _timestamp(p["expires_at"]), "owner_id": p["owner_id"], "deleted_at": _timestamp(p["deleted_at"]),
    }
    return {k: v for k, v in fields.items() if v}


def _caller(authorization: str) -> dict:
    scheme, _, token = authorization.partition(" ")
    try:
        key = KEYS[jwt.get_unverified_header(token)["kid"]]
        claims = jwt.decode(token, key.key, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER)
    except (jwt.InvalidTokenError, KeyError):
        raise HTTPException(status_code=401, detail="invalid token")
    if scheme.lower() != "bearer":
        raise HTTPException(status_code=401, detail="bearer token required")
    return claims


def _page_token(row: tuple) -> str:
    where = json.dumps([row[COLUMNS.index("created_at")], row[0]]).encode()
    mac = hmac.new(PAGE_KEY, where, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(where + mac).decode().rstrip("=")


@app.get("/v1/payments")
async def list_payments(page_size: int = 20, authorization: str = Header(default="")) -> Response:
    claims = _caller(authorization)
    if not 1 <= page_size <= 100:
        raise HTTPException(status_code=400, detail="page_size must be between 1 and 100")
    if claims.get("role") == "admin":
        rows = DB.execute(ADMIN_PAGE, (page_size + 1,)).fetchall()
    else:
        rows = DB.execute(PAGE, (claims["sub"], page_size + 1)).fetchall()
    body = {"payments": [_fields(r) for r in rows[:page_size]]}
    if len(rows) > page_size:
        body["next_page_token"] = _page_token(rows[page_size - 1])
    return Response(json.dumps(body, separators=(",", ":")).encode(), media_type="application/json")


@app.get("/v1/payments/{payment_id}")
async def get_payment(payment_id: str, authorization: str = Header(default="")) -> Response:
    claims = _caller(authorization)
    row = DB.execute(QUERY, (payment_id,)).fetchone()
    if row is None or (claims.get("role") != "admin" and row[OWNER] != claims["sub"]):
        raise HTTPException(status_code=404, detail="payment not found")
    return Response(_json(row), media_type="application/json")
