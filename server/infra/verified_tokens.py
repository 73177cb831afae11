"""What both token verifiers (tokens.TokenVerifier, google_tokens.GoogleTokenVerifier) share: the
first look at a token's header, and the memory of tokens that verified.

A client sends the same token on every call for its whole lifetime, and the signature check is
most of what a call costs the server, so a token that verified is remembered by its exact text
(signature included) until it expires. The memory is bounded: a new token beyond `size` evicts
the least recently used one (a forgotten token costs one more verification, never a refusal).
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Generic, Iterator, TypeVar

import jwt

from server.domain.errors import Unauthenticated

T = TypeVar("T")


def signed_header(token: str, algorithm: str, bad: Callable[[str], Unauthenticated]) -> dict:
    """The token's header, refused with bad(why) unless it parses and names `algorithm` (a token
    never chooses how it is checked: RFC 8725 3.1)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise bad("malformed") from None
    if header.get("alg") != algorithm:
        raise bad(f"algorithm must be {algorithm}")
    return header


class VerifiedTokens(Generic[T]):
    def __init__(self, size: int, clock: Callable[[], float]):
        self.size, self.clock = size, clock
        # token -> (what it verified as, valid until), least recently used first
        self._entries: collections.OrderedDict[str, tuple[T, float]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, token: str) -> T | None:
        """What the token verified as, if it did and is still valid by the clock."""
        hit = self._entries.get(token)  # no lock to read: each step is atomic under the GIL
        if hit is None:
            return None
        try:
            self._entries.move_to_end(token)
        except KeyError:  # evicted by another thread in between
            pass
        return hit[0] if self.clock() < hit[1] else None

    def put(self, token: str, value: T, valid_until: float) -> None:
        with self._lock:
            self._entries[token] = (value, valid_until)
            self._entries.move_to_end(token)
            if len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __iter__(self) -> Iterator[str]:
        """The tokens remembered, least recently used first."""
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
