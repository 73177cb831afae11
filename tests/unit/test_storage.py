"""Storage on both databases: schema, migration at start-up, timestamps, indexes."""

import datetime as dt

import peewee
import pytest

from server.infra import storage
from server.infra.storage import Payment, PaymentEvent, User
from server.infra.storage.models import Refund
from server.domain.records import EventRecord, PaymentRecord, RefundRecord

UTC = dt.UTC


def _columns(table):
    return {c.name for c in storage.db.get_columns(table)}


def _indexes(table):
    return {tuple(i.columns): i.unique for i in storage.db.get_indexes(table)}


def test_tables_have_the_earlier_schema_and_the_new_fields(database):
    cols = _columns("payments")
    assert {"id", "email", "amount", "status", "created_at"} <= cols
    assert {"currency", "description", "updated_at", "expires_at", "failure_reason", "request_id", "deleted_at"} <= cols
    assert {"id", "email", "password_hash", "role"} <= _columns("users")


def test_indexes_for_every_query(database):
    idx = _indexes("payments")
    assert idx[("created_by", "request_id")] is True
    for cols in (("created_at", "id"), ("email", "created_at", "id"), ("status", "expires_at", "id"), ("deleted_at", "id")):
        assert cols in idx, cols
    assert _indexes("users")[("email",)] is True


def test_user_email_is_unique(database):
    now = dt.datetime.now(UTC)
    User.create(id="usr_1", email="a@example.com", password_hash="x", created_at=now)
    with pytest.raises(peewee.IntegrityError):
        with storage.db.atomic():
            User.create(id="usr_2", email="a@example.com", password_hash="y", created_at=now)


def test_timestamps_round_trip_as_utc_with_microseconds(database):
    whole = dt.datetime(2026, 3, 1, 8, 0, 0, tzinfo=UTC)  # microsecond 0: the tricky case on SQLite
    Payment.create(id="pay_a", email="a@example.com", amount=1, created_at=whole, updated_at=whole,
                   expires_at=whole.astimezone(dt.timezone(dt.timedelta(hours=7))))
    got = Payment.get_by_id("pay_a")
    assert got.created_at == whole and got.created_at.tzinfo is not None
    assert got.expires_at == whole


def test_start_up_adds_columns_a_newer_model_has(settings):
    database = storage.open_database(settings)
    database.execute_sql("DROP TABLE users")
    database.execute_sql("CREATE TABLE users (id VARCHAR(40) PRIMARY KEY, email VARCHAR(254) NOT NULL, password_hash VARCHAR(255) NOT NULL)")
    database.close()
    database = storage.open_database(settings)  # what a server start does
    assert {"role", "created_at"} <= _columns("users")
    assert _indexes("users")[("email",)] is True
    database.close()


def test_refunded_amount_is_added_as_0_for_the_rows_there_are_and_an_older_replicas_inserts(settings):
    """A payments table from before refunds: start-up adds refunded_amount, every row there reads 0,
    and a row inserted as an older replica does (naming no such column) gets 0 too."""
    database = storage.open_database(settings)
    at = "2026-03-01 08:00:00.000000"
    columns = "id, email, amount, currency, description, status, created_by, created_at, updated_at, expires_at"
    row = f"'{{}}', 'a@example.com', 5, 'IDR', '', 'success', '', '{at}', '{at}', '{at}'"
    database.execute_sql(f"INSERT INTO payments ({columns}) VALUES ({row.format('pay_old')})")
    database.execute_sql("ALTER TABLE payments DROP COLUMN refunded_amount")  # as before refunds
    database.close()
    database = storage.open_database(settings)  # what a server start does
    assert "refunded_amount" in _columns("payments")
    database.execute_sql(f"INSERT INTO payments ({columns}) VALUES ({row.format('pay_older_replica')})")
    assert {p.id: p.refunded_amount for p in Payment.select()} == {"pay_old": 0, "pay_older_replica": 0}
    assert "refunds" in storage.db.get_tables() and {"refund_id", "refunded_amount"} <= _columns("payment_events")
    database.close()


def test_start_up_drops_the_indexes_newer_ones_replaced(settings):
    database = storage.open_database(settings)
    database.execute_sql("CREATE INDEX payments_status_expires_at ON payments (status, expires_at)")
    database.close()
    database = storage.open_database(settings)  # what a server start does
    names = {i.name for i in storage.db.get_indexes("payments")}
    assert "payments_status_expires_at" not in names and "payments_status_expires_at_id" in names
    database.close()


