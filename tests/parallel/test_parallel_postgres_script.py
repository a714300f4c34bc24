"""scripts/postgres.sh: password authentication with a random per-cluster password, fsync=off only for tests,
and in-place migration of a cluster made by the earlier script (trust authentication, password "moekit").

Each test runs its own cluster in a fresh folder on a free port. Against the earlier script these tests fail:
its URL carries the fixed password, a client without a password gets in (trust), and the documented start
runs with fsync=off.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "postgres.sh"


def _bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_ctl")
    return Path(which).parent if which else None


def _as_pg(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, folder: Path, port: int) -> None:
        self.dir, self.port = folder, port
        self.env = dict(
            os.environ, MOEKIT_PG_DIR=str(folder), MOEKIT_PG_PORT=str(port), MOEKIT_PG_NO_INSTALL="1"
        )

    def run(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(SCRIPT), *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc

    def url(self) -> str:
        return self.run("url").stdout.strip()


def _connect(url: str):
    import psycopg

    return psycopg.connect(url, connect_timeout=5)


def _refused(url: str) -> bool:
    import psycopg

    try:
        _connect(url).close()
    except psycopg.OperationalError:
        return True
    return False


@pytest.fixture
def cluster(require_postgres) -> Iterator[Cluster]:
    """A folder and a free port for one cluster (stopped and removed afterwards)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        require_postgres("psycopg is not installed (pip install 'psycopg[binary]')")
    if _bin() is None:
        require_postgres("PostgreSQL server binaries not installed")
    # directly under /tmp: the postgres system user must reach it when the tests run as root
    folder = Path(tempfile.mkdtemp(prefix="moekit-pgtest-", dir="/tmp"))
    c = Cluster(folder, _free_port())
    yield c
    subprocess.run([str(SCRIPT), "stop"], env=c.env, capture_output=True, timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def test_random_password_on_loopback_and_fsync_only_off_for_tests(cluster: Cluster) -> None:
    url = cluster.run("start").stdout.strip().splitlines()[-1]
    m = re.fullmatch(rf"postgresql://moekit:([0-9a-f]{{48}})@127\.0\.0\.1:{cluster.port}/moekit", url)
    assert m, url
    assert cluster.url() == url
    pwfile = cluster.dir / "password"
    assert pwfile.read_text() == m[1] and stat.S_IMODE(pwfile.stat().st_mode) == 0o600
    hba = _read_as_pg(cluster.dir / "data" / "pg_hba.conf").splitlines()
    rules = [ln.split() for ln in hba if ln.strip() and not ln.lstrip().startswith("#")]
    assert not any("trust" in r for r in rules) and any("scram-sha-256" in r for r in rules)

    host = f"127.0.0.1:{cluster.port}"
    with _connect(url) as conn:
        assert conn.execute("SHOW fsync").fetchone() == ("on",)
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
    assert _refused(f"postgresql://moekit@{host}/moekit")  # no password
    assert _refused(f"postgresql://moekit:moekit@{host}/moekit")  # the old fixed password
    assert _refused(f"postgresql://postgres@{host}/postgres")  # the superuser over TCP

    cluster.run("stop")
    assert cluster.run("start", "--test").stdout.strip().splitlines()[-1] == url  # same password
    with _connect(url) as conn:
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
    assert "fsync=off" in cluster.run("start").stderr  # the documented start says so


def _read_as_pg(path: Path) -> str:
    return subprocess.run(_as_pg(["cat", str(path)]), capture_output=True, text=True, check=True).stdout


def test_cluster_made_with_trust_is_migrated_in_place_keeping_its_data(cluster: Cluster) -> None:
    """A cluster as the earlier script made it (trust, role password "moekit"), running, with data."""
    pg = _bin()
    data = cluster.dir / "data"
    if os.geteuid() == 0:
        shutil.chown(cluster.dir, "postgres", "postgres")
    subprocess.run(
        _as_pg(
            [str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust", "--auth-host=trust"]
        ),
        check=True,
        capture_output=True,
    )
    opts = f"-c listen_addresses=127.0.0.1 -c port={cluster.port} -c unix_socket_directories={cluster.dir}"
    subprocess.run(
        _as_pg(
            [
                str(pg / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(cluster.dir / "server.log"),
                "-w",
                "-o",
                opts,
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    old = f"postgresql://moekit:moekit@127.0.0.1:{cluster.port}/moekit"
    with _connect(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres") as conn:
        conn.autocommit = True
        conn.execute("CREATE ROLE moekit LOGIN CREATEDB PASSWORD 'moekit'")
        conn.execute("CREATE DATABASE moekit OWNER moekit")
    with _connect(old) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    assert not _refused(f"postgresql://moekit@127.0.0.1:{cluster.port}/moekit")  # trust: no password needed

    proc = cluster.run("start")  # the server is running: rewritten pg_hba.conf, reload, new password
    assert "migrating" in proc.stderr
    url = proc.stdout.strip().splitlines()[-1]
    assert url == cluster.url() and url != old
    with _connect(url) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
    assert _refused(old)
    assert _refused(f"postgresql://moekit@127.0.0.1:{cluster.port}/moekit")
    assert _refused(f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres")
