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

url="$("$repo/scripts/postgres.sh" | tail -n 1)"   # postgresql://moekit:moekit@127.0.0.1:PORT/moekit
base="${url%/*}"
"$repo/.venv/bin/python" - "$url" "$db" <<'PY'
import sys

import psycopg

url, db = sys.argv[1], sys.argv[2]
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
exec "$mlflow_bin" server \
  --backend-store-uri "$base/$db" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host 127.0.0.1 --port "$port" --workers 1 "$@"
