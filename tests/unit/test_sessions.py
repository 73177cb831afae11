"""Sessions below the API, on both databases: a retried refresh, two (or eight) refreshes of one
token at once, reuse after the grace, the session check's subject and role binding and its
bounded memory, and the purge of ended sessions in bounded batches."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import threading

import pytest

from server.domain.caller import Caller
from server.domain.errors import Unauthenticated
from server.domain.sessions import REFRESH_GRACE_SECONDS, SessionCheck, Sessions, successor_of
from server.infra import storage
from server.infra.storage import RefreshToken, Session, User

TTL = 3600


@pytest.fixture
def sessions(database, clock) -> Sessions:
    return Sessions(TTL, clock)


def user(email: str = "s@example.com", role: str = "customer") -> User:
    return User.create(id=f"usr_{email.split('@')[0]}", email=email, password_hash="!", role=role,
                       created_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))


def outcome(call):
    try:
        return call()
    except Unauthenticated as e:
        return e.reason
    finally:
        storage.end_call()


def is_live(session_id: str) -> bool:
    return Session.get_by_id(session_id).revoked_at is None


def test_the_successor_is_derived_from_the_token_and_only_hashes_are_stored(sessions):
    grant = sessions.start(user())
    nxt = sessions.refresh(grant.refresh_token)
    assert nxt.refresh_token == successor_of(grant.refresh_token) != grant.refresh_token
    assert nxt.refresh_token.startswith("rt_") and len(nxt.refresh_token) == 3 + 52
    stored = {t.hash for t in RefreshToken.select()}
    assert grant.refresh_token not in stored and nxt.refresh_token not in stored and len(stored) == 2


def test_a_retried_refresh_within_the_grace_gets_the_same_answer(sessions, clock):
    grant = sessions.start(user())
    first = sessions.refresh(grant.refresh_token)
    clock.advance(seconds=REFRESH_GRACE_SECONDS - 1)  # the answer was lost; the client tries again
    again = sessions.refresh(grant.refresh_token)
    assert again.refresh_token == first.refresh_token and again.session_id == first.session_id
    assert is_live(grant.session_id)
    assert sessions.refresh(again.refresh_token)  # and the chain goes on


@pytest.mark.parametrize("replay", ["after the grace", "after the successor was used"])
def test_a_replay_after_the_grace_or_the_successors_use_revokes_the_session(sessions, clock, replay):
    grant = sessions.start(user())
    first = sessions.refresh(grant.refresh_token)
    if replay == "after the grace":
        clock.advance(seconds=REFRESH_GRACE_SECONDS + 1)
    else:
        sessions.refresh(first.refresh_token)
    assert outcome(lambda: sessions.refresh(grant.refresh_token)) == "REFRESH_TOKEN_REUSED"
    assert not is_live(grant.session_id)
    assert Session.get_by_id(grant.session_id).revoke_reason == "refresh token reused"
    assert outcome(lambda: sessions.refresh(first.refresh_token)) == "INVALID_REFRESH_TOKEN"


def race(count: int, call) -> list:
    start = threading.Barrier(count)

    def one(_):
        start.wait()
        return outcome(call)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_refreshes_of_one_token_at_once_all_get_the_same_successor(sessions):
    """Twelve races of eight: never a busy database (no exception but Unauthenticated escapes),
    never two successors, the session always alive."""
    for n in range(12):
        grant = sessions.start(user(f"racer{n}@example.com"))
        answers = race(8, lambda: sessions.refresh(grant.refresh_token))
        assert {a.refresh_token for a in answers} == {successor_of(grant.refresh_token)}, answers
        assert is_live(grant.session_id)
        assert RefreshToken.select().where(RefreshToken.session_id == grant.session_id).count() == 2


def test_replays_at_once_after_the_grace_are_all_detected(sessions, clock):
    grant = sessions.start(user())
    sessions.refresh(grant.refresh_token)
    clock.advance(seconds=REFRESH_GRACE_SECONDS + 1)
    answers = race(6, lambda: sessions.refresh(grant.refresh_token))
    assert set(answers) <= {"REFRESH_TOKEN_REUSED", "INVALID_REFRESH_TOKEN"} and "REFRESH_TOKEN_REUSED" in answers
    assert not is_live(grant.session_id)


def test_a_refresh_of_an_ended_session_or_a_junk_token_is_invalid(sessions, clock):
    grant = sessions.start(user())
    for junk in ("", "rt_nonsense", "x" * 100, "rt_" + "a" * 500):
        assert outcome(lambda: sessions.refresh(junk)) == "INVALID_REFRESH_TOKEN"
    clock.advance(seconds=TTL + 1)
    assert outcome(lambda: sessions.refresh(grant.refresh_token)) == "INVALID_REFRESH_TOKEN"


def caller_of(grant, **override) -> Caller:
    return dataclasses.replace(Caller(subject=grant.user_id, email=grant.email, role=grant.role,
                                      session_id=grant.session_id), **override)


def test_the_check_binds_the_tokens_subject_and_role_to_its_session(sessions, clock):
    grant = sessions.start(user())
    check = SessionCheck(5, wall_clock=clock)
    check.check(caller_of(grant))
    with pytest.raises(Unauthenticated) as e:
        check.check(caller_of(grant, subject="usr_someone_else"))
    assert e.value.reason == "INVALID_TOKEN"
    with pytest.raises(Unauthenticated) as e:
        check.check(caller_of(grant, role="admin"))
    assert e.value.reason == "TOKEN_REVOKED"
    check.check(caller_of(grant))  # neither ended the session
    with pytest.raises(Unauthenticated):
        SessionCheck(5, wall_clock=clock).check(caller_of(grant, subject="usr_someone_else"))  # from the database too


def test_a_role_changed_behind_the_rules_back_is_refused_the_same_by_every_process(sessions, clock):
    grant = sessions.start(user())
    first, second = SessionCheck(0, wall_clock=clock), SessionCheck(0, wall_clock=clock)
    first.check(caller_of(grant))
    User.update(role="admin").where(User.id == grant.user_id).execute()
    with pytest.raises(Unauthenticated):
        first.check(caller_of(grant))
    User.update(role="customer").where(User.id == grant.user_id).execute()  # and back, before the other looks
    with pytest.raises(Unauthenticated):
        second.check(caller_of(grant))  # the first one ended it in the database: no flapping
    assert not is_live(grant.session_id)


def test_a_session_of_an_older_version_counts_as_a_customers(sessions, clock):
    admin = user("old-admin@example.com", role="admin")
    grant = sessions.start(admin)
    Session.update(role=None).where(Session.id == grant.session_id).execute()
    with pytest.raises(Unauthenticated):
        SessionCheck(0, wall_clock=clock).check(caller_of(grant))
    assert outcome(lambda: sessions.refresh(grant.refresh_token)) == "INVALID_REFRESH_TOKEN"


def test_the_checks_memory_evicts_the_least_recently_used_one_at_a_time(sessions, clock):
    check = SessionCheck(60, bound=3, wall_clock=clock)
    grants = [sessions.start(user(f"u{i}@example.com")) for i in range(5)]
    for g in grants[:3]:
        check.check(caller_of(g))
    check.check(caller_of(grants[0]))  # used again: the least recently used is now grants[1]
    check.check(caller_of(grants[3]))
    assert len(check._live) == 3
    asked = []
    real = check._ask
    check._ask = lambda sid: asked.append(sid) or real(sid)
    for g in (grants[0], grants[2], grants[3]):
        check.check(caller_of(g))
    assert asked == []  # still remembered
    check.check(caller_of(grants[1]))
    assert asked == [grants[1].session_id]  # the evicted one costs one query, nothing else


def test_ended_sessions_are_purged_with_their_tokens_in_bounded_batches(sessions, clock):
    owner = user()
    ended = []
    for i in range(7):  # four revoked at once, three that will expire; 1 to 7 refresh tokens each
        g = sessions.start(owner)
        t = g.refresh_token
        for _ in range(i):
            t = sessions.refresh(t).refresh_token
        ended.append(g)
    for g in ended[:4]:
        sessions.revoke(g.session_id, "logout")
    clock.advance(seconds=TTL + 1)  # the other three have expired
    live = sessions.start(owner)
    token = live.refresh_token
    for _ in range(5):
        token = sessions.refresh(token).refresh_token  # a live session's used tokens
    recent = sessions.start(owner)
    sessions.revoke(recent.session_id, "logout")  # ended, but after the cutoff
    cutoff = clock() - dt.timedelta(seconds=0.5)
    batches, resume = [], {}
    while True:
        removed = sessions.purge_ended(cutoff, limit=3, resume=resume)
        assert removed <= 2 * (3 + 3)  # a batch of tokens and sessions, of each kind at most
        batches.append(removed)
        if removed < 3:  # what the job's drain does: a short batch means nothing is left
            break
    left = {s.id for s in Session.select().where(Session.user_id == owner.id)}
    assert left == {live.session_id, recent.session_id}, batches
    assert RefreshToken.select().where(RefreshToken.session_id.not_in([live.session_id, recent.session_id])).count() == 0
    assert RefreshToken.select().where(RefreshToken.session_id == live.session_id).count() == 6
    assert sum(batches) == 7 + sum(range(1, 8)) and len(batches) >= 5, batches
    assert outcome(lambda: sessions.refresh(live.refresh_token)) == "REFRESH_TOKEN_REUSED"  # still recognised
