"""The fast path: the only code that reaches into peewee's internals, so the hot calls skip the
SQL building and row making that cost more than the database itself (numbers beside each part).

Everything here runs the same SQL peewee would run, and tests/unit/test_storage.py holds each
part to peewee's own result.
"""

from __future__ import annotations

import itertools
import logging
import re
import weakref
from typing import Callable, Sequence

import peewee

from server.infra import tracing
from server.infra.storage.database import is_postgres
from server.infra.storage.models import db

class Prepared:
    """A query of fixed shape, turned into SQL once per kind of database, then run with values.

    Peewee takes far longer to build the SQL text of a simple SELECT than SQLite takes to run
    it (about 0.4 ms against 0.01 ms for a primary-key lookup), so the hot read paths build it
    once. `build(param)` returns the peewee query, using `param("name")` wherever a value goes;
    calling the Prepared with name=value runs it and returns its rows as `record`s (a NamedTuple
    whose fields are the selected columns' names; `_RecordMaker`). Only for values peewee passes
    through unchanged (text, and row values), not typed fields.

    On PostgreSQL the query is also a server-side prepared statement (`_PgStatement`), so the
    database plans it once per connection instead of on every call.
    """

    _count = itertools.count()

    def __init__(self, build: Callable[[Callable[[str], str]], peewee.ModelSelect], record: type[tuple]):
        self._build, self._record = build, record
        self._name = f"payments_q{next(Prepared._count)}"
        self._compiled: dict[type, tuple[str, list[tuple[bool, object]], _RecordMaker, _PgStatement | None]] = {}

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
        return sql, slots, _RecordMaker(query.model, self._record), statement

    def _run(self, values: dict, fetch: Callable) -> list:
        key = type(db.obj)
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = self._compile()
        sql, slots, make, statement = compiled
        cursor, rows = _execute(sql, [values[v] if is_param else v for is_param, v in slots], fetch, statement)
        return make(cursor.description, rows)

    def __call__(self, **values) -> list:
        return self._run(values, _fetch_all)

    def first(self, **values):
        """The first row or None, without stepping the cursor past it (the query has LIMIT 1)."""
        made = self._run(values, _fetch_one)
        return made[0] if made else None


class PreparedInsert:
    """An INSERT of one row with every column, its SQL built once per kind of database.

    Peewee builds an INSERT's SQL on every save (about 0.4 ms for a payment, half of a create on
    SQLite); the values still go through each field's db_value, as save() would send them. A row
    is a `record` (a NamedTuple with the model's field names) or, for many(), a dict.
    """

    def __init__(self, model: type[peewee.Model], record: type[tuple] | None = None):
        self.model = model
        # Every column but an auto-increment key, which the database numbers itself.
        self._fields = [f for f in model._meta.sorted_fields if not isinstance(f, peewee.AutoField)]
        self._slots = [(record._fields.index(f.name), _converter(f)) for f in self._fields] if record else None
        self._converters = [(f.name, _converter(f)) for f in self._fields]
        self._compiled: dict[type, str] = {}

    def _compile(self) -> str:
        markers = {f"\x00{f.name}\x00": f for f in self._fields}
        sql, params = self.model.insert({f: peewee.Value(m) for m, f in markers.items()}).sql()
        if params != list(markers):
            raise ValueError(f"a column did not reach the SQL as a parameter: {sql}")
        return sql

    def _sql(self) -> str:
        sql = self._compiled.get(type(db.obj))
        if sql is None:
            sql = self._compiled[type(db.obj)] = self._compile()
        return sql

    def values(self, row: tuple) -> list:
        """The record `row` as the INSERT's parameters."""
        return [convert(row[i]) for i, convert in self._slots]

    def dict_values(self, row: dict) -> list:
        """The dict `row` (of every column) as the INSERT's parameters."""
        return [convert(row.get(name)) for name, convert in self._converters]

    def __call__(self, row: tuple) -> None:
        """Insert the record `row` (IntegrityError and the rest as peewee raises them)."""
        _execute(self._sql(), self.values(row))

    def many(self, rows: Sequence[dict]) -> None:
        """Insert `rows` (dicts of every column) in one statement: the single-row VALUES group
        repeated. insert_many builds the same SQL value by value, about 0.2 ms per row (a
        500-row expiry batch spent 85 ms of Python in it, holding the GIL the API threads need)."""
        if not rows:
            return
        head, _, values = self._sql().rpartition(" VALUES ")
        group, tail = values[:values.index(")") + 1], values[values.index(")") + 1:]  # tail: PG's RETURNING
        _execute(f"{head} VALUES {', '.join([group] * len(rows))}{tail}",
                 [value for row in rows for value in self.dict_values(row)])


def _converter(field: peewee.Field) -> Callable:
    """The field's db_value, or for text and integer fields one that hands a str or an int on
    without a call into peewee (whose CharField and IntegerField adapt them to themselves; a
    create converted twenty values through three calls each)."""
    if type(field) in (peewee.CharField, peewee.TextField, peewee.FixedCharField):
        return _text
    if type(field) in (peewee.IntegerField, peewee.BigIntegerField):
        return _integer
    return field.db_value


