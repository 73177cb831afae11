"""Later pages are index range scans: the keyset condition of ListPayments is part of the index
condition on both backends, so page 1,000 costs what page 1 costs (bench/run.py measures it on a
million rows; this pins the plan). The SQL is the one the rules really run, read from peewee's
query log."""

from __future__ import annotations

import json
import logging

import pytest

from server.domain.payments import PaymentDraft
from tests.conftest import ADMIN_CALLER, ALICE


def executed_sql(caplog, action) -> tuple[str, tuple]:
    """The last SELECT on payments that `action` ran, with its parameters."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="peewee"):
        action()
    queries = [r.msg for r in caplog.records if r.name == "peewee" and isinstance(r.msg, tuple)
               and r.msg[0].lstrip().upper().startswith("SELECT") and '"payments"' in r.msg[0]]
    assert queries, "no query on payments was logged"
    sql, params = queries[-1]
    return sql, tuple(params)


def plan(database, sql: str, params: tuple) -> str:
    from server.infra import storage

    if storage.is_postgres(database):
        database.execute_sql("SET enable_seqscan = off")  # tiny test tables: ask whether the index *can* serve it
        try:
            (doc,), = database.execute_sql("EXPLAIN (FORMAT JSON) " + sql, params).fetchall()
        finally:
            database.execute_sql("RESET enable_seqscan")
        return json.dumps(doc)
    return " | ".join(row[-1] for row in database.execute_sql("EXPLAIN QUERY PLAN " + sql, params).fetchall())


def nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


@pytest.mark.parametrize("caller, index", [(ALICE, "payments_owner_id_created_at_id"),
                                           (ADMIN_CALLER, "payments_created_at_id")])
def test_a_later_page_is_one_range_scan_of_the_keyset_index(rules, database, caplog, caller, index):
    for n in range(30):
        rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=100 + n))
        rules.clock.advance(seconds=1)
    token = rules.list(caller, page_size=10).next_page_token
    sql, params = executed_sql(caplog, lambda: rules.list(caller, page_size=10, page_token=token))
    text = plan(database, sql, params)
    assert index in text, text
    if '"Plan"' in text:  # PostgreSQL: the row comparison is an Index Cond, not a Filter on every row
        [node] = [n for n in nodes(json.loads(text)[0]["Plan"]) if n.get("Index Name") == index]
        assert "ROW(created_at" in node.get("Index Cond", ""), node
        assert "created_at" not in node.get("Filter", ""), node
    else:  # SQLite: the range is in the SEARCH, no full SCAN and no temp B-tree sort
        assert "(created_at,id)<(?,?)" in text and "SCAN" not in text and "TEMP B-TREE" not in text, text


def executed_write(caplog, action, verb: str) -> tuple[str, tuple]:
    """The last `verb` (UPDATE or DELETE) on payments that `action` ran, with its parameters."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="peewee"):
        action()
    queries = [r.msg for r in caplog.records if r.name == "peewee" and isinstance(r.msg, tuple)
               and r.msg[0].lstrip().upper().startswith(verb) and '"payments"' in r.msg[0]]
    assert queries, f"no {verb} on payments was logged"
    sql, params = queries[-1]
    return sql, tuple(params)


def assert_by_primary_key(database, sql: str, params: tuple) -> None:
    from server.infra import storage

    if storage.is_postgres(database):
        database.execute_sql("ANALYZE payments")  # as autovacuum would: the plan must not hinge on missing statistics
    text = plan(database, sql, params)
    if '"Plan"' in text:  # PostgreSQL
        assert "payments_pkey" in text, text
    else:  # SQLite: one primary-key search per id, no other index of payments
        assert "(id=?)" in text and "payments_status" not in text and "deleted_at" not in text, text


def test_the_expiry_batch_updates_by_primary_key(rules, database, caplog):
    import datetime as dt

    for n in range(40):
        rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=100 + n))
    later = rules.clock() + rules.payment_ttl + dt.timedelta(seconds=1)
    sql, params = executed_write(caplog, lambda: rules.expire_due(later, limit=10), "UPDATE")
    assert_by_primary_key(database, sql, params)


def test_the_purge_batch_deletes_by_primary_key(rules, database, caplog):
    import datetime as dt

    for n in range(40):
        rules.delete(ALICE, rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=100 + n)).id)
    later = rules.clock() + dt.timedelta(seconds=1)
    sql, params = executed_write(caplog, lambda: rules.purge_deleted(later, limit=10), "DELETE")
    assert_by_primary_key(database, sql, params)


