"""The lm commands that read a user-given file (``moekit lm generate --ckpt``, ``moekit lm merge/quantize
--model``) load it with ``torch.load(weights_only=True)`` and an allow-list: a crafted file whose pickle
calls ``os.system`` is refused with an error and runs nothing (issue 14)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from apps.lm import commands
from apps.lm.model import LMConfig, TransformerLM


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(tmp_path: Path, payload: object) -> Path:
    path = tmp_path / "crafted.pt"
    torch.save(payload, path)
    return path


def test_generate_refuses_a_checkpoint_that_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = _crafted(
        tmp_path, {"state_dict": {}, "hyper_parameters": {"config": _Evil(marker)}, "lm_tokenizer": "{}"}
    )
    with pytest.raises(ValueError, match=r"weights_only=True.*names \w+\.system"):
        commands.generate(["--ckpt", str(ckpt), "--prompt", "a", "--max-new-tokens", "2"])
    assert not marker.exists()


@pytest.mark.parametrize("command", ["merge", "quantize"])
def test_merge_and_quantize_refuse_a_model_that_runs_code(tmp_path: Path, command: str) -> None:
    marker = tmp_path / "pwned"
    model = _crafted(tmp_path, _Evil(marker))
    torch.save(torch.zeros(2, 4, dtype=torch.long), tmp_path / "calib.pt")
    argv = ["--model", str(model), "--out", str(tmp_path / "out.pt")]
    if command == "merge":
        argv += ["--calib", str(tmp_path / "calib.pt"), "--num-groups", "1"]
    with pytest.raises(ValueError, match="system, outside the allow-list"):
        getattr(commands, command)(argv)
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_saved_moekit_model_still_loads(tmp_path: Path) -> None:
    """The allow-list admits a whole moekit LM (torch.nn, moe_core and apps.lm modules): same outputs."""
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=17, context_len=8, dim=16, n_layers=2, n_heads=2, ffn="moe", num_experts=4,
                   top_k=2, expert_hidden=8, expert_backend="loop")  # fmt: skip
    model = TransformerLM(config=cfg).eval()
    torch.save(model, tmp_path / "moe.pt")
    got = commands.load_saved_model(tmp_path / "moe.pt").eval()
    ids = torch.randint(0, 17, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, model(ids).logits, rtol=0, atol=0)
