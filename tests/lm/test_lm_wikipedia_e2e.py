"""``moekit lm fit`` on a wikipedia_en subset with the shipped DeepSeekMoE config (shrunk to seconds): the
validation bits per byte beat the unigram oracle (the best context-free model, from the train counts), and
``lm test`` scores the separate test files (issue 17)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from apps.lm.data import WIKIPEDIA_SPLIT, load_tokens
from apps.lm.generate import load_checkpoint
from pipelines.lightning_cli import MoekitCLI

CONFIG = Path(__file__).resolve().parents[2] / "apps" / "lm" / "configs" / "wikipedia_moe.yaml"


@pytest.mark.slow
@pytest.mark.needs_data("wikipedia_en/AA/wiki_01", "wikipedia_en/AA/wiki_02", "wikipedia_en/AA/wiki_96",
                        "wikipedia_en/AA/wiki_97", "wikipedia_en/AA/wiki_98", "wikipedia_en/AA/wiki_99")
def test_wikipedia_moe_fit_beats_unigram_bits_per_byte(require_data, tmp_path, monkeypatch):
    root = require_data("wikipedia_en/AA/wiki_01")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    steps = 200
    args = [
        "fit", "--config", str(CONFIG), "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--data.init_args.data_dir={root}",
        "--data.init_args.max_train_files=2", "--data.init_args.bpe_vocab_size=1024",
        "--data.init_args.context_len=64", "--data.init_args.max_val_windows=64",
        "--data.init_args.val_batch_size=64", "--model.init_args.config.context_len=64",
        "--model.init_args.config.dim=64", "--model.init_args.config.n_layers=2",
        "--model.init_args.config.n_heads=2", "--model.init_args.config.ffn_hidden=128",
        "--model.init_args.config.expert_hidden=32", "--model.init_args.config.num_experts=8",
        "--model.init_args.warmup_steps=10", "--model.init_args.lr=0.003", f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}", "--trainer.num_sanity_val_steps=0",
        f"--run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    cli = MoekitCLI(app="lm", args=args)
    dm, m = cli.datamodule, cli.trainer.callback_metrics
    assert cli.trainer.global_step == steps
    ffn = cli.model.model.blocks[1].ffn
    assert ffn.shared_experts is not None and ffn.experts.num_experts == 8  # fine-grained + shared
    assert set(dm.meta["tokens"]) == {"train", "val", "test"}
    # oracle: bits per byte of the train unigram distribution on val (no context at all)
    counts = np.bincount(np.asarray(load_tokens(dm.folder, "train")), minlength=dm.vocab_size) + 1e-9
    p = counts / counts.sum()
    val = np.asarray(load_tokens(dm.folder, "val"))
    unigram_bpb = float(-np.log2(p[val]).sum() / dm.meta["bytes"]["val"])
    uniform_bpb = math.log2(dm.vocab_size) * len(val) / dm.meta["bytes"]["val"]
    bpb = float(m["val/bpb"])
    print(f"val bpb {bpb:.3f}, unigram {unigram_bpb:.3f}, uniform {uniform_bpb:.3f}")
    assert 1.5 < bpb < unigram_bpb - 0.05 < uniform_bpb  # below the oracle; a leak would be far lower
    assert float(m["val/loss"]) == pytest.approx(
        bpb * math.log(2) * dm.meta["bytes"]["val"] / len(val), rel=0.15
    )  # windows cover a prefix of val: bytes per token close to the split's
    (res,) = cli.trainer.test(cli.model, datamodule=dm, verbose=False)
    assert WIKIPEDIA_SPLIT["test"] == (96, 97) and abs(res["test/bpb"] - bpb) < 0.4
    # the README's `moekit lm test --config ... --ckpt_path FILE`: LightningCLI merges the checkpoint's model
    # hyper-parameters (an LMConfig) into the config, and the test reopens the fit's MLflow run, whose
    # `config/vocab_size` was logged as None before the data resolved it
    ckpt = tmp_path / "run" / "last.ckpt"
    tested = MoekitCLI(app="lm", args=["test", *args[1:], "--ckpt_path", str(ckpt)])
    assert float(tested.trainer.callback_metrics["test/bpb"]) == pytest.approx(res["test/bpb"], rel=1e-5)
    # what `moekit lm generate/merge/quantize --ckpt` read: the CLI's checkpoint (LightningCLI stores an
    # `_instantiator` in it), and the same weights in the two-parameter expert layout of earlier versions
    window = torch.as_tensor(np.asarray(val[:64], dtype=np.int64))[None]  # (1, 64)
    want = cli.model.model.eval()(window).logits
    model, tok = load_checkpoint(ckpt)
    torch.testing.assert_close(model(window).logits, want, rtol=0, atol=0)
    assert tok.to_json() == dm.tokenizer.to_json()
    legacy = torch.load(ckpt, map_location="cpu", weights_only=True)
    sd = legacy["state_dict"]
    for k in [k for k in sd if k.endswith("experts.gate_up_proj")]:
        gate, up = sd.pop(k).chunk(2, dim=-1)
        sd[k.replace("gate_up_proj", "gate_proj")], sd[k.replace("gate_up_proj", "up_proj")] = gate, up
    torch.save(legacy, tmp_path / "legacy.ckpt")
    model, _ = load_checkpoint(tmp_path / "legacy.ckpt")
    torch.testing.assert_close(model(window).logits, want, rtol=0, atol=0)
