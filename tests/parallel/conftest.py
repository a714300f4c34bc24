"""Fixtures for the shared-store tests: a PostgreSQL server on 127.0.0.1 (started by scripts/postgres.sh)."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "postgres.sh"


def _connect(url: str):
    import psycopg

    return psycopg.connect(url, connect_timeout=3)


@pytest.fixture(scope="session")
def pg_url(require_postgres) -> str:
    """Connection URL of a running PostgreSQL (env MOEKIT_PG_URL, else the cluster of scripts/postgres.sh).

    Runs ``scripts/postgres.sh start --test`` without installing packages (idempotent: creates or migrates the
    cluster and starts it, with fsync=off only if this call starts it) and takes the URL, with the cluster's
    password, from its last line; skips (with the reason) only when PostgreSQL or psycopg is not available.
    """
    try:
        import psycopg  # noqa: F401
    except ImportError:
        require_postgres("psycopg is not installed (pip install 'psycopg[binary]')")
    url = os.environ.get("MOEKIT_PG_URL")
    if url is None:
        env = dict(os.environ, MOEKIT_PG_NO_INSTALL="1")
        proc = subprocess.run(
            [str(SCRIPT), "start", "--test"], capture_output=True, text=True, env=env, timeout=120
        )
        if proc.returncode != 0:
            require_postgres(f"scripts/postgres.sh start --test failed: {proc.stderr.strip()}")
        url = proc.stdout.strip().splitlines()[-1]
    try:
        _connect(url).close()
    except Exception as e:  # noqa: BLE001 - any connection failure
        host = url.rsplit("@", 1)[-1]  # the message must not print the password
        require_postgres(f"PostgreSQL not reachable at {host} ({type(e).__name__})")
    return url


@pytest.fixture
def fresh_db(pg_url):
    """A new empty database (dropped afterwards); yields its URL."""
    name = f"moekit_test_{uuid.uuid4().hex[:10]}"
    conn = _connect(pg_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    base = pg_url.rsplit("/", 1)[0]
    yield f"{base}/{name}", name
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()