@pytest.mark.parametrize("job", ["expire", "purge"])
def test_a_later_job_batch_starts_in_the_index_after_the_last(rules, database, caplog, job):
    """Each batch of a run resumes after the one before inside the index: on PostgreSQL the rows a
    batch changed stay in the index until vacuum, and starting over stepped across all of them."""
    import datetime as dt

    for n in range(40):
        made = rules.create(ALICE, PaymentDraft(email=ALICE.email, amount=100 + n))
        if job == "purge":
            rules.delete(ALICE, made.id)
    later = rules.clock() + rules.payment_ttl + dt.timedelta(seconds=1)
    resume: dict = {}
    if job == "expire":
        step, index, key = (lambda: rules.expire_due(later, limit=10, resume=resume)), \
            "payments_status_expires_at_id", "expires_at"
    else:
        step, index, key = (lambda: rules.purge_deleted(later, limit=10, resume=resume)), \
            "payments_deleted_set", "deleted_at"
    assert step() == 10
    sql, params = executed_sql(caplog, step)
    text = plan(database, sql, params)
    assert index in text, text
    if '"Plan"' in text:  # PostgreSQL: the resume point bounds the index scan
        [node] = [n for n in nodes(json.loads(text)[0]["Plan"]) if n.get("Index Name") == index]
        assert f"ROW({key}" in node.get("Index Cond", ""), node
    else:
        assert "SCAN" not in text and "TEMP B-TREE" not in text and f"({key},id)>(?,?)" in text, text


def _last_select_on(caplog, table: str, action) -> tuple[str, tuple]:
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="peewee"):
        action()
    queries = [r.msg for r in caplog.records if r.name == "peewee" and isinstance(r.msg, tuple)
               and r.msg[0].lstrip().upper().startswith("SELECT") and f'FROM "{table}"' in r.msg[0]]
    assert queries, f"no query on {table} was logged"
    sql, params = queries[-1]
    return sql, tuple(params)


def test_the_webhook_jobs_scans_use_their_indexes(database, caplog):
    """The delivery job's two scans, every few seconds for ever: the events not fanned out yet (a
    partial index of only those) and each endpoint's deliveries due (endpoint, status, next
    attempt): neither reads the rows already delivered, nor another endpoint's backlog."""
    import datetime as dt

    from server.infra import storage

    queries = storage.WebhookQueries()
    sql, params = _last_select_on(caplog, "payment_events", lambda: queries.undispatched(100))
    text = plan(database, sql, params)
    assert "payment_events_undispatched" in text, text
    now = dt.datetime.now(dt.timezone.utc)
    for after in (None, (now, 10)):  # a run's first batch for an endpoint, and a later one
        sql, params = _last_select_on(caplog, "webhook_deliveries",
                                      lambda: queries.due("whe_" + "a" * 26, now, 100, after=after))
        text = plan(database, sql, params)
        assert "webhook_deliveries_endpoint_id_status_next_attempt_at_number" in text, text


@pytest.mark.parametrize("kind, index", [("revoked", "sessions_revoked_set"), ("expired", "sessions_expires_at_id")])
def test_the_session_purge_scans_its_index_from_where_the_last_batch_ended(database, caplog, kind, index):
    """The purge job's scans of ended sessions: revoked ones through a partial index of only those,
    expired ones by expiry, each later batch starting after the one before; their refresh tokens
    by session (an index), then removed by primary key."""
    import datetime as dt

    from server.domain.sessions import Sessions
    from server.infra import storage

    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    sessions = Sessions(60, lambda: now)
    user = storage.User.get(storage.User.id == ALICE.subject)
    for _ in range(30):
        grant = sessions.start(user)
        if kind == "revoked":
            sessions.revoke(grant.session_id, "logout")
    before = now + dt.timedelta(hours=1)
    resume = {"revoked": "done"} if kind == "expired" else {}
    assert sessions.purge_ended(before, limit=10, resume=resume) == 20
    sql, params = _last_select_on(caplog, "sessions", lambda: sessions.purge_ended(before, limit=10, resume=resume))
    text = plan(database, sql, params)
    assert index in text, text
    key = "revoked_at" if kind == "revoked" else "expires_at"
    if '"Plan"' in text:  # PostgreSQL
        [node] = [n for n in nodes(json.loads(text)[0]["Plan"]) if n.get("Index Name") == index]
        assert f"ROW({key}" in node.get("Index Cond", ""), node
    else:
        assert "SCAN" not in text and "TEMP B-TREE" not in text and f"({key},id)>(?,?)" in text, text
    sql, params = _last_select_on(caplog, "refresh_tokens",
                                  lambda: sessions.purge_ended(before, limit=10, resume=dict(resume)))
    text = plan(database, sql, params)
    assert "refresh_tokens_session_id" in text, text
