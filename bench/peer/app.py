"""The benchmark's peer: `GET /v1/payments/{id}`, the first page of `GET /v1/payments` and
`POST /v1/payments` as a team would write them with FastAPI instead of this project, the way FastAPI's documentation teaches (an `async def` path operation, a header
dependency, PyJWT verifying the bearer token on every request), served by uvicorn with 1 or 2
workers. It reads the same SQLite file and the same ES256 keys as the server under test, applies the
same rule (a customer sees their own payments, an admin any), and answers the same JSON bytes as
the project's REST API through Envoy (proto3 JSON: int64 as a string, enums by name, defaults left
out; a page's next_page_token is its own HMAC of where the page ended, as the project's is);
bench/versus.py checks that before measuring. A create does the project's SQL work: the same
checks of the body (a pydantic model, as FastAPI teaches), the payment and its history row (the
webhook outbox) in one transaction, idempotency on the caller and `request_id` (the unique index
decides a race; a replay is answered from the stored row as it was created, a different body is
409), on a write connection with the server's own durability pragmas (WAL, synchronous=NORMAL). Its dependencies are bench/peer/requirements.lock,
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
import re
import secrets
import sqlite3

import jwt
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel

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
# Writes: a connection of their own, with the pragmas the server gives its SQLite connections.
WRITER = sqlite3.connect(os.environ["PEER_DB"], timeout=5, isolation_level=None, check_same_thread=False)
for pragma in ("journal_mode = wal", "synchronous = normal", "busy_timeout = 5000", "foreign_keys = 1"):
    WRITER.execute(f"PRAGMA {pragma}")
BY_REQUEST = (f"SELECT {', '.join(COLUMNS)}, request_hash FROM payments WHERE created_by = ? AND request_id = ? "
              "LIMIT 1")
INSERT_PAYMENT = ("INSERT INTO payments (id, email, owner_id, amount, currency, description, status, failure_reason, "
                  "created_by, request_id, request_hash, created_at, updated_at, expires_at, deleted_at) "
                  "VALUES (?, ?, ?, ?, ?, ?, 'pending', NULL, ?, ?, ?, ?, ?, ?, NULL)")
INSERT_EVENT = ("INSERT INTO payment_events (id, payment_id, at, action, from_status, to_status, failure_reason, "
                "actor_id, actor_role, dispatched) VALUES (?, ?, ?, 'created', NULL, 'pending', NULL, ?, ?, 0)")
ACCOUNT = "SELECT id FROM users WHERE email = ? LIMIT 1"
TTL = dt.timedelta(seconds=int(os.environ.get("PEER_PAYMENT_TTL_SECONDS", 24 * 3600)))
EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+", re.ASCII)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}", re.ASCII)
CURRENCIES = frozenset(  # ISO 4217, as the project accepts them
    """AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP
    BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL
    GHS GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW
    KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN
    NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK
    SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS
    VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG""".split()
)

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


class NewPayment(BaseModel):
    """The body of POST /v1/payments (the project's `payment` message); int64 arrives as a string."""

    email: str = ""
    amount: int = 0
    currency: str = ""
    description: str = ""
    request_id: str = ""


def _opaque(prefix: str) -> str:
    return prefix + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def _stored(at: dt.datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S.%f")


def _problems(p: NewPayment) -> list[str]:
    problems = []
    if not EMAIL.fullmatch(p.email) or len(p.email) > 254:
        problems.append("payment.email")
    if not 0 < p.amount <= 999_999_999_999_999:
        problems.append("payment.amount")
    if p.currency not in CURRENCIES:
        problems.append("payment.currency")
    if len(p.description) > 500:
        problems.append("payment.description")
    if p.request_id and not REQUEST_ID.fullmatch(p.request_id):
        problems.append("payment.request_id")
    return problems


def _replay(row: tuple, fingerprint: str) -> Response:
    """The stored payment as its create answered: pending, unchanged since, not deleted."""
    if row[-1] != fingerprint:
        raise HTTPException(status_code=409, detail="request_id was already used with a different body")
    if row[COLUMNS.index("deleted_at")] is not None:
        raise HTTPException(status_code=400, detail="request_id belongs to a deleted payment")
    p = dict(zip(COLUMNS, row))
    p.update(status="pending", failure_reason=None, updated_at=p["created_at"], deleted_at=None)
    return Response(_json(tuple(p[c] for c in COLUMNS)), media_type="application/json")


@app.post("/v1/payments")
async def create_payment(payment: NewPayment, authorization: str = Header(default="")) -> Response:
    claims = _caller(authorization)
    payment.email, payment.currency = payment.email.strip().lower(), payment.currency.strip() or "IDR"
    if problems := _problems(payment):
        raise HTTPException(status_code=400, detail={"invalid": problems})
    admin, subject = claims.get("role") == "admin", claims["sub"]
    if not admin and payment.email != claims.get("email"):
        raise HTTPException(status_code=403, detail="customers may create payments only for their own email")
    fingerprint = hashlib.sha256(json.dumps([payment.email, payment.amount, payment.currency, payment.description],
                                            separators=(",", ":")).encode()).hexdigest()
    request_id = payment.request_id or None
    if request_id and (row := WRITER.execute(BY_REQUEST, (subject, request_id)).fetchone()) is not None:
        return _replay(row, fingerprint)
    owner = subject
    if admin:
        account = WRITER.execute(ACCOUNT, (payment.email,)).fetchone()
        if account is None:
            raise HTTPException(status_code=400, detail="no account holds this email")
        owner = account[0]
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    created, expires, payment_id = _stored(now), _stored(now + TTL), _opaque("pay_")
    try:
        WRITER.execute("BEGIN")
        try:
            WRITER.execute(INSERT_PAYMENT, (payment_id, payment.email, owner, payment.amount, payment.currency,
                                            payment.description, subject, request_id,
                                            fingerprint if request_id else None, created, created, expires))
            WRITER.execute(INSERT_EVENT, (_opaque("evt_"), payment_id, created, subject, claims.get("role", "")))
            WRITER.execute("COMMIT")
        except BaseException:
            WRITER.execute("ROLLBACK")
            raise
    except sqlite3.IntegrityError:  # a concurrent retry (the other worker) won the insert: a replay
        row = WRITER.execute(BY_REQUEST, (subject, request_id)).fetchone() if request_id else None
        if row is None:
            raise
        return _replay(row, fingerprint)
    row = (payment_id, payment.email, payment.amount, payment.currency, payment.description, "pending", None,
           request_id, created, created, expires, owner, None)
    return Response(_json(row), media_type="application/json")