def test_a_second_open_keeps_the_schema_and_the_rows(settings):
    database = storage.open_database(settings)
    at = dt.datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    Payment.create(id="pay_a", email="a@example.com", amount=1, created_at=at, updated_at=at, expires_at=at)
    schema = {t: (_columns(t), _indexes(t)) for t in ("payments", "payment_events", "users")}
    database.close()
    database = storage.open_database(settings)  # a restart
    assert {t: (_columns(t), _indexes(t)) for t in schema} == schema
    assert Payment.get_by_id("pay_a").amount == 1
    database.close()


@pytest.mark.parametrize("backend", ["sqlite"])
def test_sqlite_runs_in_wal_mode(settings):
    database = storage.open_database(settings)
    assert database.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert settings.sqlite_path.exists()
    database.close()


def test_database_url_selects_the_backend(settings, backend):
    database = storage.make_database(settings)
    assert storage.is_postgres(database) == (backend == "postgres")


def _payment(pid: str, at: dt.datetime, **extra) -> Payment:
    return Payment.create(id=pid, email="a@example.com", amount=1250, currency="IDR", created_at=at, updated_at=at,
                          expires_at=at + dt.timedelta(hours=1), **extra)


_BY_EMAIL = storage.Prepared(lambda param: Payment.select().where(Payment.email == param("email"))
                             .order_by(Payment.id).limit(param("limit")), PaymentRecord)


def test_records_have_every_column_of_their_table_in_its_order():
    """A column added to a model and not to its record would be dropped on every read."""
    assert PaymentRecord._fields == tuple(f.name for f in Payment._meta.sorted_fields)
    # All but the webhook outbox's flag, which only the delivery job reads (every read of the history
    # names its columns).
    columns = tuple(f.name for f in PaymentEvent._meta.sorted_fields)
    assert tuple(c for c in columns if c != "dispatched") == EventRecord._fields and "dispatched" in columns
    assert RefundRecord._fields == tuple(f.name for f in Refund._meta.sorted_fields)


def test_prepared_rows_are_what_peewee_itself_returns(database):
    at = dt.datetime(2026, 3, 1, 8, 0, 0, 5, tzinfo=UTC)
    _payment("pay_a", at, request_id="r-1", request_hash="h")
    _payment("pay_b", at, deleted_at=at, failure_reason="expired", status="failed")
    ours = _BY_EMAIL(email="a@example.com", limit=10)
    theirs = list(Payment.select().where(Payment.email == "a@example.com").order_by(Payment.id))
    assert [p._asdict() for p in ours] == [p.__data__ for p in theirs]
    assert [type(p) for p in ours] == [PaymentRecord, PaymentRecord]
    assert ours[1].deleted_at == at and ours[1].deleted_at.tzinfo is not None and ours[0].deleted_at is None
    assert _BY_EMAIL(email="nobody@example.com", limit=10) == []


def test_prepared_rows_are_frozen_records(database):
    _payment("pay_a", dt.datetime(2026, 3, 1, 8, 0, tzinfo=UTC))
    row = _BY_EMAIL.first(email="a@example.com", limit=1)
    with pytest.raises(AttributeError):
        row.description = "changed"
    assert row._replace(description="changed").description == "changed" and row.description == ""
    assert _BY_EMAIL.first(email="nobody@example.com", limit=1) is None


def test_prepared_query_errors_are_peewees(database):
    broken = storage.Prepared(lambda param: Payment.select().where(Payment.id == param("id")), PaymentRecord)
    storage.db.execute_sql("ALTER TABLE payments RENAME TO payments_elsewhere")
    try:
        with pytest.raises(peewee.DatabaseError):  # what status.mapped_errors maps, not the driver's own
            broken.first(id="pay_a")
    finally:
        if storage.is_postgres():
            storage.db.rollback()
        storage.db.execute_sql("ALTER TABLE payments_elsewhere RENAME TO payments")


