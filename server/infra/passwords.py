"""Password hashing with argon2id (memory-hard), and a login check that takes the same time
whether or not the account exists."""

from __future__ import annotations

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
