"""``moekit lm merge`` / ``lm quantize`` on a ``moekit lm fit`` checkpoint (issue 17): they calibrate on the
run's own data and write a checkpoint that ``lm generate`` and ``lm test`` load, holding the function of the
merged / quantised model; a model without an MoE layer is refused."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from apps.lm.commands import merge, quantize
from apps.lm.data import LMDataModule
from apps.lm.generate import generate, load_checkpoint
from apps.lm.model import LMConfig
from apps.lm.task import LMTask
from moe_core.surgery.mcsmoe import collect_routing_stats, merge_model
from moe_core.surgery.quant import quantize_model_experts

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom.\n") * 60


def _fit(tmp_path, ffn: str = "moe"):
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    dm = LMDataModule(text_path=str(tmp_path / "t.txt"), tokenizer="char", context_len=16, batch_size=4,
                      batches_per_epoch=4, max_val_windows=8, val_batch_size=4,
                      cache_path=str(tmp_path / "cache"))
    cfg = LMConfig(context_len=16, dim=32, n_layers=2, n_heads=2, ffn_hidden=32, ffn=ffn, num_experts=4,
                   top_k=2, expert_hidden=16)
    task = LMTask(config=cfg, warmup_steps=1)
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    path = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(path)
    return path, task, dm


def test_quantize_and_merge_a_fit_checkpoint(tmp_path, capsys):
    ckpt, task, dm = _fit(tmp_path)
    ids = torch.stack([dm.val_dataloader().dataset[i][0] for i in range(8)])  # (8, 16) the run's val windows
    out = tmp_path / "q4.ckpt"
    quantize([f"--model={ckpt}", f"--out={out}", "--bits=4", "--group-size=16"])
    assert str(out) in capsys.readouterr().out
    model, tok = load_checkpoint(out)  # what lm generate reads
    oracle = copy.deepcopy(task.model).eval()
    quantize_model_experts(oracle, bits=4, group_size=16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, oracle(ids).logits, rtol=1e-5, atol=1e-5)
        original = task.model.eval()(ids).logits
        assert not torch.allclose(model(ids).logits, original, atol=1e-4)  # 4 bits changed the function
    assert generate(model, tok, "It was", max_new_tokens=5, greedy=True).startswith("It was")
    # lm test loads it through Lightning and scores the test windows
    (res,) = L.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False).test(
        LMTask(config=task.config), datamodule=dm, ckpt_path=str(out), verbose=False
    )
    assert res["test/loss"] > 0 and res["test/bpb"] > 0
    transformers = pytest.importorskip("transformers")
    from apps.lm.commands import export

    export([f"--ckpt={out}", f"--out-dir={tmp_path / 'hf'}"])  # lm export loads it too
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, oracle(ids).logits, rtol=1e-4, atol=1e-5)

    merged = tmp_path / "merged.ckpt"
    merge([f"--model={ckpt}", f"--out={merged}", "--num-groups=2", "--calib-windows=8"])
    model, _ = load_checkpoint(merged)
    oracle = copy.deepcopy(task.model).eval()
    merge_model(oracle, collect_routing_stats(oracle, ids.split(16)), num_groups=2)  # same calibration data
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, oracle(ids).logits, rtol=1e-5, atol=1e-5)
    bank = model.blocks[0].ffn.experts
    distinct = {tuple(bank.gate_proj[e].flatten()[:4].tolist()) for e in range(4)}
    assert len(distinct) == 2  # 4 router slots hold 2 merged experts


def test_quantizing_a_dense_model_is_an_error(tmp_path):
    ckpt, _, _ = _fit(tmp_path, ffn="dense")
    with pytest.raises(ValueError, match="no MoE layer, nothing to quantize"):
        quantize([f"--model={ckpt}", f"--out={tmp_path / 'q.ckpt'}"])
    assert not (tmp_path / "q.ckpt").exists()
