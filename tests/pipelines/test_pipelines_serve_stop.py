"""``moekit serve`` (issue 14) and ``moekit ui`` stop their whole process tree on SIGTERM and SIGINT: after
the signal no process they started is left and the port is closed. All waits are bounded."""

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


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _groups(pids: set[int]) -> set[int]:
    """The process groups of ``pids`` (those still there), never the test's own."""
    out = set()
    for pid in pids:
        try:
            out.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return out - {os.getpgrp()}


def _kill_groups(groups: set[int]) -> None:
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.slow
def test_ui_leaves_no_process_behind_on_sigterm(tmp_path: Path) -> None:
    """``mlflow ui`` runs uvicorn and its workers: SIGTERM to ``moekit ui`` must stop all of them."""
    port = free_port()
    moekit = Path(sys.executable).parent / "moekit"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = open(tmp_path / "ui.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(moekit), "ui", "--port", str(port), "--tracking-uri", uri],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started: set[int] = set()
    groups = {proc.pid}  # its own session
    try:
        deadline = time.monotonic() + 180
        while not _port_open(port):
            assert proc.poll() is None, f"moekit ui exited: {(tmp_path / 'ui.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "moekit ui did not open its port within 180 s"
            time.sleep(0.5)
        started = _descendants(proc.pid)
        groups |= _groups(started)
        assert started, "moekit ui started no server process"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while (any(_alive(p) for p in started) or _port_open(port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = sorted(p for p in started if _alive(p))
        assert not left, f"processes left after SIGTERM: {left} ({(tmp_path / 'ui.log').read_text()[-2000:]})"
        assert not _port_open(port), f"port {port} still answers after SIGTERM"
    finally:
        _kill_groups(groups)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()
