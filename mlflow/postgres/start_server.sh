#!/usr/bin/env bash
# MLflow tracking server with a PostgreSQL backend store and a local artifact root (issue 8).
#
# Starts PostgreSQL through scripts/postgres.sh (idempotent), then runs `mlflow server` in the foreground.
# Environment (all optional):
#   MOEKIT_MLFLOW_DB         database name          (default: moekit_mlflow; created if missing)
#   MOEKIT_MLFLOW_PORT       port on 127.0.0.1      (default: 5000)
#   MOEKIT_MLFLOW_ARTIFACTS  artifact root folder   (default: <repo>/mlflow/artifacts, git-ignored)
#   MOEKIT_PG_PORT, MOEKIT_PG_DIR                   see scripts/postgres.sh
# Extra arguments are passed to `mlflow server`.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
db="${MOEKIT_MLFLOW_DB:-moekit_mlflow}"
port="${MOEKIT_MLFLOW_PORT:-5000}"
artifacts="${MOEKIT_MLFLOW_ARTIFACTS:-$repo/mlflow/artifacts}"
mlflow_bin="${MLFLOW_BIN:-$repo/.venv/bin/mlflow}"

# postgresql://moekit:<password>@127.0.0.1:PORT/moekit; the password never goes on a command line (ps)
url="$("$repo/scripts/postgres.sh" | tail -n 1)"
base="${url%/*}"
MOEKIT_PG_URL="$url" "$repo/.venv/bin/python" - "$db" <<'PY'
import os
import sys

import psycopg

url, db = os.environ["MOEKIT_PG_URL"], sys.argv[1]
conn = psycopg.connect(url)
conn.autocommit = True
with conn.cursor() as cur:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
    if cur.fetchone() is None:
        cur.execute(f'CREATE DATABASE "{db}"')
conn.close()
PY
mkdir -p "$artifacts"
export PATH="$(dirname "$mlflow_bin"):$PATH"
export MLFLOW_BACKEND_STORE_URI="$base/$db"   # mlflow server's --backend-store-uri, kept out of `ps`
exec "$mlflow_bin" server \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host 127.0.0.1 --port "$port" --workers 1 "$@"
