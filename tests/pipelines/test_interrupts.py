"""pipelines.interrupts: SIGTERM/SIGINT during fit save a resumable last.ckpt and exit with 128 + signum.

The fit runs in a subprocess (``interrupt_fit.py``) whose epoch is longer than the test, so the signal comes
before the first validation. Without ``InterruptCheckpoint`` (``--no-callback``) these tests fail: SIGTERM
exits 0 and SIGINT 1 (Lightning's handling), and no last.ckpt is written.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.checkpointing import load_checkpoint_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPT = HERE / "interrupt_fit.py"


def _start(out: Path, *args: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
    with open(log, "w") as err:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, str(SCRIPT), str(out), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float = 120.0) -> list[str]:
    """Lines of the child's stdout up to and including the first matching ``pattern``."""
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line.strip())
        if re.fullmatch(pattern, lines[-1]):
            return lines
        assert time.monotonic() < deadline, f"no line matching {pattern!r} within {timeout} s"
    raise AssertionError(f"the child ended before printing {pattern!r}; it printed {lines[-5:]}")


def _steps(lines: list[str]) -> list[int]:
    return [int(m[1]) for m in (re.fullmatch(r"step (\d+)", ln) for ln in lines) if m]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_fit_saves_resumable_last_ckpt_and_exits_128_plus_signum(
    tmp_path: Path, signum: signal.Signals
) -> None:
    out = tmp_path / "run"
    proc = _start(out, log=tmp_path / "fit.log")
    lines = _read_until(proc, r"step 20")
    proc.send_signal(signum)
    try:
        rest, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the child did not stop within 90 s of {signum.name}") from None
    lines += [ln.strip() for ln in rest.splitlines()]
    rc = proc.returncode
    log = (tmp_path / "fit.log").read_text()
    assert rc == 128 + signum, log[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["last.ckpt"]  # before the first validation's save
    ck = load_checkpoint_file(out / "last.ckpt", app="toy")
    steps = _steps(lines)
    assert ck["global_step"] == steps[-1] + 1  # the batch running at the signal completed, nothing after
    assert f"training interrupted by {signum.name}" in log

    saved = ck["global_step"]
    proc = _start(out, "--resume", "--max-steps", str(saved + 3), log=tmp_path / "resume.log")
    out_text, _ = proc.communicate(timeout=180)
    resumed = [ln.strip() for ln in out_text.splitlines()]
    assert proc.returncode == 0, (tmp_path / "resume.log").read_text()[-2000:]
    assert _steps(resumed) == [saved, saved + 1, saved + 2]
    assert load_checkpoint_file(out / "last.ckpt", app="toy")["global_step"] == saved + 3


def test_signal_before_training_exits_128_plus_signum_without_training(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out, "--slow-setup", "3", log=tmp_path / "fit.log")
    _read_until(proc, "setup")
    proc.send_signal(signal.SIGTERM)
    rest = [ln.strip() for ln in proc.stdout]
    rc = proc.wait(timeout=60)
    assert rc == 128 + signal.SIGTERM, (tmp_path / "fit.log").read_text()[-2000:]
    assert _steps(rest) == []
    assert not (out / "last.ckpt").exists()
