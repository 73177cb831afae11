"""Where the bearer token comes from. A token source answers `token()` with a token that is valid
now, and forgets one the service refused (`invalidate`). The client never knows which kind it has:
client credentials from the service's own TokenService, or a Google-signed ID token for a service
account on Cloud Run or GKE, or anything else with the same two methods.

Sources that fetch cache the token and fetch the next one before the cached one expires, so a call
never waits for a token that is about to lapse on the way, and a burst of calls costs one fetch.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
import urllib.request
from typing import Callable, Protocol

import grpc

from payments_client import errors
from payments_client._pb import payments_pb2, payments_pb2_grpc

Clock = Callable[[], float]


class TokenSource(Protocol):
    def token(self) -> str:
        """A token valid now (fetched if the cached one is near its end)."""

    def invalidate(self, token: str) -> None:
        """The service refused `token` (UNAUTHENTICATED): never hand it out again."""


class StaticToken:
    """A token someone else renews (a person's session, a test)."""

    def __init__(self, value: str):
        self.value = value

    def token(self) -> str:
        return self.value

    def invalidate(self, token: str) -> None:
        pass


class CachedTokenSource:
    """Caches what `fetch()` returns ((token, lifetime in seconds)) and fetches anew once less than
    `renew_before` seconds are left (at most half the lifetime, so a short-lived token is not
    renewed at every call). The lifetime is counted from before the fetch was sent, so a slow answer
    makes the token expire early in our books, never late.

    If a renewal fails while the cached token is still valid (more than `min_left` seconds left),
    that token is used and the next call tries again: a token service that is down for a moment
    does not fail calls that the old token still authorises. Once it has expired, the error is
    raised. One fetch at a time: concurrent callers wait for it and share its outcome, the error
    too, instead of each sending one (behind a token service that is down, a queue of callers would
    otherwise each wait out a fetch's deadline in turn)."""

    def __init__(self, renew_before: float = 60.0, min_left: float = 5.0, clock: Clock = time.monotonic):
        self.renew_before = renew_before
        self.min_left = min_left
        self.clock = clock
        self.fetches = 0  # how many fetches were sent (observability; the tests read it)
        self._value = ""
        self._expires_at = 0.0
        self._renew_at = 0.0
        self._completed = 0  # fetches ended: a caller that waited sees whether one ended meanwhile
        self._failure: errors.PaymentsError | None = None  # how the last fetch failed, if it did
        self._lock = threading.Lock()

    def fetch(self) -> tuple[str, float]:
        raise NotImplementedError

    def token(self) -> str:
        if self._value and self.clock() < self._renew_at:
            return self._value
        seen = self._completed
        with self._lock:
            now = self.clock()
            if self._value and now < self._renew_at:
                return self._value  # another caller renewed it while we waited
            if self._completed != seen and self._failure is not None:
                failure = self._failure  # another caller's fetch failed while we waited: its answer is ours
            else:
                self.fetches += 1
                try:
                    value, lifetime = self.fetch()
                    failure = None
                except errors.PaymentsError as error:
                    failure = error
                self._failure = failure
                self._completed += 1
            if failure is not None:
                if self._value and now < self._expires_at - self.min_left:
                    return self._value
                raise failure
            self._value = value
            self._expires_at = now + lifetime
            self._renew_at = self._expires_at - min(self.renew_before, lifetime / 2)
            return value

    def invalidate(self, token: str) -> None:
        with self._lock:
            if token == self._value:
                self._value = ""
                self._expires_at = self._renew_at = 0.0


class ClientCredentials(CachedTokenSource):
    """The OAuth 2.0 client credentials grant over gRPC: TokenService.CreateToken with the client's
    id and secret, for the permissions in `scope` (space-separated; empty: all the client holds).
    `channel` is the service's; the client gives its own when none is given."""

    def __init__(self, client_id: str, client_secret: str, scope: str = "", channel: grpc.Channel | None = None,
                 deadline: float = 5.0, **cache):
        super().__init__(**cache)
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self.deadline = deadline
        self._stub = payments_pb2_grpc.TokenServiceStub(channel) if channel is not None else None

    def bind(self, channel: grpc.Channel) -> None:
        if self._stub is None:
            self._stub = payments_pb2_grpc.TokenServiceStub(channel)

    def __repr__(self) -> str:  # never the secret, in a log line or a traceback
        return f"ClientCredentials(client_id={self.client_id!r}, scope={self.scope!r})"

    def fetch(self) -> tuple[str, float]:
        if self._stub is None:
            raise RuntimeError("ClientCredentials has no channel: pass one, or give it to a PaymentsClient")
        request = payments_pb2.CreateTokenRequest(grant_type="client_credentials", client_id=self.client_id,
                                                  client_secret=self._secret, scope=self.scope)
        try:
            answer = self._stub.CreateToken(request, timeout=self.deadline)
        except grpc.RpcError as error:
            raise errors.from_rpc_error(error) from None
        return answer.access_token, float(answer.expires_in)


# Where a workload on Cloud Run or GKE (Workload Identity) gets an ID token for its service account.
GOOGLE_METADATA_IDENTITY = ("http://metadata.google.internal/computeMetadata/v1/instance/"
                            "service-accounts/default/identity")


class GoogleIdToken(CachedTokenSource):
    """A Google-signed ID token for the workload's service account, with `audience` as its `aud`,
    from the metadata server every Cloud Run service and GKE pod (with Workload Identity) has
    (`Metadata-Flavor: Google`; format=full adds the email claims). Its lifetime is read from the
    token's own `exp` (the metadata server says nothing else); the signature is the service's to
    check, not ours. `metadata_url` is for tests, which serve a stand-in."""

    def __init__(self, audience: str, metadata_url: str = GOOGLE_METADATA_IDENTITY, deadline: float = 5.0,
                 wall_clock: Clock = time.time, **cache):
        super().__init__(**cache)
        self.audience = audience
        self.metadata_url = metadata_url
        self.deadline = deadline
        self.wall_clock = wall_clock

    def fetch(self) -> tuple[str, float]:
        query = urllib.parse.urlencode({"audience": self.audience, "format": "full"})
        request = urllib.request.Request(f"{self.metadata_url}?{query}", headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(request, timeout=self.deadline) as answer:
                value = answer.read().decode().strip()
        except OSError as error:
            raise errors.Unavailable(grpc.StatusCode.UNAVAILABLE, f"metadata server: {error}",
                                     reason="METADATA_UNAVAILABLE") from None
        return value, float(unverified_claims(value)["exp"]) - self.wall_clock()


def unverified_claims(jwt: str) -> dict:
    """A JWT's payload, not verified: only to learn when our own token expires."""
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
