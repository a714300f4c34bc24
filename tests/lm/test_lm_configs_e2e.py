"""Every shipped LM config parses and instantiates through LightningCLI (the ``moekit lm fit`` path), the tiny
config trains a few steps, and (slow) a short char-level run on tiny shakespeare beats the unigram-entropy
oracle."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from apps.lm.data import LMDataModule, load_tokens
from apps.lm.generate import load_checkpoint
from apps.lm.model import LMConfig
from apps.lm.task import LMTask

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "apps" / "lm" / "configs").glob("*.yaml"))
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 40


def _cli(path: Path, *extra: str) -> LightningCLI:
    return LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(path), "--trainer.logger=false", *extra],
    )


def test_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {"tiny.yaml", "shakespeare_dense.yaml", "shakespeare_moe.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_instantiates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # LightningCLI may write config.yaml / checkpoints into the working directory
    cli = _cli(path)
    raw = yaml.safe_load(path.read_text())
    assert isinstance(cli.model, LMTask) and isinstance(cli.datamodule, LMDataModule)
    # every value of the YAML reaches the objects (nothing silently dropped by the parser)
    for k, v in raw["model"]["init_args"]["config"].items():
        assert getattr(cli.model.config, k) == v, k
    for k, v in raw["model"]["init_args"].items():
        if k != "config":
            got = getattr(cli.model, k)
            assert (list(got) if isinstance(got, tuple) else got) == v, k
    data_attr = {"tokenizer": "tokenizer_kind"}
    for k, v in raw["data"]["init_args"].items():
        assert getattr(cli.datamodule, data_attr.get(k, k)) == v, k
    assert cli.trainer.max_steps == raw["trainer"]["max_steps"]
    assert cli.model.config.context_len >= raw["data"]["init_args"]["context_len"]


def test_tiny_config_trains_through_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    path = next(p for p in CONFIGS if p.name == "tiny.yaml")
    cli = _cli(
        path,
        f"--data.init_args.text_path={corpus}",
        f"--data.init_args.cache_path={tmp_path / 'cache'}",
        "--trainer.max_steps=4",
        "--trainer.limit_val_batches=2",
        "--trainer.val_check_interval=4",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 4
    assert cli.model.config.vocab_size == len(set(TEXT))  # linked from the data module
    m = cli.trainer.callback_metrics
    assert math.isfinite(float(m["train/loss"])) and math.isfinite(float(m["val/loss"]))
    assert float(m["val/ppl"]) == pytest.approx(math.exp(float(m["val/loss"])), rel=1e-4)
    # the run's checkpoint loads through Lightning's own reader: LightningCLI stores an instantiator that
    # re-parses the hyper-parameters, and it failed on the resolved LMConfig object ("argument after ** must
    # be a mapping, not LMConfig"); the project's reader takes it as well
    (ckpt,) = tmp_path.rglob("*.ckpt")
    loaded = LMTask.load_from_checkpoint(ckpt, map_location="cpu")
    model, _ = load_checkpoint(ckpt)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want = cli.model.model.eval()(ids).logits
        assert loaded.config == cli.model.config
        assert torch.equal(loaded.model.eval()(ids).logits, want)
        assert torch.equal(model(ids).logits, want)


@pytest.mark.slow
def test_shakespeare_char_beats_unigram_entropy(shakespeare_path, tmp_path):
    L.seed_everything(0)
    dm = LMDataModule(
        data_dir=str(shakespeare_path.parents[1]),
        tokenizer="char",
        context_len=64,
        batch_size=16,
        batches_per_epoch=1000,
        max_val_windows=64,
        val_batch_size=64,
    )
    dm.setup()
    # oracle: the cross-entropy of the best context-free model (train unigram frequencies), in nats
    counts = np.bincount(np.asarray(load_tokens(dm.folder, "train")), minlength=dm.vocab_size).astype(
        np.float64
    )
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    assert 2.5 < unigram < math.log(65)
    cfg = LMConfig(
        context_len=64, dim=64, n_layers=2, n_heads=4, ffn_hidden=128, ffn="moe", num_experts=4, top_k=2
    )
    task = LMTask(config=cfg, lr=1e-2, warmup_steps=5, min_lr=1e-3, weight_decay=0.0)
    trainer = L.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, num_sanity_val_steps=0,
                        val_check_interval=60, check_val_every_n_epoch=None)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(task, datamodule=dm)
    after = float(trainer.callback_metrics["val/loss"])
    assert before > math.log(65) - 0.5  # an untrained model is near uniform
    print(f"val loss {before:.3f} -> {after:.3f}; unigram entropy {unigram:.3f} nats")
    assert after < unigram, (before, after, unigram)


def test_model_help_documents_every_architecture_field(capsys):
    """Issue 17: the architecture's fields were hidden behind ``--model.config.help``, which jsonargparse
    refuses inside a subclass argument; ``--model.help apps.lm.task.LMTask`` now lists each with its doc."""
    import dataclasses

    from pipelines.cli import main

    with pytest.raises(SystemExit) as e:
        main(["lm", "fit", "--model.help", "apps.lm.task.LMTask"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(LMConfig):
        assert f"--model.config.{f.name}" in out, f.name
    assert "DeepSeekMoE always-on shared experts" in out