def test_prepared_insert_stores_what_save_would(database):
    at = dt.datetime(2026, 3, 1, 8, 0, 0, 5, tzinfo=UTC)
    insert = storage.PreparedInsert(Payment, PaymentRecord)
    ours = PaymentRecord(id="pay_a", email="a@example.com", owner_id=None, amount=999_999_999_999_999, currency="IDR",
                         description="", status="pending", failure_reason=None, created_by="usr_1", request_id="r-1",
                         request_hash="h", created_at=at, updated_at=at, expires_at=at, deleted_at=None)
    insert(ours)
    theirs = Payment(id="pay_b", email="a@example.com", amount=999_999_999_999_999, created_at=at, updated_at=at,
                     expires_at=at, request_id="r-2", request_hash="h", created_by="usr_1")
    theirs.save(force_insert=True)
    a, b = Payment.get_by_id("pay_a").__data__, Payment.get_by_id("pay_b").__data__
    assert {**a, "id": "", "request_id": ""} == {**b, "id": "", "request_id": ""}
    assert a["deleted_at"] is None and a["created_at"] == at
    with pytest.raises(peewee.IntegrityError):  # the idempotency index, raised as peewee's error
        with storage.db.atomic():
            insert(ours._replace(id="pay_c"))


@pytest.mark.parametrize("backend", ["postgres"])
def test_prepared_queries_are_planned_once_per_postgresql_connection(database):
    at = dt.datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    _payment("pay_a", at)

    def prepared_here() -> set[str]:
        return {name for (name,) in storage.db.execute_sql("SELECT name FROM pg_prepared_statements")}

    assert _BY_EMAIL.first(email="a@example.com", limit=1).id == "pay_a"
    assert any(name.startswith("payments_q") for name in prepared_here())
    before = prepared_here()
    with storage.db.atomic() as txn:  # a rolled-back transaction does not take the statement with it
        assert _BY_EMAIL(email="a@example.com", limit=5)[0].id == "pay_a"
        txn.rollback()
    assert prepared_here() == before
    assert _BY_EMAIL.first(email="a@example.com", limit=1).id == "pay_a"
    storage.release_connection()  # what an outage does: the next call gets a new connection
    assert _BY_EMAIL.first(email="a@example.com", limit=1).id == "pay_a"
    assert _BY_EMAIL.first(email="nobody@example.com", limit=1) is None


def _created(pid: str, request_id: str | None = "r-1") -> tuple[PaymentRecord, dict]:
    at = dt.datetime(2026, 3, 1, 8, 0, 0, 5, tzinfo=UTC)
    payment = PaymentRecord(id=pid, email="a@example.com", owner_id="usr_1", amount=1250, currency="IDR",
                            description="", status="pending", failure_reason=None, created_by="usr_1",
                            request_id=request_id, request_hash="h" if request_id else None, created_at=at,
                            updated_at=at, expires_at=at, deleted_at=None)
    event = {"id": f"evt_{pid}", "payment_id": pid, "at": at, "action": "created", "from_status": None,
             "to_status": "pending", "failure_reason": None, "actor_id": "usr_1", "actor_role": "customer",
             "dispatched": False}
    return payment, event


def test_a_create_writes_the_payment_and_its_event_together_or_neither(database):
    queries = storage.PaymentQueries()
    payment, event = _created("pay_a")
    assert queries.create(payment, event) is True
    assert queries.any("pay_a") == payment
    assert [(e.id, e.action, e.actor_id) for e in queries.events("pay_a", after_number=None, limit=5)] == [
        ("evt_pay_a", "created", "usr_1")]
    # Its request_id again: refused, nothing written (the payment, nor the event).
    retry, retry_event = _created("pay_b")
    assert queries.create(retry, retry_event) is False
    assert queries.any("pay_b") is None and queries.events("pay_b", after_number=None, limit=5) == []
    # An event that cannot be written takes its payment with it (its id is taken).
    other, _ = _created("pay_c", request_id="r-2")
    with pytest.raises(peewee.IntegrityError):
        queries.create(other, event)
    assert queries.any("pay_c") is None
    # And nothing of either is left in a transaction: the next create commits.
    fine, fine_event = _created("pay_d", request_id=None)
    assert queries.create(fine, fine_event) is True and not storage.db.in_transaction()
    assert queries.any("pay_d") == fine


@pytest.mark.parametrize("backend", ["postgres"])
def test_a_create_on_postgresql_is_one_round_trip(database, monkeypatch):
    from server.infra.storage import fastpath

    sent = []
    execute = fastpath._run
    monkeypatch.setattr(fastpath, "_run", lambda sql, *rest: sent.append(sql) or execute(sql, *rest))
    payment, event = _created("pay_a")
    assert storage.PaymentQueries().create(payment, event) is True
    assert len(sent) == 1 and sent[0].count("INSERT INTO") == 2
    assert storage.PaymentQueries().any("pay_a") == payment
