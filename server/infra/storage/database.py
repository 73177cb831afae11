"""Choosing, opening and migrating the database, and handing connections back.

SQLite (a WAL-mode file, one connection per server thread) is the default; PostgreSQL is used
when DATABASE_URL says so, through a connection pool. Both get the same schema, created and
extended at start-up (`open_database`), so no deployment needs a manual migration step.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable

import peewee
from playhouse import migrate as pw_migrate
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import PooledPostgresqlDatabase

from server.infra.config import Settings
from server.infra.storage.models import MODELS, OBSOLETE_INDEXES, BaseModel, Payment, User, db

log = logging.getLogger(__name__)

# What a database outage looks like to peewee; the gRPC layer maps these to UNAVAILABLE.
OUTAGE_ERRORS = (peewee.OperationalError, peewee.InterfaceError)
# Values the database refused: a client's input, however it got past validation.
DATA_ERRORS = (peewee.DataError,)

_SQLITE_FULL = 13  # "database or disk is full": the write was rolled back, the connection is sound
_PG_DISK_FULL = "53100"  # PostgreSQL's disk_full


class _SqliteDatabase(peewee.SqliteDatabase):
    """SQLite whose connections open without writing, so a full disk never stops reads.

    peewee runs every pragma on every new connection. `PRAGMA auto_vacuum = incremental` on a
    file that already has auto-vacuum is a write transaction (SQLite rewrites the incremental
    flag in page 1, one WAL frame each time): on a full disk it fails with SQLITE_FULL, so a
    thread whose connection had been dropped could not even read. The pragmas kept in the file
    (auto_vacuum, journal_mode) are therefore read first and set only when they would change
    something: auto_vacuum only in a file without tables yet (the only time it can take effect),
    journal_mode only in a file not yet in WAL mode. The others are per connection and write nothing.
    """

    _IN_THE_FILE = ("auto_vacuum", "journal_mode")

    def _set_pragmas(self, conn):
        cursor = conn.cursor()
        try:
            for pragma, value in self._pragmas:
                if pragma in self._IN_THE_FILE and not self._would_change(cursor, pragma, value):
                    continue
                cursor.execute(f"PRAGMA {pragma} = {value};")
        finally:
            cursor.close()

    @staticmethod
    def _would_change(cursor, pragma: str, value) -> bool:
        if pragma == "auto_vacuum":
            modes = {"none": 0, "full": 1, "incremental": 2}
            wanted = modes.get(str(value).lower(), value)
            if cursor.execute("PRAGMA auto_vacuum").fetchone()[0] == wanted:
                return False
            return cursor.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None
        return str(cursor.execute(f"PRAGMA {pragma}").fetchone()[0]).lower() != str(value).lower()


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
    return _SqliteDatabase(
        str(path),
        pragmas={
            # Before any table exists in a new file: purged space can go back to the file system
            # (jobs.purge runs give_back_space); on an older file this pragma alone does nothing.
            "auto_vacuum": "incremental",
            "journal_mode": "wal",  # readers never block the writer
            # The WAL is truncated back to this after a checkpoint (it grew to 400 MB under jobs
            # plus load and stayed that size).
            "journal_size_limit": 64 * 1024 * 1024,
            "synchronous": "normal",  # durable across process crashes in WAL mode
            "busy_timeout": 5000,  # writers queue instead of failing with "database is locked"
            "foreign_keys": 1,
            # KiB per connection, and there is one connection per worker thread: 4 MiB each bounds
            # the page caches at 16 MiB at the default 4 threads, 64 MiB at 16 (16 MiB each let deep
            # paging grow the server past 250 MB);
            # the OS page cache keeps the rest of the file warm.
            "cache_size": -4000,
        },
        timeout=5,
        check_same_thread=False,
    )


def open_database(settings: Settings) -> peewee.Database:
    """Bind the models to the configured database and bring its schema up to date."""
    database = make_database(settings)
    db.initialize(database)
    migrate_schema(database)
    with database.connection_context(), _schema_lock(database):
        claimed = backfill_owners()
    if claimed:
        log.info("payments given to their accounts", extra={"rows": claimed})
    return database


def backfill_owners() -> int:
    """Give payments without an owner (made before accounts owned payments) to the account that
    holds their email, if that account existed when the payment was made: an account registered
    later never gains the payments made before it. Runs at every start (cheap: a partial index
    holds only unowned rows), so rows an older replica wrote during a rolling update are owned too."""
    owner = (User.select(User.id)
             .where((User.email == Payment.email) & (User.created_at <= Payment.created_at)).limit(1))
    with db.atomic():
        return Payment.update(owner_id=owner).where(Payment.owner_id.is_null() & peewee.fn.EXISTS(owner)).execute()


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
        for name in OBSOLETE_INDEXES:
            database.execute_sql(f"DROP INDEX IF EXISTS {name}")


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


def is_busy(error: Exception) -> bool:
    """A SQLite lock wait that ran out (busy_timeout), as opposed to a database that is gone."""
    return not is_postgres() and "locked" in str(error)


def is_disk_full(error: Exception) -> bool:
    """The database's disk is full: SQLITE_FULL (SQLite rolled the write back; its connection
    stays sound and keeps serving reads) or PostgreSQL's disk_full. Not an outage: nothing needs
    reconnecting, and writes work again as soon as space is freed."""
    for cause in (error, *getattr(error, "args", ())[:1], error.__cause__, error.__context__):
        if getattr(cause, "sqlite_errorcode", None) is not None:
            return cause.sqlite_errorcode & 0xFF == _SQLITE_FULL
        if getattr(cause, "pgcode", None) is not None:
            return cause.pgcode == _PG_DISK_FULL
    return False


def give_back_space(pages: int) -> int:
    """SQLite: return up to `pages` free pages of the file to the file system (incremental
    auto-vacuum: a few milliseconds, no long lock). Files made before auto_vacuum was set keep
    their free pages for reuse (a one-off VACUUM switches them). PostgreSQL: autovacuum's job."""
    if is_postgres():
        return 0
    before = db.execute_sql("PRAGMA freelist_count").fetchone()[0]
    db.execute_sql(f"PRAGMA incremental_vacuum({int(pages)})")
    return before - db.execute_sql("PRAGMA freelist_count").fetchone()[0]


