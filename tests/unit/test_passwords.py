"""The password hasher the server runs: argon2, with right passwords remembered for a while."""

from server.infra import passwords
from tests.support.hashers import CountingHasher


def test_a_right_password_is_verified_once_until_it_is_forgotten_and_nothing_else_is_remembered():
    """A login flood with right passwords costs an argon2 verification per account, not per login
    (server/infra/passwords.py RememberingPasswords); a wrong password, an unknown email, a changed
    password and a forgotten pair cost one each time, as before."""
    now = [0.0]
    counting = CountingHasher()
    remembering = passwords.RememberingPasswords(counting, seconds=300, size=2, clock=lambda: now[0])
    stored = counting.hash("the right password")
    assert all(remembering.verify(stored, "the right password") for _ in range(5))
    assert counting.verified == 1
    assert not any(remembering.verify(stored, "a wrong password!") for _ in range(3))
    assert counting.verified == 4
    assert not remembering.verify(None, "the right password")  # an unknown email: the dummy hash, each time
    assert not remembering.verify(None, "the right password")
    assert counting.verified == 6
    changed = counting.hash("the right password")  # the same password set again: another salt, another hash
    assert remembering.verify(changed, "the right password") and counting.verified == 7
    now[0] += 300  # forgotten in time
    assert remembering.verify(stored, "the right password") and counting.verified == 8
    for n in range(2):  # at most `size` pairs: the least recently verified goes first
        other = counting.hash(f"another password {n}")
        assert remembering.verify(other, f"another password {n}")
    assert remembering.verify(stored, "the right password") and counting.verified == 11
