"""Task module: losses vs closed forms, GAUC vs a hand computation, YAML configs, end-to-end census."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from sklearn.metrics import roc_auc_score

from apps.recsys.data import CENSUS_FILE, CENSUS_FOLDER, MultiTaskDataModule
from apps.recsys.task import MultiTaskRecTask, gauc

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "apps" / "recsys" / "configs").glob("*.yaml"))
needs_census = pytest.mark.needs_data(f"{CENSUS_FOLDER}/{CENSUS_FILE}")


def _task(**kw) -> MultiTaskRecTask:
    args = dict(
        backbone="mmoe", embed_dim=4, expert_hidden=[8], tower_hidden=[4], num_experts=2,
        cardinalities=[5, 7], num_numeric=2, task_names=["a", "b"],
    )  # fmt: skip
    args.update(kw)
    return MultiTaskRecTask(**args)


def test_uncertainty_weighting_closed_form():
    t = _task(weighting="uncertainty")
    with torch.no_grad():
        t.log_vars.copy_(torch.tensor([0.5, -1.0]))
    losses = torch.tensor([0.3, 0.7])
    want = math.exp(-0.5) * 0.3 + 0.25 + math.exp(1.0) * 0.7 - 0.5
    assert abs(float(t.combine(losses).detach()) - want) < 1e-6
    opt = t.configure_optimizers()
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(t.log_vars)] == 0.0
    fixed = _task(task_weights=[2.0, 0.5])
    assert abs(float(fixed.combine(losses)) - (0.6 + 0.35)) < 1e-6
    with pytest.raises(ValueError, match="weighting"):
        _task(weighting="gradnorm")


def test_gauc_matches_hand_computation_and_skips_single_class_groups():
    rng = np.random.default_rng(0)
    groups = np.repeat([0, 1, 2, 3], [10, 6, 5, 8])
    y = rng.integers(0, 2, len(groups))
    y[[0, 1, 10, 11, 21, 22]] = [0, 1, 0, 1, 0, 1]  # groups 0, 1, 3 have both classes
    y[groups == 2] = 1  # single-class group: skipped
    p = rng.random(len(groups))
    want_num, want_den = 0.0, 0
    for g in (0, 1, 3):
        m = groups == g
        want_num += m.sum() * roc_auc_score(y[m], p[m])
        want_den += m.sum()
    got, kept, share = gauc(torch.tensor(p), torch.tensor(y), torch.tensor(groups))
    assert kept == 3 and abs(share - want_den / len(y)) < 1e-12
    assert abs(got - want_num / want_den) < 1e-12


def test_checkpoint_rebuilds_model_and_preprocessor(tmp_path):
    rng = np.random.default_rng(0)
    n = 256
    df = pd.DataFrame({
        "u": rng.integers(0, 9, n).astype(str), "x": rng.normal(size=n),
        "y1": rng.integers(0, 2, n), "y2": rng.integers(0, 2, n),
    })  # fmt: skip
    df.to_csv(tmp_path / "d.csv", index=False)
    dm = MultiTaskDataModule(
        train_path=str(tmp_path / "d.csv"), val_path=str(tmp_path / "d.csv"),
        test_path=str(tmp_path / "d.csv"),
        categorical=["u"], numeric=["x"], labels=["y1", "y2"], group="u", batch_size=64,
    )  # fmt: skip
    task = MultiTaskRecTask(
        backbone="home", embed_dim=4, expert_hidden=[8], tower_hidden=[4], feature_gate_rank=2
    )
    trainer = L.Trainer(
        max_epochs=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, dm)
    m = trainer.callback_metrics
    for name in (
        "val/auc_y1",
        "val/auc_mean",
        "val/gauc_y2",
        "gate/y1/e0",
        "gate/y1/shared",
        "zero_frac/meta/e0",
    ):
        assert name in m, name
    res = trainer.test(task, dm, verbose=False)[0]
    assert {"test/auc_y1", "test/logloss_y2", "test/auc_mean"} <= set(res)
    ck = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ck)
    back = MultiTaskRecTask.load_from_checkpoint(ck)
    back.eval(), task.eval()
    batch = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(
        back(batch["cat"], batch["num"]).logits, task(batch["cat"], batch["num"]).logits
    )
    assert list(torch.load(ck, weights_only=False)["preprocessor"]["schema"]["labels"]) == ["y1", "y2"]
    preds = trainer.predict(task, dm)
    assert set(preds[0]) == {"y1", "y2"} and ((preds[0]["y1"] >= 0) & (preds[0]["y1"] <= 1)).all()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses_and_instantiates(path):
    cli = LightningCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        run=False,
        args=["--config", str(path), "--trainer.logger=false"],
    )  # fmt: skip
    assert isinstance(cli.model, MultiTaskRecTask)
    assert cli.model.net is None  # built in setup() from the fitted preprocessor


def test_all_shipped_configs_present():
    assert {p.name for p in CONFIGS} >= {
        "tiny.yaml",
        "census_home.yaml",
        "census_mmoe.yaml",
        "census_ple.yaml",
        "census_shared_bottom.yaml",
    }


# Measured 2026-11-29 on a 2-core CPU machine with exactly this test (seed 0): test AUC income 0.94824,
# never_married 0.99475. Seeds 1-4: income 0.94495 / 0.94737 / 0.94679 / 0.94648, never_married 0.9947-0.9948
# (spread over 5 seeds 0.0033 and 0.0001). Thresholds = the seed-0 values minus a margin of 0.01 (income) and
# 0.003 (never_married): 3x and 30x the seed spread, for thread-count and platform noise.
# What misses them, measured in the same run: the untrained model (0.66 / 0.68, asserted below), the tower
# inputs zeroed (0.5 / 0.5), the experts frozen at initialisation (0.9361 / 0.9937: income below). Census is
# too easy for the gates to matter: with every gate forced uniform the run still reaches 0.94825 / 0.99473, so
# the checks that this is HoME are the masked gate weights and the Swish experts' zero-activation rate (ReLU
# experts in the same run: 0.54), not the AUCs.
CENSUS_HOME_MIN_AUC = {"income": 0.94824 - 0.01, "never_married": 0.99475 - 0.003}


@needs_census
@pytest.mark.slow
def test_end_to_end_census_home_reaches_measured_auc(tmp_path):
    """Short real run of HoME (meta + task level, one category per task, BN + Swish experts, hierarchy mask,
    self-gate; 3 epochs on the full train split of the shipped file) reaches the measured test AUCs."""
    from apps.recsys.data import CensusDataModule
    from moe_core.multigate import HoME

    L.seed_everything(0)
    dm = CensusDataModule(batch_size=2048)
    task = MultiTaskRecTask(
        backbone="home", embed_dim=8, expert_hidden=[64], tower_hidden=[16], lr=3e-3, categories=[[0], [1]],
        home_levels=2, meta_num_shared=2, meta_num_per_category=2, num_shared=2, num_per_category=1,
        num_per_task=1, expert_norm="bn", activation="silu", hierarchy_mask=True, self_gate=True,
    )  # fmt: skip
    trainer = L.Trainer(
        max_epochs=3, logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip
    untrained = trainer.test(task, dm, verbose=False)[0]  # also builds the network from the data
    assert isinstance(task.net.backbone, HoME)
    for t, floor in CENSUS_HOME_MIN_AUC.items():  # the thresholds are not reachable without training
        assert untrained[f"test/auc_{t}"] < floor - 0.05, untrained
    trainer.fit(task, dm)
    m = trainer.callback_metrics  # last validation epoch's gate statistics
    # task-level candidates: shared e0-e1, category e2 (income's) e3 (never_married's), task e4 e5
    assert m["gate/income/e3"] == 0 and m["gate/income/e5"] == 0, "hierarchy mask not in force"
    assert m["gate/never_married/e2"] == 0 and m["gate/never_married/e4"] == 0, "hierarchy mask not in force"
    zero_frac = {k: float(v) for k, v in m.items() if k.startswith("zero_frac/")}
    assert zero_frac and max(zero_frac.values()) < 0.01, zero_frac  # Swish experts: no ReLU-style dead units
    res = trainer.test(task, dm, verbose=False)[0]
    for t, floor in CENSUS_HOME_MIN_AUC.items():
        assert res[f"test/auc_{t}"] >= floor, res
