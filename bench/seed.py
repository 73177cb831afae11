"""Fill the payments table with many rows by bulk SQL (INSERT ... SELECT, not RPCs), for the
paging benchmark.

    python bench/seed.py --rows 1000000 [--database-url postgresql://...] [--data-dir DIR]

The database generates the rows itself (a recursive CTE on SQLite, generate_series on
PostgreSQL), so a million rows take seconds. They are spread over 10,000 payers, one of whom
(--email, default bench@example.com, account --owner, default usr_bench) owns --share of them, so a customer's page 1,000 is as deep
as an admin's. Timestamps go back one second per row from now (plus random microseconds, in the
server's fixed text form); ids have the server's format; the schema is the server's own
(storage.open_database), so the server reads the table exactly as if it had written it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.infra import config, storage  # noqa: E402

COLUMNS = ("id, email, owner_id, amount, currency, description, status, failure_reason, created_by, "
           "created_at, updated_at, expires_at")

# Payment ids are "pay_" + 26 chars of [a-z2-7]; hex digits 0, 1, 8, 9 are mapped into that set.
SQLITE = f"""
WITH RECURSIVE seq(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM seq WHERE n < :rows - 1),
gen AS MATERIALIZED (SELECT n, unixepoch('now') - n AS at, abs(random()) % 1000000 AS us,
                           abs(random()) % 1000000 < :share * 1000000 AS mine, abs(random()) % 10000 AS payer
                    FROM seq)
INSERT INTO payments ({COLUMNS})
SELECT 'pay_' || replace(replace(replace(replace(lower(hex(randomblob(13))), '0', 'k'), '1', 'm'), '8', 'n'), '9', 'p'),
       CASE WHEN mine THEN :email ELSE 'payer' || payer || '@example.com' END,
       CASE WHEN mine THEN :owner ELSE 'usr_payer' || payer END,
       1 + abs(random()) % 10000000, 'IDR', 'seeded',
       CASE n % 3 WHEN 0 THEN 'pending' WHEN 1 THEN 'success' ELSE 'failed' END,
       CASE n % 3 WHEN 2 THEN 'cancelled' END,
       'usr_seed',
       printf('%s.%06d', datetime(at, 'unixepoch'), us),
       printf('%s.%06d', datetime(at, 'unixepoch'), us),
       printf('%s.%06d', datetime(at + 86400, 'unixepoch'), us)
FROM gen
"""

POSTGRES = f"""
INSERT INTO payments ({COLUMNS})
SELECT 'pay_' || translate(substr(md5(random()::text || n::text), 1, 26), '0189', 'kmnp'),
       CASE WHEN mine THEN %(email)s ELSE 'payer' || payer || '@example.com' END,
       CASE WHEN mine THEN %(owner)s ELSE 'usr_payer' || payer END,
       1 + floor(random() * 10000000)::bigint, 'IDR', 'seeded',
       CASE n %% 3 WHEN 0 THEN 'pending' WHEN 1 THEN 'success' ELSE 'failed' END,
       CASE n %% 3 WHEN 2 THEN 'cancelled' END,
       'usr_seed', at, at, at + interval '1 day'
FROM (SELECT n, date_trunc('second', now() AT TIME ZONE 'UTC') - n * interval '1 second'
                + floor(random() * 1000000) * interval '1 microsecond' AS at,
             random() < %(share)s AS mine, floor(random() * 10000)::int AS payer
      FROM generate_series(0, %(rows)s - 1) AS n) AS gen
"""


def seed_sqlite(database, count: int, email: str, owner: str, share: float) -> None:
    """A bulk load before the server starts: no journal, a big cache, and the secondary indexes
    built once at the end (one sort each) instead of maintained row by row."""
    database.execute_sql("PRAGMA journal_mode = OFF")
    database.execute_sql("PRAGMA synchronous = OFF")
    database.execute_sql("PRAGMA cache_size = -262144")
    indexes = [name for (name,) in database.execute_sql(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'payments' AND sql IS NOT NULL")]
    for name in indexes:
        database.execute_sql(f'DROP INDEX "{name}"')
    with database.atomic():
        database.execute_sql(SQLITE, {"rows": count, "email": email, "owner": owner, "share": share})
    database.create_tables([storage.Payment], safe=True)  # the server's own index definitions
    database.execute_sql("PRAGMA journal_mode = WAL")


def seed(settings: config.Settings, count: int, email: str, share: float, owner: str = "usr_bench") -> float:
    """Insert `count` rows; returns the seconds it took.

    PostgreSQL is ANALYZEd afterwards, as its autovacuum would do soon after such a load; SQLite
    is not, because the server never runs ANALYZE there: its plans must be right without
    statistics, and the benchmark should see the plans a real SQLite deployment gets."""
    database = storage.open_database(settings)
    start = time.perf_counter()
    with database.connection_context():
        if storage.is_postgres(database):
            with database.atomic():
                database.execute_sql(POSTGRES, {"rows": count, "email": email, "owner": owner, "share": share})
            database.execute_sql("ANALYZE")
        else:
            seed_sqlite(database, count, email, owner, share)
    database.close()
    return time.perf_counter() - start


# The benchmark's callers: (account id, email, role, session id). Every protected call checks the
# session its token names, as in production, so the accounts and sessions exist for real.
CALLERS = (("usr_bench", "bench@example.com", "customer", "ses_bench"),
           ("usr_bench_admin", "bench-admin@example.com", "admin", "ses_bench_admin"))


def seed_callers(settings: config.Settings, callers=CALLERS) -> None:
    database = storage.open_database(settings)
    now = dt.datetime.now(dt.timezone.utc)
    with database.connection_context():
        for user_id, email, role, session_id in callers:
            storage.User.insert(id=user_id, email=email, password_hash="!", role=role,
                                created_at=now - dt.timedelta(days=400)).on_conflict_ignore().execute()
            storage.Session.insert(id=session_id, user_id=user_id, role=role, created_at=now,
                                   expires_at=now + dt.timedelta(days=1)).on_conflict_ignore().execute()
    database.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--email", default="bench@example.com")
    parser.add_argument("--owner", default="usr_bench")
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()
    settings = dataclasses.replace(config.Settings(), database_url=args.database_url, data_dir=args.data_dir)
    took = seed(settings, args.rows, args.email, args.share, args.owner)
    print(f"seeded {args.rows} payments in {took:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
