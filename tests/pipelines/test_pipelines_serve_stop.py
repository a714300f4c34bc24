"""``moekit serve`` stops its whole process tree on SIGTERM and SIGINT (issue 14): after the signal no process
it started is left and its port is closed. All waits are bounded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.lightning_cli import MoekitCLI
from pipelines.registry import register_trained
from pipelines.serve import free_port, wait_until_up


def _children() -> dict[int, int]:
    """pid -> parent pid of every process visible in /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            out[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _descendants(pid: int) -> set[int]:
    parents = _children()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_leaves_no_process_behind(sig, tmp_path: Path, toy_config: Path, tracking_uri: str) -> None:
    cli = MoekitCLI(app="toy", args=["--config", str(toy_config), "--trainer.max_epochs=1"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    version = register_trained(
        app="toy", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="toy-stop"
    )
    port = free_port()
    moekit = Path(sys.executable).parent / "moekit"
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(moekit),
            "serve",
            f"models:/toy-stop/{version}",
            "--port",
            str(port),
            "--tracking-uri",
            tracking_uri,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    started: set[int] = set()
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}", timeout=180)
        started = _descendants(proc.pid)
        assert started, "moekit serve started no server process"
        proc.send_signal(sig)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = sorted(p for p in started if _alive(p))
        assert not left, (
            f"processes left after {sig.name}: {left} ({(tmp_path / 'serve.log').read_text()[-2000:]})"
        )
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect(("127.0.0.1", port))
    finally:
        for p in started | {proc.pid}:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
