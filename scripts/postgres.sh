#!/usr/bin/env bash
# Start a throwaway PostgreSQL cluster on 127.0.0.1 for the shared Optuna / MLflow stores (issue 8).
#
# Idempotent: installs Debian's `postgresql` package if the server binaries are missing (needs root and apt),
# creates the cluster under a git-ignored folder on first use, starts it if it is not running, and makes sure
# the role and the databases exist. Prints the connection URL on its last line.
#
# Environment (all optional):
#   MOEKIT_PG_DIR   cluster folder            (default: <repo>/.cache/postgres, git-ignored)
#   MOEKIT_PG_PORT  TCP port on 127.0.0.1     (default: 54329)
#   MOEKIT_PG_NO_INSTALL=1  never call apt-get (fail instead)
# Usage:  scripts/postgres.sh [start|stop|url]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${MOEKIT_PG_DIR:-$repo/.cache/postgres}"
port="${MOEKIT_PG_PORT:-54329}"
role=moekit
pass=moekit
url="postgresql://$role:$pass@127.0.0.1:$port"
action="${1:-start}"

find_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  command -v pg_ctl >/dev/null 2>&1 && { dirname "$(command -v pg_ctl)"; return 0; }
  return 1
}

if [ "$action" = url ]; then echo "$url/moekit"; exit 0; fi

if ! bin="$(find_bin)"; then
  if [ "${MOEKIT_PG_NO_INSTALL:-0}" = 1 ]; then echo "postgres.sh: PostgreSQL server not installed" >&2; exit 1; fi
  if [ "$(id -u)" -ne 0 ]; then echo "postgres.sh: PostgreSQL missing; run as root to apt-get install it" >&2; exit 1; fi
  echo "postgres.sh: installing Debian's postgresql package" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  bin="$(find_bin)"
fi

# The server refuses to run as root: run it as the `postgres` system user when we are root.
if [ "$(id -u)" -eq 0 ]; then
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi

mkdir -p "$dir"
if [ "$(id -u)" -eq 0 ]; then
  [ -f "$dir/data/PG_VERSION" ] || chown postgres: "$dir"
  if ! as_pg test -w "$dir"; then
    # the repository lies where the postgres user cannot reach it (e.g. under /root): use /tmp instead
    dir="${TMPDIR:-/tmp}/moekit-postgres"
    echo "postgres.sh: repository not reachable by the postgres user; cluster in $dir" >&2
    mkdir -p "$dir" && chown postgres: "$dir"
  fi
fi

if [ "$action" = stop ]; then
  [ -f "$dir/data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null || true
  exit 0
fi

# A server already answering on the port (another checkout's cluster, a system service) is reused as is.
if "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" 2>/dev/null; then
  reuse=1
else
  reuse=0
fi

if [ "$reuse" = 0 ] && [ ! -f "$dir/data/PG_VERSION" ]; then
  as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=trust \
    -E UTF8 --locale=C.UTF-8 >/dev/null 2>&1 || as_pg "$bin/initdb" -D "$dir/data" -U postgres \
    --auth-local=trust --auth-host=trust -E UTF8 >/dev/null
fi

if [ "$reuse" = 0 ] && ! as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=200 -c fsync=off" \
    start >/dev/null
fi

psql_pg() { as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtAX "$@"; }
if [ "$(psql_pg -c "SELECT 1 FROM pg_roles WHERE rolname='$role'")" != 1 ]; then
  psql_pg -c "CREATE ROLE $role LOGIN CREATEDB PASSWORD '$pass'"
fi
for db in moekit moekit_optuna moekit_mlflow; do
  if [ "$(psql_pg -c "SELECT 1 FROM pg_database WHERE datname='$db'")" != 1 ]; then
    psql_pg -c "CREATE DATABASE $db OWNER $role"
  fi
done
echo "$url/moekit"
