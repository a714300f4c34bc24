#!/usr/bin/env bash
# Start a local PostgreSQL cluster on 127.0.0.1 for the shared Optuna / MLflow stores (issues 8, 14).
#
# Idempotent: installs Debian's `postgresql` package if the server binaries are missing (needs root and apt),
# creates the cluster under a git-ignored folder on first use, starts it if it is not running, and makes sure
# the role and the databases exist. Prints the connection URL on its last line.
#
# Access: TCP clients (127.0.0.1 and ::1 only) authenticate with a password (scram-sha-256). The `moekit`
# role's password is random, made on first use and kept in <cluster folder>/password (mode 0600, outside the
# repository's tracked files); `scripts/postgres.sh url` prints the URL with it. The script itself reaches the
# server through the Unix socket in the cluster folder with peer authentication (the OS user that runs the
# server, mapped to the superuser `postgres`); the superuser has no password and cannot log in over TCP.
#
# A cluster made by an earlier version of this script (trust authentication, fixed password) is migrated in
# place on its next start: pg_hba.conf rewritten, a random password set, the configuration reloaded (or the
# server started); its databases are kept.
#
# Durability: the server runs with fsync on. `start --test` (only tests/parallel/conftest.py and .ci/run use
# it) starts it with fsync=off, faster and unsafe on a crash; a plain `start` finding this cluster running with
# fsync=off says so on stderr (it does not restart it under the tests' feet).
#
# Environment (all optional):
#   MOEKIT_PG_DIR   cluster folder            (default: <repo>/.cache/postgres, git-ignored)
#   MOEKIT_PG_PORT  TCP port on 127.0.0.1     (default: 54329)
#   MOEKIT_PG_NO_INSTALL=1  never call apt-get (fail instead)
# Usage:  scripts/postgres.sh [start [--test] | stop | url]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${MOEKIT_PG_DIR:-$repo/.cache/postgres}"
port="${MOEKIT_PG_PORT:-54329}"
role=moekit
superuser=postgres
action=start
test_mode=0
for arg in "$@"; do
  case "$arg" in
    start | stop | url) action="$arg" ;;
    --test) test_mode=1 ;;
    *) echo "usage: scripts/postgres.sh [start [--test] | stop | url]" >&2; exit 2 ;;
  esac
done

find_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/pg_ctl" ] && { echo "$d"; return 0; }
  done
  command -v pg_ctl >/dev/null 2>&1 && { dirname "$(command -v pg_ctl)"; return 0; }
  return 1
}

# as root, the cluster may live in ${TMPDIR:-/tmp}/moekit-postgres (see below)
password_file() {
  local d
  for d in "$dir" "${TMPDIR:-/tmp}/moekit-postgres"; do
    [ -s "$d/password" ] && { echo "$d/password"; return 0; }
    [ "$(id -u)" -eq 0 ] || break
  done
  return 1
}

if [ "$action" = url ]; then
  if ! pwfile="$(password_file)"; then
    echo "postgres.sh: no password file in $dir: start the cluster first (scripts/postgres.sh start)" >&2
    exit 1
  fi
  echo "postgresql://$role:$(cat "$pwfile")@127.0.0.1:$port/moekit"
  exit 0
fi

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
data="$dir/data"

