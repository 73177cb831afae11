"""Verifying the service's webhook deliveries by their Standard Webhooks headers (webhook-id,
webhook-timestamp, webhook-signature; docs/webhooks.md), with the standard library only, so the
package needs no webhook library of its own. The signed content is `<id>.<timestamp>.<body>`, the
key the bytes the secret encodes after `whsec_`, HMAC-SHA256; a rotation sends several space-
separated `v1,<base64>` signatures, any of which may match."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

TOLERANCE = 300  # seconds: an older (or future) timestamp is a replay
# Unix seconds have 10 digits until 2286; a longer stamp is never fresh, and int() of a very long
# one raises (Python's limit on digits converted from a string) instead of answering False.
MAX_STAMP_DIGITS = 12


def verify(secret: str, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """True if the delivery is signed with `secret` (whsec_...) and fresh. `headers` with lower-case
    names. Never raises on what a sender put in the headers: anything malformed is False."""
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "")
    if not (msg_id and stamp.isascii() and stamp.isdigit() and len(stamp) <= MAX_STAMP_DIGITS and signatures and secret.startswith("whsec_")):
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > TOLERANCE:
        return False
    try:
        key = base64.b64decode(secret[len("whsec_"):], validate=True)
    except (binascii.Error, ValueError):
        return False
    expected = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest())
    for signature in signatures.split(" "):
        version, _, value = signature.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return True
    return False
