"""``scripts/gpu_check.sh --dry-run``: the prepared GPU check runs its steps at toy size on CPU, so the script
cannot rot between the rare sessions that have a GPU (issue 17). Its dispatch rows compare every backend with
the float64 loop reference (forward and every gradient); the LM row must learn."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_every_check(tmp_path: Path) -> None:
    env = dict(os.environ, LM_SECONDS_DRY="3")
    proc = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    by_check: dict[str, list[dict]] = {}
    for r in rows:
        by_check.setdefault(r["check"], []).append(r)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    dispatch = by_check["dispatch"]
    assert {r["backend"] for r in dispatch} >= {"grouped_mm", "padded", "loop", "auto"}
    assert {r["dtype"] for r in dispatch} == {"float32", "bfloat16"}
    assert max(r["max_rel_err"] for r in dispatch if r["dtype"] == "float32") < 1e-4
    (lm,) = by_check["lm_throughput"]
    assert lm["learned"] and lm["tokens_per_s"] > 0
