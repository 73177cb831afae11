"""Storage: the peewee models, the database they live in, and the queries the rules need.

SQLite (a WAL-mode file, one connection per server thread) is the default; PostgreSQL is used
when DATABASE_URL says so, through a connection pool. Both get the same schema, created and
extended at start-up (`open_database`), so no deployment needs a manual migration step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import re
import weakref
from pathlib import Path
from typing import Callable, Iterable, Sequence

import peewee
from playhouse import migrate as pw_migrate
from playhouse.db_url import parse as parse_db_url
from playhouse.pool import PooledPostgresqlDatabase

from server.infra.config import Settings

log = logging.getLogger(__name__)

db = peewee.DatabaseProxy()

UTC = dt.timezone.utc

# What a database outage looks like to peewee; the gRPC layer maps these to UNAVAILABLE.
OUTAGE_ERRORS = (peewee.OperationalError, peewee.InterfaceError)
# Values the database refused: a client's input, however it got past validation.
DATA_ERRORS = (peewee.DataError,)


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
        if value is None:
            return None
        if isinstance(value, str) and len(value) == 26:  # our own fixed form (SQLite)
            try:  # ten times faster than peewee's strptime formats
                return dt.datetime.fromisoformat(value + "+00:00")
            except ValueError:
                pass
        elif isinstance(value, dt.datetime):  # PostgreSQL: naive UTC
            return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
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
    # The customer account the payment belongs to: what grants a customer access, never the email.
    # NULL only for rows from before accounts owned payments whose email had no account then.
    owner_id = peewee.CharField(max_length=40, null=True)
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
    deleted_at = UTCDateTimeField(null=True)  # indexed only where set: see below the class

    class Meta:
        table_name = "payments"
        indexes = (
            (("created_at", "id"), False),  # keyset paging over everything (admins)
            (("email", "created_at", "id"), False),  # keyset paging by payer email (admins' filter)
            (("owner_id", "created_at", "id"), False),  # keyset paging of one customer's own
            (("status", "expires_at", "id"), False),  # the expiry job's scan, batch after batch
            (("status", "created_at", "id"), False),  # status filter
            (("created_by", "request_id"), True),  # idempotency; NULL request_ids never clash
        )


# Only soft-deleted rows are indexed by deleted_at (the retention job's scan). An index over every
# row, nearly all NULL, lured planners into answering "deleted_at IS NULL" from it and sorting
# every live row: on SQLite without statistics, each admin page of a million rows took 0.6 s.
Payment.add_index(Payment.index(Payment.deleted_at, Payment.id, name="payments_deleted_set")
                  .where(Payment.deleted_at.is_null(False)))
# Indexes a newer one replaced: dropped by migrate_schema.
OBSOLETE_INDEXES = ("payments_status_expires_at", "payments_deleted_at_set")
# And only unowned rows by id (the start-up backfill's scan; see backfill_owners).
Payment.add_index(Payment.index(Payment.id, name="payments_unowned").where(Payment.owner_id.is_null()))


class PaymentEvent(BaseModel):
    """The append-only history of a payment: one row per change (created, confirmed, cancelled,
    expired, deleted, undeleted), written in the transaction that makes the change, so there is
    exactly one per change and none for a change that rolled back. Kept as long as the payment."""

    number = peewee.BigAutoField()  # the order of events (per payment and overall)
    id = peewee.CharField(max_length=40, unique=True)  # opaque, for the API
    payment_id = peewee.CharField(max_length=40)
    at = UTCDateTimeField()
    action = peewee.CharField(max_length=16)
    from_status = peewee.CharField(max_length=16, null=True)
    to_status = peewee.CharField(max_length=16)
    failure_reason = peewee.CharField(max_length=16, null=True)
    actor_id = peewee.CharField(max_length=40, default="")  # empty: the service itself (expiry)
    actor_role = peewee.CharField(max_length=16)  # customer, admin or system

    class Meta:
        table_name = "payment_events"
        indexes = ((("payment_id", "number"), False),)


class User(BaseModel):
    """Callers of the API. The earlier brief's unique index on email belongs here."""

    id = peewee.CharField(primary_key=True, max_length=40)
    email = peewee.CharField(max_length=254, unique=True)
    password_hash = peewee.CharField(max_length=255)
    role = peewee.CharField(max_length=16, default="customer")
    created_at = UTCDateTimeField()
    disabled_at = UTCDateTimeField(null=True)  # set: no login, no refresh, every session ends

    class Meta:
        table_name = "users"


