#!/usr/bin/env bash
# Starts the machine's PostgreSQL (Debian's cluster 15/main) if it is not running, makes sure the
# test role and database exist, and prints the DATABASE_URL the tests use. Used by `make test`.
set -euo pipefail
user=payments_test db=payments_test pass=payments_test
version=${PG_VERSION:-15}
if ! command -v pg_ctlcluster >/dev/null; then
  echo "PostgreSQL is not installed: apt-get install postgresql" >&2; exit 1
fi
if ! pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" && $4=="online"' | grep -q .; then
  pg_ctlcluster "$version" main start >&2
fi
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
port=$(pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $3}')
as_pg psql -p "$port" -qtA -v ON_ERROR_STOP=1 >/dev/null <<SQL
SELECT 'CREATE ROLE $user LOGIN PASSWORD ''$pass''' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname='$user')\gexec
ALTER ROLE $user CREATEDB;
SELECT 'CREATE DATABASE $db OWNER $user' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname='$db')\gexec
SQL
echo "postgresql://$user:$pass@127.0.0.1:$port/$db"