def write_transaction():
    """A transaction that will write, with its write lock taken first.

    SQLite: BEGIN IMMEDIATE, so the transaction queues for the file's one write lock in
    busy_timeout from its first statement. A deferred transaction that reads first and writes
    later cannot wait for the lock (its snapshot may be stale): SQLite answers SQLITE_BUSY at
    once, and two refreshes of one token at the same moment got DATABASE_BUSY. PostgreSQL: an
    ordinary transaction (row locks do the queueing)."""
    return db.atomic() if is_postgres() else db.atomic("IMMEDIATE")


def is_postgres(database: peewee.Database | None = None) -> bool:
    return isinstance(database or db.obj, peewee.PostgresqlDatabase)


def end_call() -> None:
    """Give this thread's pooled PostgreSQL connection back to the pool at the end of a call.

    Idle connections then sit in the pool, where release_connection can drop them all after an
    outage and stale_timeout recycles them; a worker thread never keeps one that died while it
    was idle. SQLite keeps its per-thread connection (opening one is a file open plus pragmas).
    """
    if not isinstance(db.obj, PooledPostgresqlDatabase):
        return
    try:
        if not db.is_closed():
            db.close()
    except Exception:
        log.debug("returning a connection to the pool failed", exc_info=True)
        release_connection()


def release_connection() -> None:
    """After a database error: drop this thread's connection, so the next call reconnects.

    On PostgreSQL the connection is closed for good rather than pooled, and so is every idle
    pooled connection: when the database restarts they all die together, and each would
    otherwise fail one more call after the database is back.
    """
    try:
        if isinstance(db.obj, PooledPostgresqlDatabase):
            db.obj.manual_close()
            db.obj.close_idle()
        elif not db.is_closed():
            db.close()
    except Exception:  # the connection may already be broken; dropping it is the point
        log.debug("closing a broken connection failed", exc_info=True)