class Session(BaseModel):
    """One login: what its access tokens (claim `sid`) and refresh tokens belong to. Revoking it
    (logout, reuse of a refresh token, an operator) ends them all (server/domain/sessions.py)."""

    id = peewee.CharField(primary_key=True, max_length=48)
    user_id = peewee.CharField(max_length=40, index=True)
    created_at = UTCDateTimeField()
    expires_at = UTCDateTimeField()  # the refresh tokens' absolute end: log in again after it
    revoked_at = UTCDateTimeField(null=True)
    revoke_reason = peewee.CharField(max_length=64, null=True)

    class Meta:
        table_name = "sessions"


class RefreshToken(BaseModel):
    """A refresh token, by its SHA-256 (the token itself is never stored). Used once."""

    hash = peewee.CharField(primary_key=True, max_length=64)
    session_id = peewee.CharField(max_length=48, index=True)
    issued_at = UTCDateTimeField()
    used_at = UTCDateTimeField(null=True)

    class Meta:
        table_name = "refresh_tokens"


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


MODELS: Sequence[type[BaseModel]] = (Payment, PaymentEvent, User, Session, RefreshToken, JobRun)


class Prepared:
    """A query of fixed shape, turned into SQL once per kind of database, then run with values.

    Peewee takes far longer to build the SQL text of a simple SELECT than SQLite takes to run
    it (about 0.4 ms against 0.01 ms for a primary-key lookup), so the hot read paths build it
    once. `build(param)` returns the peewee query, using `param("name")` wherever a value goes;
    calling the Prepared with name=value runs it and returns model instances, as the query would.
    Only for values peewee passes through unchanged (text, and row values), not typed fields.

    The rows are turned into models here too (`_RowMaker`): peewee's own cursor wrapper costs
    about 0.2 ms per query on this path, more than the query itself.

    On PostgreSQL the query is also a server-side prepared statement (`_PgStatement`), so the
    database plans it once per connection instead of on every call.
    """

    _count = itertools.count()

    def __init__(self, build: Callable[[Callable[[str], str]], peewee.ModelSelect]):
        self._build = build
        self._name = f"payments_q{next(Prepared._count)}"
        self._compiled: dict[type, tuple[str, list[tuple[bool, object]], _RowMaker, _PgStatement | None]] = {}

    def _compile(self):
        names: dict[str, str] = {}

        def param(name: str) -> str:
            names[f"\x00{name}\x00"] = name
            return f"\x00{name}\x00"

        query = self._build(param)
        sql, params = query.sql()
        slots = [(True, names[p]) if isinstance(p, str) and p in names else (False, p) for p in params]
        if {v for is_param, v in slots if is_param} != set(names.values()):
            raise ValueError(f"a parameter did not reach the SQL unchanged: {sql}")
        statement = _PgStatement(self._name, sql, len(slots)) if is_postgres() else None
        return sql, slots, _RowMaker(query.model), statement

    def _run(self, values: dict, fetch: Callable) -> list[peewee.Model]:
        key = type(db.obj)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile()
        sql, slots, make, statement = compiled
        cursor, rows = _execute(sql, [values[v] if is_param else v for is_param, v in slots], fetch, statement)
        return make(cursor.description, rows)

    def __call__(self, **values) -> list[peewee.Model]:
        return self._run(values, _fetch_all)

    def first(self, **values) -> peewee.Model | None:
        """The first row or None, without stepping the cursor past it (the query has LIMIT 1)."""
        made = self._run(values, _fetch_one)
        return made[0] if made else None


