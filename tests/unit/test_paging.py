import datetime as dt

import pytest

from server.domain.errors import InvalidArgument
from server.domain.paging import PageTokens

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
AT = dt.datetime(2026, 4, 30, 9, 30, 0, 5, tzinfo=UTC)


def test_round_trip():
    t = PageTokens(b"k" * 32)
    token = t.encode(AT, "pay_x", "scope", NOW)
    assert t.decode(token, "scope", NOW) == (AT, "pay_x")


def _reason(fn):
    with pytest.raises(InvalidArgument) as e:
        fn()
    assert e.value.reason == "INVALID_PAGE_TOKEN"
    assert e.value.violations[0][0] == "page_token"
    return e.value.violations[0][1]


@pytest.mark.parametrize("forged", ["", "abc", "a.b", "a.b.c", "!!!.???", "x" * 600, "eyJ2IjoxfQ.AAAA",
                                    "000000.\xa0", "eyJ2IjoxfQ.é"])  # non-ASCII: found by test_text_fuzz
def test_garbage_is_invalid_argument(forged):
    _reason(lambda: PageTokens(b"k" * 32).decode(forged, "scope", NOW))


def test_tampered_body_is_rejected():
    t = PageTokens(b"k" * 32)
    body, sig = t.encode(AT, "pay_x", "scope", NOW).split(".")
    other_body, _ = t.encode(AT, "pay_y", "scope", NOW).split(".")
    _reason(lambda: t.decode(f"{other_body}.{sig}", "scope", NOW))


def test_token_of_another_key_is_rejected():
    token = PageTokens(b"a" * 32).encode(AT, "pay_x", "scope", NOW)
    _reason(lambda: PageTokens(b"b" * 32).decode(token, "scope", NOW))


def test_token_for_other_filters_is_rejected():
    t = PageTokens(b"k" * 32)
    token = t.encode(AT, "pay_x", t.scope("alice", "PENDING"), NOW)
    why = _reason(lambda: t.decode(token, t.scope("alice", "FAILED"), NOW))
    assert "filters" in why


def test_stale_token_is_rejected():
    t = PageTokens(b"k" * 32, ttl_seconds=60)
    token = t.encode(AT, "pay_x", "s", NOW)
    assert t.decode(token, "s", NOW + dt.timedelta(seconds=60))
    assert "expired" in _reason(lambda: t.decode(token, "s", NOW + dt.timedelta(seconds=61)))


def test_without_a_secret_tokens_are_per_process():
    a, b = PageTokens(), PageTokens()
    token = a.encode(AT, "pay_x", "s", NOW)
    assert a.decode(token, "s", NOW)
    _reason(lambda: b.decode(token, "s", NOW))
