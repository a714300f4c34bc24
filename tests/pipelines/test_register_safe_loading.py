"""``moekit register --ckpt`` reads the checkpoint with ``torch.load(weights_only=True)`` and moekit's stamp
check: a crafted file whose pickle calls ``os.system`` is refused and runs nothing (issue 14)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipelines.checkpointing import CheckpointError
from pipelines.commands import register_checkpoint


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_register_refuses_a_checkpoint_that_runs_code(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    # a Lightning-looking checkpoint stamped for the toy app, with an os.system call in its pickle
    torch.save(
        {"state_dict": {}, "moekit": {"app": "toy", "schema": 1}, "hyper_parameters": {"x": _Evil(marker)}},
        ckpt,
    )
    with pytest.raises(CheckpointError, match="system, outside the allow-list"):
        register_checkpoint(app="toy", configs=[str(toy_config)], ckpt=str(ckpt), name="toy-model")
    assert not marker.exists()


def test_register_refuses_another_apps_checkpoint(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    ckpt = tmp_path / "lm.ckpt"
    torch.save({"state_dict": {}, "moekit": {"app": "lm", "schema": 1}}, ckpt)
    with pytest.raises(CheckpointError, match="app 'lm', not of app 'toy'"):
        register_checkpoint(app="toy", configs=[str(toy_config)], ckpt=str(ckpt), name="toy-model")