class PreparedInsert:
    """An INSERT of one model row with every column, its SQL built once per kind of database.

    Peewee builds an INSERT's SQL on every save (about 0.4 ms for a payment, half of a create on
    SQLite); the values still go through each field's db_value, as save() would send them.
    """

    def __init__(self, model: type[peewee.Model]):
        self.model = model
        # Every column but an auto-increment key, which the database numbers itself.
        self._fields = [f for f in model._meta.sorted_fields if not isinstance(f, peewee.AutoField)]
        self._compiled: dict[type, str] = {}

    def _compile(self) -> str:
        markers = {f"\x00{f.name}\x00": f for f in self._fields}
        sql, params = self.model.insert({f: peewee.Value(m) for m, f in markers.items()}).sql()
        if params != list(markers):
            raise ValueError(f"a column did not reach the SQL as a parameter: {sql}")
        return sql

    def __call__(self, row: peewee.Model) -> None:
        """Insert `row` (IntegrityError and the rest as peewee raises them); it is clean afterwards."""
        sql = self._compiled.get(type(db.obj))
        if sql is None:
            sql = self._compiled[type(db.obj)] = self._compile()
        data = row.__data__
        _execute(sql, [f.db_value(data.get(f.name)) for f in self._fields])
        row._dirty.clear()

    def many(self, rows: Sequence[dict]) -> None:
        """Insert `rows` (dicts of every column) in one statement: the single-row VALUES group
        repeated. insert_many builds the same SQL value by value, about 0.2 ms per row (a
        500-row expiry batch spent 85 ms of Python in it, holding the GIL the API threads need)."""
        if not rows:
            return
        sql = self._compiled.get(type(db.obj))
        if sql is None:
            sql = self._compiled[type(db.obj)] = self._compile()
        head, _, values = sql.rpartition(" VALUES ")
        group, tail = values[:values.index(")") + 1], values[values.index(")") + 1:]  # tail: PG's RETURNING
        _execute(f"{head} VALUES {', '.join([group] * len(rows))}{tail}",
                 [f.db_value(row.get(f.name)) for row in rows for f in self._fields])


class _PgStatement:
    """A PostgreSQL prepared statement for one query: PREPARE once per connection, then EXECUTE.

    Planning a primary-key lookup took PostgreSQL longer than running it (a GetPayment round trip
    measured 200-230 us plain, 126-160 us prepared), and on a small node the database shares the
    CPU with the server. Each connection remembers what it has prepared (`_PREPARED`); a new
    connection (after an outage, or from the pool's recycling) prepares again. Needs session-level
    connections: no PgBouncer in transaction mode in front (the Cloud SQL Auth Proxy is fine).
    """

    __slots__ = ("name", "prepare", "execute")

    def __init__(self, name: str, sql: str, count: int):
        numbers = iter(range(1, count + 1))
        self.name = name
        self.prepare = f"PREPARE {name} AS " + re.sub(r"%s", lambda _: f"${next(numbers)}", sql)
        if next(numbers, None) is not None or "%%" in sql:
            raise ValueError(f"cannot number the parameters of: {sql}")
        self.execute = f"EXECUTE {name}({', '.join(['%s'] * count)})" if count else f"EXECUTE {name}"

    def run(self, cursor, params: list) -> None:
        prepared = _PREPARED.get(cursor.connection)
        if prepared is None:
            prepared = _PREPARED[cursor.connection] = set()
        if self.name not in prepared:
            cursor.execute(self.prepare)
            prepared.add(self.name)
        cursor.execute(self.execute, params)


