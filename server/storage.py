"""Storage: the peewee models, the database they live in, and the queries the rules need.

SQLite (a WAL-mode file, one connection per server thread) is the default; PostgreSQL is used
when DATABASE_URL says so, through a connection pool. Both get the same schema, created and
extended at start-up (`open_database`), so no deployment needs a manual migration step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from pathlib import Path
from typing import Iterable, Sequence

import peewee
from playhouse import migrate as pw_migrate
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import PooledPostgresqlDatabase

from server.config import Settings

log = logging.getLogger(__name__)

db = peewee.DatabaseProxy()

UTC = dt.timezone.utc

# What a database outage looks like to peewee; the gRPC layer maps these to UNAVAILABLE.
OUTAGE_ERRORS = (peewee.OperationalError, peewee.InterfaceError)


class UTCDateTimeField(peewee.DateTimeField):
    """A timestamp stored as naive UTC with fixed microsecond precision.

    The fixed text form matters on SQLite, where timestamps are strings: Python drops ".000000"
    when microseconds are zero, and mixed forms would break ordering and keyset paging.
    Values come back timezone-aware (UTC).
    """

    def db_value(self, value):
        if value is None:
            return None
        if isinstance(value, dt.datetime):
            if value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            return value.strftime("%Y-%m-%d %H:%M:%S.%f")
        return super().db_value(value)

    def python_value(self, value):
        value = super().python_value(value)
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class BaseModel(peewee.Model):
    class Meta:
        database = db
        legacy_table_names = False


class Payment(BaseModel):
    """The earlier REST service's payments collection (id, email, amount, status, created_at)
    plus what a payment lifecycle needs. `amount` is an integer of minor units; `status` keeps the
    earlier lowercase words (pending/success/failed)."""

    id = peewee.CharField(primary_key=True, max_length=40)
    email = peewee.CharField(max_length=254)
    amount = peewee.BigIntegerField()
    currency = peewee.CharField(max_length=3, default="IDR")
    description = peewee.CharField(max_length=500, default="")
    status = peewee.CharField(max_length=16, default="pending")
    failure_reason = peewee.CharField(max_length=16, null=True)
    # Idempotency: unique per creator (the token's subject), so two callers never collide.
    created_by = peewee.CharField(max_length=64, default="")
    request_id = peewee.CharField(max_length=64, null=True)
    request_hash = peewee.CharField(max_length=64, null=True)
    created_at = UTCDateTimeField()
    updated_at = UTCDateTimeField()
    expires_at = UTCDateTimeField()
    deleted_at = UTCDateTimeField(null=True, index=True)

    class Meta:
        table_name = "payments"
        indexes = (
            (("created_at", "id"), False),  # keyset paging over everything (admins)
            (("email", "created_at", "id"), False),  # keyset paging of one payer
            (("status", "expires_at"), False),  # the expiry job's scan
            (("status", "created_at", "id"), False),  # status filter
            (("created_by", "request_id"), True),  # idempotency; NULL request_ids never clash
        )


class User(BaseModel):
    """Callers of the API. The earlier brief's unique index on email belongs here."""

    id = peewee.CharField(primary_key=True, max_length=40)
    email = peewee.CharField(max_length=254, unique=True)
    password_hash = peewee.CharField(max_length=255)
    role = peewee.CharField(max_length=16, default="customer")
    created_at = UTCDateTimeField()

    class Meta:
        table_name = "users"


class JobRun(BaseModel):
    """One tick of a scheduled job, claimed by the replica that runs it.

    The primary key (job, tick_at) is what makes a tick run once across replicas: the first
    replica to insert the row owns the tick, every other one gets an IntegrityError and skips.
    `tick_at` is the start of the tick's time slot (a multiple of the job's interval since the
    epoch), so replicas whose schedulers are not aligned still agree on it.
    """

    job = peewee.CharField(max_length=32)
    tick_at = UTCDateTimeField()
    replica = peewee.CharField(max_length=128)  # host:pid of the claiming process
    started_at = UTCDateTimeField(index=True)
    finished_at = UTCDateTimeField(null=True)
    outcome = peewee.CharField(max_length=16, default="running")  # running, ok, failed, interrupted
    rows = peewee.BigIntegerField(default=0)

    class Meta:
        table_name = "job_runs"
        primary_key = peewee.CompositeKey("job", "tick_at")


MODELS: Sequence[type[BaseModel]] = (Payment, User, JobRun)


def make_database(settings: Settings) -> peewee.Database:
    """The database object for these settings (not yet connected)."""
    url = settings.database_url
    if url.startswith(("postgres://", "postgresql://")):
        params = parse_db_url(url)
        name = params.pop("database")
        return PooledPostgresqlDatabase(
            name,
            max_connections=settings.db_pool_size,
            stale_timeout=300,
            timeout=10,  # wait this long for a free pooled connection, then fail the call
            autoconnect=True,
            connect_timeout=5,
            **params,
        )
    path = Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else settings.sqlite_path
    path.parent.mkdir(parents=True, exist_ok=True)
    return peewee.SqliteDatabase(
        str(path),
        pragmas={
            "journal_mode": "wal",  # readers never block the writer
            "synchronous": "normal",  # durable across process crashes in WAL mode
            "busy_timeout": 5000,  # writers queue instead of failing with "database is locked"
            "foreign_keys": 1,
            "cache_size": -16000,
        },
        timeout=5,
        check_same_thread=False,
    )


def open_database(settings: Settings) -> peewee.Database:
    """Bind the models to the configured database and bring its schema up to date."""
    database = make_database(settings)
    db.initialize(database)
    migrate_schema(database)
    return database


def migrate_schema(database: peewee.Database, models: Iterable[type[BaseModel]] = MODELS) -> None:
    """Create missing tables and indexes, and add columns a newer model has gained.

    Columns are only ever added (nullable or with a default), so an older replica keeps working
    against a newer schema during a rolling update. On PostgreSQL, replicas starting together
    take turns (an advisory lock): concurrent CREATE TABLE IF NOT EXISTS can still collide.
    """
    with database.connection_context(), _schema_lock(database):
        migrator = pw_migrate.SchemaMigrator.from_database(database)
        for model in models:
            table = model._meta.table_name
            if not database.table_exists(table):
                continue
            existing = {c.name for c in database.get_columns(table)}
            for field in model._meta.sorted_fields:
                if field.column_name not in existing:
                    log.info("adding column %s.%s", table, field.column_name)
                    if not field.null and field.default is None:
                        field = field.clone()
                        field.null = True
                    pw_migrate.migrate(migrator.add_column(table, field.column_name, field))
        # New tables, and every missing index (CREATE ... IF NOT EXISTS), after the columns exist.
        database.create_tables(list(models), safe=True)


_SCHEMA_LOCK_KEY = 0x7061796D656E7473  # "payments": the schema migration's advisory lock


@contextlib.contextmanager
def _schema_lock(database: peewee.Database):
    if not is_postgres(database):
        yield
        return
    database.execute_sql("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK_KEY,))
    try:
        yield
    finally:
        database.execute_sql("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK_KEY,))


def is_postgres(database: peewee.Database | None = None) -> bool:
    return isinstance(database or db.obj, peewee.PostgresqlDatabase)


def release_connection() -> None:
    """Return this thread's connection after a database error, so the next call reconnects."""
    try:
        if not db.is_closed():
            db.close()
    except Exception:  # the connection may already be broken; dropping it is the point
        log.debug("closing a broken connection failed", exc_info=True)
