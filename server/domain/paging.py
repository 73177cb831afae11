"""Opaque page tokens for keyset paging.

A token names the last row of a page (created_at, id) so the next page is one index range scan,
whatever its depth. It is signed (HMAC-SHA256) and bound to the query it came from (caller and
filters) and to an issue time, so a forged, altered, reused-with-other-filters or stale token is
rejected as INVALID_ARGUMENT instead of silently returning a wrong page.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import secrets

from server.domain.errors import InvalidArgument

_VERSION = 1


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


def invalid_page_size(page_size: int) -> tuple[str, str] | None:
    """The violation of a page_size outside 0-MAX_PAGE_SIZE (0 means DEFAULT_PAGE_SIZE), if it is."""
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        return ("page_size", f"must be between 1 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE})")
    return None


class PageTokens:
    def __init__(self, secret: bytes = b"", ttl_seconds: int = 24 * 3600):
        # Without a configured secret, tokens are valid only in this process (one replica).
        self._key = secret or secrets.token_bytes(32)
        self._ttl = ttl_seconds

    @staticmethod
    def scope(*parts: str) -> str:
        """A fingerprint of the query a token belongs to (caller and filters)."""
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]

    def _sign(self, body: bytes) -> str:
        return _b64(hmac.new(self._key, body, hashlib.sha256).digest()[:16])

    def encode(self, created_at: dt.datetime, row_id: str, scope: str, now: dt.datetime) -> str:
        body = json.dumps(
            {"v": _VERSION, "c": created_at.astimezone(dt.UTC).isoformat(), "i": row_id, "s": scope, "t": int(now.timestamp())},
            separators=(",", ":"),
        ).encode()
        return f"{_b64(body)}.{self._sign(body)}"

    def decode(self, token: str, scope: str, now: dt.datetime) -> tuple[dt.datetime, str]:
        """The (created_at, id) a token points after; InvalidArgument when it is not ours or stale."""

        def bad(why: str) -> InvalidArgument:
            return InvalidArgument([("page_token", why)], reason="INVALID_PAGE_TOKEN")

        # Ours are ASCII (compare_digest refuses to compare other text: it raised, as INTERNAL).
        if len(token) > 512 or token.count(".") != 1 or not token.isascii():
            raise bad("is not a page token from this API")
        body_text, sig = token.split(".")
        try:
            body = _unb64(body_text)
        except (binascii.Error, ValueError):
            raise bad("is not a page token from this API") from None
        if not hmac.compare_digest(sig, self._sign(body)):
            raise bad("is not a page token from this API")
        try:
            data = json.loads(body)
            if data["v"] != _VERSION:
                raise ValueError
            created_at = dt.datetime.fromisoformat(data["c"])
            row_id, token_scope, issued = str(data["i"]), data["s"], int(data["t"])
        except (ValueError, KeyError, TypeError):
            raise bad("is not a page token from this API") from None
        if token_scope != scope:
            raise bad("belongs to a query with other filters; repeat the filters of the first page")
        if now.timestamp() - issued > self._ttl:
            raise bad("has expired; start again from the first page")
        return created_at, row_id

    def cut(self, rows: list, size: int, key, scope: str, now: dt.datetime) -> tuple[list, str]:
        """The page of rows read with limit size + 1: the first `size`, and the token of the next page
        (from `key(last row)`, its (time, id)), or "" when there is none."""
        if len(rows) <= size:
            return rows, ""
        rows = rows[:size]
        return rows, self.encode(*key(rows[-1]), scope, now)

    def decode_number(self, token: str, scope: str, now: dt.datetime) -> int:
        """The row number a token of a numbered listing (histories, events) points after."""
        _, number = self.decode(token, scope, now)
        if not number.isdigit():
            raise InvalidArgument([("page_token", "is not a page token of this listing")], reason="INVALID_PAGE_TOKEN")
        return int(number)
