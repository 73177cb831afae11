"""Password hashing with argon2id (memory-hard), and a login check that takes the same time
whether or not the account exists."""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import threading
import time
from typing import Callable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 10
MAX_LENGTH = 256

# OWASP's argon2id baseline (19 MiB, 2 passes) keeps a login around tens of milliseconds on 2 cores.
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Verified against when the email is unknown, so both answers cost one argon2 verification.
_DUMMY_HASH = _hasher.hash("not a real password, only a timing equaliser")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def password_problem(password: str) -> str | None:
    if len(password) < MIN_LENGTH:
        return f"must be at least {MIN_LENGTH} characters"
    if len(password) > MAX_LENGTH:
        return f"must be at most {MAX_LENGTH} characters"
    return None


class Argon2Passwords:
    """The rules' password hasher (server/domain/ports.py's PasswordHasher): the functions above."""

    def hash(self, password: str) -> str:
        return hash_password(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        return verify_password(password_hash, password)

    def problem(self, password: str) -> str | None:
        return password_problem(password)


class RememberingPasswords:
    """The hasher, remembering for `seconds` each (stored hash, password) pair that verified, so
    a client that logs in again with the right password costs a keyed SHA-256, not an argon2
    verification: a login flood with right passwords (the attack run: 1,574 hashes in 30 s) then
    takes from the auth lane's hashing threads only what each account's first login took.

    Only a right password for an existing account is remembered, by an HMAC under a key made at
    start and never stored; a wrong password, or an unknown email (the dummy hash), is verified
    every time, as before. A changed password has another hash, so it never matches. A hit is
    answered sooner than a verification: that tells the time of a right password only to whoever
    sent it. At most `size` pairs are remembered, the least recently verified forgotten first."""

    def __init__(self, inner, *, seconds: float = 300.0, size: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self._inner, self._seconds, self._size, self._clock = inner, seconds, size, clock
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._verified: collections.OrderedDict[bytes, float] = collections.OrderedDict()  # digest -> until

    def hash(self, password: str) -> str:
        return self._inner.hash(password)

    def problem(self, password: str) -> str | None:
        return self._inner.problem(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        if password_hash is None:
            return self._inner.verify(password_hash, password)
        digest = hmac.new(self._key, password_hash.encode() + b"\x00" + password.encode("utf-8", "surrogatepass"),
                          hashlib.sha256).digest()
        now = self._clock()
        with self._lock:
            until = self._verified.get(digest)
            if until is not None and now < until:
                return True
        if not self._inner.verify(password_hash, password):
            return False
        with self._lock:
            self._verified[digest] = now + self._seconds
            self._verified.move_to_end(digest)
            while len(self._verified) > self._size:
                self._verified.popitem(last=False)
        return True
