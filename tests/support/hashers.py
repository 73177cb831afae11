"""A password hasher for tests that count what the server hashes."""

from server.infra import passwords


class CountingHasher:
    """The real argon2 hasher, counting its verifications."""

    def __init__(self):
        self.inner, self.verified = passwords.Argon2Passwords(), 0

    def hash(self, password):
        return self.inner.hash(password)

    def problem(self, password):
        return self.inner.problem(password)

    def verify(self, password_hash, password):
        self.verified += 1
        return self.inner.verify(password_hash, password)