# The statements each PostgreSQL connection has prepared; forgotten with the connection.
_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _execute(sql: str, params: list, fetch: Callable | None = None, statement: _PgStatement | None = None) -> tuple:
    """What Database.execute_sql does (its statement log included, when enabled), then `fetch`:
    driver errors become peewee's, also while SQLite steps through the rows. (cursor, fetched)"""
    if _PEEWEE_LOG.isEnabledFor(logging.DEBUG):
        _PEEWEE_LOG.debug((sql, params))
    with _DB_ERRORS:
        cursor = db.obj.cursor()
        if statement is None:
            cursor.execute(sql, params)
        else:
            statement.run(cursor, params)
        return cursor, fetch(cursor) if fetch is not None else None


def _fetch_all(cursor) -> list[tuple]:
    return cursor.fetchall()


def _fetch_one(cursor) -> list[tuple]:
    row = cursor.fetchone()
    cursor.close()
    return [] if row is None else [row]


_PEEWEE_LOG = logging.getLogger("peewee")

# Turns the database driver's errors into peewee's (OperationalError, IntegrityError, ...).
_DB_ERRORS = getattr(peewee, "__exception_wrapper__")

# Fields whose values both drivers already return as the Python type peewee would make.
_PLAIN_FIELDS = (peewee.CharField, peewee.TextField, peewee.IntegerField)


class _RowMaker:
    """Model instances from raw rows, the way peewee's ModelObjectCursorWrapper makes them (a
    model with __data__ set and nothing dirty), minus its per-query set-up and per-field setattr.
    One per SQL text, so the columns are always the same. tests/test_storage.py holds the two
    to the same result."""

    def __init__(self, model: type[peewee.Model]):
        self.model = model
        self._layout: tuple[list[str], list[tuple[int, str, Callable]]] | None = None

    def __call__(self, description, rows) -> list[peewee.Model]:
        if not rows:
            return []
        if self._layout is None:
            fields = [self.model._meta.columns[d[0]] for d in description]
            self._layout = ([f.name for f in fields],
                            [(i, f.name, f.python_value) for i, f in enumerate(fields) if not isinstance(f, _PLAIN_FIELDS)])
        names, converters = self._layout
        model, new = self.model, self.model.__new__
        made = []
        for row in rows:
            data = dict(zip(names, row))
            for i, name, convert in converters:
                data[name] = convert(row[i])
            obj = new(model)
            obj.__data__, obj._dirty, obj.__rel__ = data, set(), {}
            made.append(obj)
        return made


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
            # KiB per connection, and there is one connection per worker thread: 16 x 4 MiB bounds
            # the page caches at 64 MiB (16 MiB each let deep paging grow the server past 250 MB);
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


def row_check(field: peewee.Field):
    """The column as a condition checked on rows found otherwise (by primary key), never used to
    find them. On SQLite that is `+column`, its documented way to take a term out of index
    selection (the unary + changes no value); on PostgreSQL `COALESCE(column, column)`, the same
    value in a form no index matches. tests/test_query_plans.py pins the job statements' plans."""
    if is_postgres():
        return peewee.fn.COALESCE(field, field)
    return peewee.NodeList((peewee.SQL("+"), field), glue="")


def among(field: peewee.Field, values: Sequence[str]):
    """`field IN (values)` for text values, with the placeholders written at once: peewee's
    in_() builds a 500-value list value by value (about 25 ms of Python per job batch)."""
    if not values:
        return peewee.SQL("1 = 0")
    marks = ", ".join([db.param] * len(values))
    return peewee.NodeList((field, peewee.SQL(f"IN ({marks})", list(values))))


def give_back_space(pages: int) -> int:
    """SQLite: return up to `pages` free pages of the file to the file system (incremental
    auto-vacuum: a few milliseconds, no long lock). Files made before auto_vacuum was set keep
    their free pages for reuse (a one-off VACUUM switches them). PostgreSQL: autovacuum's job."""
    if is_postgres():
        return 0
    before = db.execute_sql("PRAGMA freelist_count").fetchone()[0]
    db.execute_sql(f"PRAGMA incremental_vacuum({int(pages)})")
    return before - db.execute_sql("PRAGMA freelist_count").fetchone()[0]


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
