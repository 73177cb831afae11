"""Service clients: programs that call the API with credentials of their own and only the
permissions an admin gave them (server/domain/permissions.py), and the OAuth 2.0 client
credentials grant (RFC 6749 section 4.4) that turns those credentials into an access token.

Secrets are "pmt_cs_" and 256 random bits, shown once and stored only as HMAC-SHA256 keyed by the
client's id. A fast hash is enough here, unlike for passwords: a slow hash (bcrypt, argon2)
exists to make guessing a low-entropy password from its hash expensive, and 2^256 possibilities
cannot be guessed at any speed; keying it by the client id ties each hash to its row. The check
is a few microseconds, so the token endpoint costs no CPU an attacker could exhaust, and the
comparison is constant-time. The prefix lets a leaked secret be recognised and scanned for
(secret scanners, log greps).

A rotation keeps the previous secret working for a grace period; revoking forgets every secret at
once, and access tokens already issued are refused within the bound of a person's logout
(`ClientCheck`, every `check_seconds`). Failed attempts are throttled per (client id, address)
as logins are (server/domain/login_throttle.py). No gRPC, no SQL: the store is a port.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import re
import secrets
import base64
import time
from typing import Callable

from server.domain.caller import ADMIN, Caller
from server.domain.errors import (FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted,
                                  Unauthenticated)
from server.domain.ids import opaque_id
from server.domain.login_throttle import LoginThrottle
from server.domain.paging import DEFAULT_PAGE_SIZE, PageTokens, invalid_page_size
from server.domain.permissions import PERMISSIONS
from server.domain.ports import ClientStore, Clock
from server.domain.records import ClientRecord
from server.domain.remembered import Remembered

SECRET_PREFIX = "pmt_cs_"
CLIENT_ID_PREFIX = "cli_"
GRANT_TYPE = "client_credentials"
TOKEN_SECONDS = 300  # an access token's lifetime; there is no refresh token (RFC 6749 4.4.3)
MAX_NAME = 100
SHOWN_PREFIX = len(SECRET_PREFIX) + 5  # how much of a secret a listing shows
DEFAULT_PREVIOUS_TTL = 86_400
MAX_PREVIOUS_TTL = 7 * 86_400
MAX_ID_LENGTH = 64
MAX_SECRET_LENGTH = 128
# RFC 6749 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
CLIENT_ID = re.compile(r"cli_[a-z2-7]{26}")


def new_secret() -> str:
    return SECRET_PREFIX + base64.b32encode(secrets.token_bytes(32)).decode().rstrip("=").lower()


def secret_hash(client_id: str, secret: str) -> str:
    return hmac.new(client_id.encode(), secret.encode(), hashlib.sha256).hexdigest()


def not_found(client_id: str) -> NotFound:
    return NotFound(f"service client {client_id!r} not found", reason="CLIENT_NOT_FOUND", metadata={"id": client_id})


def invalid_client() -> Unauthenticated:
    # One answer for an unknown client, a wrong secret, an expired or a revoked client (RFC 6749
    # 5.2 invalid_client): the answer tells a guesser nothing about which.
    return Unauthenticated("client authentication failed", reason="INVALID_CLIENT")


def invalid_request(field: str, why: str) -> InvalidArgument:
    return InvalidArgument([(field, why)], reason="INVALID_REQUEST")


@dataclasses.dataclass(frozen=True)
class TokenGrant:
    access_token: str
    expires_in: int
    scope: str


def admin_only(caller: Caller) -> None:
    """First in every admin method, before any input is looked at: a non-admin learns nothing
    about what a valid request would be (ADMIN_ONLY, never a validation error)."""
    # Persons only: a client never reaches this (server/domain/permissions.py), and is refused here too.
    if caller.role != ADMIN:
        raise PermissionDenied("only admins manage service clients", reason="ADMIN_ONLY")


def live(client: ClientRecord, now: dt.datetime) -> bool:
    return client.revoked_at is None and (client.expires_at is None or client.expires_at > now)


class ClientRules:
    """The admin's operations on clients and the token grant. `issue(client_id, scope)` makes the
    access token (server/infra/tokens.py TokenIssuer.issue_client)."""

    def __init__(self, *, store: ClientStore, clock: Clock, page_tokens: PageTokens,
                 issue: Callable[[str, str], str], throttle: LoginThrottle | None = None):
        self.store, self.clock, self.page_tokens, self.issue = store, clock, page_tokens, issue
        self.throttle = throttle or LoginThrottle()

    # --- admins ------------------------------------------------------------------------------

    def create(self, caller: Caller, *, name: str, permissions, expires_at: dt.datetime | None = None
               ) -> tuple[ClientRecord, str]:
        admin_only(caller)
        now = self.clock()
        violations = []
        name = name.strip()
        if not name:
            violations.append(("client.name", "is required"))
        elif len(name) > MAX_NAME:
            violations.append(("client.name", f"must be at most {MAX_NAME} characters"))
        chosen = sorted(set(permissions))
        unknown = [p for p in chosen if p not in PERMISSIONS]
        if not chosen:
            violations.append(("client.permissions", "name at least one of " + ", ".join(PERMISSIONS)))
        elif unknown:
            violations.append(("client.permissions", f"unknown {unknown[0][:64]!r}: each must be one of "
                               + ", ".join(PERMISSIONS)))
        if expires_at is not None and expires_at <= now:
            violations.append(("client.expire_time", "must be in the future"))
        if violations:
            raise InvalidArgument(violations, reason="INVALID_CLIENT_REQUEST")
        client_id, secret = opaque_id(CLIENT_ID_PREFIX), new_secret()
        client = ClientRecord(id=client_id, name=name, permissions=" ".join(chosen),
                              secret_hash=secret_hash(client_id, secret), secret_prefix=secret[:SHOWN_PREFIX],
                              previous_secret_hash=None, previous_secret_expires_at=None, created_by=caller.subject,
                              created_at=now, last_used_at=None, expires_at=expires_at, revoked_at=None)
        self.store.insert(client)
        return client, secret

    def get(self, caller: Caller, client_id: str) -> ClientRecord:
        admin_only(caller)
        client = self.store.get(client_id) if CLIENT_ID.fullmatch(client_id or "") else None
        if client is None:
            raise not_found(client_id)
        return client

    def list(self, caller: Caller, *, page_size: int = 0, page_token: str = "") -> tuple[list[ClientRecord], str]:
        admin_only(caller)
        if (violation := invalid_page_size(page_size)) is not None:
            raise InvalidArgument([violation], reason="INVALID_LIST_REQUEST")
        size, now = page_size or DEFAULT_PAGE_SIZE, self.clock()
        scope = self.page_tokens.scope(caller.subject, "clients")
        after = self.page_tokens.decode(page_token, scope, now) if page_token else None
        rows = self.store.page(after=after, limit=size + 1)
        return self.page_tokens.cut(rows, size, lambda last: (last.created_at, last.id), scope, now)

    def rotate(self, caller: Caller, client_id: str, previous_ttl_seconds: int | None = None
               ) -> tuple[ClientRecord, str]:
        admin_only(caller)
        ttl = DEFAULT_PREVIOUS_TTL if previous_ttl_seconds is None else previous_ttl_seconds
        if not 0 <= ttl <= MAX_PREVIOUS_TTL:
            raise InvalidArgument([("previous_secret_ttl_seconds", f"must be 0-{MAX_PREVIOUS_TTL}")],
                                  reason="INVALID_CLIENT_REQUEST")
        self._changeable(self.get(caller, client_id))
        secret, now = new_secret(), self.clock()
        # Without a grace the old secret is treated as leaked: the tokens it minted end too (within
        # the revocation bound, ClientCheck). Tokens carry whole seconds (iat), so the cut is this
        # second's start: a token minted later in this second, possibly with the new secret, is kept.
        cut = None if ttl else now.replace(microsecond=0)
        if not self.store.rotate(client_id, secret_hash(client_id, secret), secret[:SHOWN_PREFIX],
                                 now + dt.timedelta(seconds=ttl) if ttl else None, cut):
            self._changeable(self.get(caller, client_id))  # revoked in between
        return self.get(caller, client_id), secret

    def set_expiry(self, caller: Caller, client_id: str, expires_at: dt.datetime | None) -> ClientRecord:
        admin_only(caller)
        if expires_at is not None and expires_at <= self.clock():
            raise InvalidArgument([("expire_time", "must be in the future")], reason="INVALID_CLIENT_REQUEST")
        self._changeable(self.get(caller, client_id))
        if not self.store.set_expiry(client_id, expires_at):
            self._changeable(self.get(caller, client_id))
        return self.get(caller, client_id)

    def revoke(self, caller: Caller, client_id: str) -> ClientRecord:
        """For good; revoking a revoked client answers it as it is (a retry gets what the first call did)."""
        self.get(caller, client_id)
        self.store.revoke(client_id, self.clock())
        return self.get(caller, client_id)

    @staticmethod
    def _changeable(client: ClientRecord) -> None:
        if client.revoked_at is not None:
            raise FailedPrecondition(f"service client {client.id!r} is revoked", reason="CLIENT_REVOKED",
                                     metadata={"id": client.id})

    # --- the client credentials grant -------------------------------------------------------

    def grant(self, *, grant_type: str, client_id: str, client_secret: str, scope: str, address: str = "") -> TokenGrant:
        """An access token for a client's right secret (RFC 6749 4.4), with the permissions asked
        for (`scope`, space-separated) or, when none are, all it holds."""
        if not grant_type:
            raise invalid_request("grant_type", "is required (client_credentials)")
        if grant_type != GRANT_TYPE:
            raise InvalidArgument([("grant_type", f"only {GRANT_TYPE} is supported")], reason="UNSUPPORTED_GRANT_TYPE")
        asked = scope.split(" ") if scope else []
        if any(not _SCOPE_TOKEN.fullmatch(s) for s in asked):
            raise InvalidArgument([("scope", "must be permissions separated by single spaces")],
                                  reason="INVALID_SCOPE")
        if not client_id or not client_secret:
            raise invalid_client()
        if len(client_id) > MAX_ID_LENGTH or len(client_secret) > MAX_SECRET_LENGTH:
            raise invalid_client()
        try:
            attempt = self.throttle.attempt(client_id, address)
        except ResourceExhausted as e:
            raise ResourceExhausted("too many failed attempts for this client; retry later",
                                    reason="TOO_MANY_ATTEMPTS", retry_after=e.retry_after) from None
        now = self.clock()
        client = self.store.get(client_id) if CLIENT_ID.fullmatch(client_id) else None
        if client is None or not live(client, now) or not self._secret_matches(client, client_secret, now):
            raise invalid_client()
        self.throttle.succeeded(attempt)
        held = client.permissions.split()
        missing = [s for s in asked if s not in held]
        if missing:
            raise InvalidArgument([("scope", f"the client does not hold {missing[0][:64]}")], reason="INVALID_SCOPE")
        granted = " ".join(sorted(set(asked))) if asked else client.permissions
        self.store.used(client_id, now)
        return TokenGrant(self.issue(client_id, granted), TOKEN_SECONDS, granted)

    @staticmethod
    def _secret_matches(client: ClientRecord, secret: str, now: dt.datetime) -> bool:
        presented = secret_hash(client.id, secret)
        if hmac.compare_digest(presented, client.secret_hash):
            return True
        previous = client.previous_secret_hash
        return (previous is not None and client.previous_secret_expires_at is not None
                and client.previous_secret_expires_at > now and hmac.compare_digest(presented, previous))


def revoked(why: str) -> Unauthenticated:
    return Unauthenticated(f"the service client can no longer call ({why}): get it a new client",
                           reason="TOKEN_REVOKED")


class ClientCheck:
    """Is the client behind an access token still allowed in, and with which permissions?

    Asked on every call of a client, answered from memory for `check_seconds` after the store
    last answered: the same bound as a person's session (server/domain/sessions.py SessionCheck),
    within which a revoked or expired client's tokens are refused in every process. A revoked
    client is remembered as such for good (revocation is final). The permissions a call carries
    are those of its token that the client still holds; a token naming no scope (a token of
    another issuer mapped to this client) carries all the client holds.
    """

    def __init__(self, store: ClientStore, check_seconds: float, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Clock = lambda: dt.datetime.now(dt.UTC), bound: int = 10_000):
        self.store, self.check_seconds = store, check_seconds
        self.clock, self.wall_clock = clock, wall_clock
        self._live = Remembered(bound)  # client id -> (permissions, expires_at, checked at, tokens_valid_after)
        self._revoked = Remembered(bound)  # client id -> True

    def check(self, caller: Caller) -> Caller:
        client_id = caller.subject
        if self._revoked.get(client_id) is not None:
            raise revoked("revoked")
        now = self.clock()
        hit = self._live.get(client_id)
        if hit is None or now - hit[2] >= self.check_seconds:
            client = self.store.state(client_id)
            if client is None:
                raise revoked("no such client")
            if client.revoked_at is not None:
                self._revoked.put(client_id, True)
                self._live.pop(client_id)
                raise revoked("revoked")
            valid_after = client.tokens_valid_after.timestamp() if client.tokens_valid_after is not None else None
            hit = (frozenset(client.permissions.split()), client.expires_at, now, valid_after)
            self._live.put(client_id, hit)
        held, expires_at, _, valid_after = hit
        if expires_at is not None and expires_at <= self.wall_clock():
            raise revoked("expired")
        if valid_after is not None and caller.issued_at and caller.issued_at < valid_after:
            raise revoked("its secret was rotated without a grace after this token was issued")
        return dataclasses.replace(caller, permissions=held & caller.permissions if caller.permissions else held)