def _text(value):
    return value if value is None or type(value) is str else peewee.CharField().db_value(value)


def _integer(value):
    return value if value is None or type(value) is int else peewee.BigIntegerField().db_value(value)


class PreparedCreate:
    """The fast path of a create: a payment and its history event written in one transaction, with
    as little around the two INSERTs as each database allows.

    PostgreSQL: both INSERTs in one statement string, one round trip. The server's protocol runs
    the statements of one such message as a single transaction (an implicit one, committed
    together, or rolled back together when either fails), so the history row is still written by
    the change's own transaction; BEGIN, the two INSERTs and COMMIT had been four round trips.
    SQLite: BEGIN, the two INSERTs, COMMIT, as before (in-process, no round trips to save).

    Returns False, with nothing written, when the payment's INSERT is refused (its (created_by,
    request_id) pair is taken: a retry, or a concurrent one that won); an event that cannot be
    written raises, and its payment is not written either."""

    def __init__(self, payments: PreparedInsert, events: PreparedInsert):
        self.payments, self.events = payments, events
        self._joined: dict[type, str] = {}
        self._skipping: dict[type, str] = {}

    def __call__(self, payment: tuple, event: dict) -> bool:
        if is_postgres() and not db.in_transaction():
            key = type(db.obj)
            sql = self._joined.get(key)
            if sql is None:
                sql = self._joined[key] = f"{self.payments._sql()}; {self.events._sql()}"
            try:
                _execute(sql, self.payments.values(payment) + self.events.dict_values(event))
            except peewee.IntegrityError as e:
                table = getattr(getattr(getattr(e, "orig", None), "diag", None), "table_name", None)
                if table != self.payments.model._meta.table_name:
                    raise
                return False
            return True
        if is_postgres():  # inside a caller's transaction: a savepoint undoes a refused INSERT alone
            with db.atomic():
                try:
                    with db.atomic():
                        self.payments(payment)
                except peewee.IntegrityError:
                    return False
                _execute(self.events._sql(), self.events.dict_values(event))
            return True
        # SQLite: a taken request_id is skipped (ON CONFLICT DO NOTHING, no rows changed), not
        # raised: with the INSERT failing inside the transaction, 48 concurrent retries of one
        # request_id from 16 threads left one thread holding the write lock while the others
        # waited out busy_timeout (DATABASE_BUSY); skipped, none did, in 30 rounds.
        sql = self._skipping.get(type(db.obj))
        if sql is None:
            sql = self._skipping[type(db.obj)] = f"{self.payments._sql()} ON CONFLICT DO NOTHING"
        with db.atomic():
            cursor, _ = _execute(sql, self.payments.values(payment))
            if cursor.rowcount == 0:
                return False
            _execute(self.events._sql(), self.events.dict_values(event))
        return True


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
    if tracing.enabled():
        with tracing.query(sql, "postgresql" if is_postgres() else "sqlite"):
            return _run(sql, params, fetch, statement)
    return _run(sql, params, fetch, statement)


def _run(sql: str, params: list, fetch: Callable | None, statement: _PgStatement | None) -> tuple:
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


class _RecordMaker:
    """Records from raw rows: each column converted as its peewee field would (python_value; the
    plain text and integer columns need nothing), then the tuple made in one step. Peewee's own
    cursor wrapper, which makes a model per row, cost about 0.2 ms per query on the hot path, more
    than the query itself. One per SQL text, so the columns are always the same;
    tests/unit/test_storage.py holds it to peewee's result."""

    def __init__(self, model: type[peewee.Model], record: type[tuple]):
        self.model, self.record = model, record
        self._layout: tuple[list[int] | None, list[tuple[int, Callable]]] | None = None

    def __call__(self, description, rows) -> list:
        if not rows:
            return []
        if self._layout is None:
            fields = [self.model._meta.columns[d[0]] for d in description]
            position = {f.name: i for i, f in enumerate(fields)}
            order = [position[name] for name in self.record._fields]
            converters = [(j, fields[i].python_value) for j, i in enumerate(order)
                          if not isinstance(fields[i], _PLAIN_FIELDS)]
            self._layout = (None if order == list(range(len(fields))) else order, converters)
        order, converters = self._layout
        make = self.record._make
        made = []
        for row in rows:
            values = list(row) if order is None else [row[i] for i in order]
            for j, convert in converters:
                values[j] = convert(values[j])
            made.append(make(values))
        return made


def row_check(field: peewee.Field):
    """The column as a condition checked on rows found otherwise (by primary key), never used to
    find them. On SQLite that is `+column`, its documented way to take a term out of index
    selection (the unary + changes no value); on PostgreSQL `COALESCE(column, column)`, the same
    value in a form no index matches. tests/unit/test_query_plans.py pins the job statements' plans."""
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