if [ "$action" = stop ]; then
  [ -f "$data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$data" -m fast stop >/dev/null || true
  exit 0
fi

running=0
as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1 && running=1

pwfile="$dir/password"
if [ ! -s "$pwfile" ]; then
  # 48 hex digits from the kernel's CSPRNG: no quoting needed in SQL or URLs
  (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$pwfile.tmp" && mv "$pwfile.tmp" "$pwfile")
fi
chmod 600 "$pwfile"
pass="$(cat "$pwfile")"
url="postgresql://$role:$pass@127.0.0.1:$port/moekit"

if [ "$running" = 0 ] && "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" 2>/dev/null; then
  # another server answers on the port: usable only if it is this cluster's (same role and password)
  if PGPASSWORD="$pass" PGCONNECT_TIMEOUT=3 "$bin/psql" -h 127.0.0.1 -p "$port" -U "$role" -d moekit \
    -qtAX -c "SELECT 1" >/dev/null 2>&1; then
    echo "$url"
    exit 0
  fi
  echo "postgres.sh: another PostgreSQL server answers on 127.0.0.1:$port and refuses the password of the" \
    "cluster in $dir; set MOEKIT_PG_PORT to a free port, or MOEKIT_PG_DIR to that server's cluster folder" >&2
  exit 1
fi

write_auth() {
  local osuser
  osuser="$(as_pg id -un)"
  as_pg tee "$data/pg_hba.conf" >/dev/null <<EOF
# Written by scripts/postgres.sh. Unix socket (in the cluster folder): peer authentication, the server's OS
# user mapped to the superuser; TCP on loopback only: password (scram-sha-256). Nothing else connects.
# TYPE  DATABASE  USER  ADDRESS        METHOD
local   all       all                  peer map=moekit
host    all       all   127.0.0.1/32   scram-sha-256
host    all       all   ::1/128        scram-sha-256
EOF
  as_pg tee "$data/pg_ident.conf" >/dev/null <<EOF
# Written by scripts/postgres.sh: the OS user running the server is the superuser; others keep their name.
# MAPNAME  SYSTEM-USERNAME  PG-USERNAME
moekit     $osuser          $superuser
moekit     /^(.*)\$          \1
EOF
}

if [ ! -f "$data/PG_VERSION" ]; then
  # no host access at all until write_auth: the superuser has no password
  as_pg "$bin/initdb" -D "$data" -U "$superuser" --auth-local=peer --auth-host=reject \
    -E UTF8 --locale=C.UTF-8 >/dev/null 2>&1 || as_pg "$bin/initdb" -D "$data" -U "$superuser" \
    --auth-local=peer --auth-host=reject -E UTF8 >/dev/null
  write_auth
elif as_pg grep -Eq '^[[:space:]]*(local|host)[^#]*[[:space:]]trust([[:space:]]|$)' "$data/pg_hba.conf"; then
  echo "postgres.sh: migrating the cluster in $dir from trust to password authentication (data kept)" >&2
  write_auth
  [ "$running" = 1 ] && as_pg "$bin/pg_ctl" -D "$data" reload >/dev/null
fi

if [ "$running" = 0 ]; then
  opts="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c max_connections=200"
  [ "$test_mode" = 1 ] && opts="$opts -c fsync=off"
  as_pg "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 -o "$opts" start >/dev/null
fi

psql_pg() { as_pg "$bin/psql" -h "$dir" -p "$port" -U "$superuser" -d postgres -v ON_ERROR_STOP=1 -qtAX "$@"; }
if [ "$test_mode" = 0 ] && [ "$(psql_pg -c "SHOW fsync")" = off ]; then
  echo "postgres.sh: this server runs with fsync=off (started for the tests); for a durable server restart" \
    "it: scripts/postgres.sh stop && scripts/postgres.sh" >&2
fi
# the password goes through stdin, never a command line
if [ "$(psql_pg -c "SELECT 1 FROM pg_roles WHERE rolname='$role'")" != 1 ]; then
  printf "CREATE ROLE %s LOGIN CREATEDB PASSWORD '%s';\n" "$role" "$pass" | psql_pg
else
  printf "ALTER ROLE %s LOGIN CREATEDB PASSWORD '%s';\n" "$role" "$pass" | psql_pg
fi
for db in moekit moekit_optuna moekit_mlflow; do
  if [ "$(psql_pg -c "SELECT 1 FROM pg_database WHERE datname='$db'")" != 1 ]; then
    psql_pg -c "CREATE DATABASE $db OWNER $role"
  fi
done
echo "$url"
