"""Task module: losses vs closed forms, GAUC vs a hand computation, the injected backbone (and the errors
naming it for the old string form), routing statistics of dense gates, YAML configs, end-to-end census."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from sklearn.metrics import roc_auc_score

from apps.recsys.data import CENSUS_FILE, CENSUS_FOLDER, MultiTaskDataModule
from apps.recsys.model import HoMEBackbone
from apps.recsys.task import MultiTaskRecTask, gate_routing, gauc
from moe_core.multigate import HoME, MMoE
from moe_core.stats import routing_stats

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "apps" / "recsys" / "configs").glob("*.yaml"))
needs_census = pytest.mark.needs_data(f"{CENSUS_FOLDER}/{CENSUS_FILE}")


def _task(**kw) -> MultiTaskRecTask:
    args = dict(
        backbone=partial(MMoE, num_experts=2, expert_hidden=[8]), embed_dim=4, tower_hidden=[4],
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


def test_backbone_is_injected_and_old_string_form_names_the_new_one():
    t = _task()
    assert isinstance(t.net.backbone, MMoE) and len(t.net.backbone.gates) == 2  # num_tasks from task_names
    assert t.net.backbone.experts.num_experts == 2
    home = _task(backbone=partial(HoMEBackbone, expert_hidden=[8], num_per_category=1))
    assert isinstance(home.net.backbone, HoME) and home.net.backbone.categories == [[0], [1]]
    with pytest.raises(ValueError, match=r"class_path: apps\.recsys\.model\.HoMEBackbone"):
        _task(backbone="home")
    with pytest.raises(ValueError, match="group 1 tasks, the data has 2"):
        _task(backbone=partial(HoMEBackbone, expert_hidden=[8], categories=[[0]]))


def test_dense_gate_routing_statistics():
    # a uniform gate over all 4 experts, and a hierarchy-masked gate uniform over its 2 candidates
    w = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.5, 0.0]])
    routing = gate_routing(w)
    torch.testing.assert_close(routing.dense_weights(), w)
    per_row = [routing_stats(gate_routing(w[i : i + 1])) for i in range(2)]
    torch.testing.assert_close(per_row[0]["entropy"], torch.tensor(math.log(4)))
    torch.testing.assert_close(per_row[1]["entropy"], torch.tensor(math.log(2)))
    assert float(per_row[1]["active_experts"]) == 2.0  # masked candidates are unused slots
    mean_entropy = torch.tensor((math.log(4) + math.log(2)) / 2)
    torch.testing.assert_close(routing_stats(routing)["entropy"], mean_entropy)


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
        backbone=partial(HoMEBackbone, expert_hidden=[8], num_per_category=1, feature_gate_rank=2),
        embed_dim=4, tower_hidden=[4],
    )  # fmt: skip
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
        "routing/val/y1/weight_e0",
        "routing/val/y1/weight_shared",
        "routing/val/y1/entropy",
        "routing/val/meta/zero_frac_e0",
    ):
        assert name in m, name
    # the task gate's mass: its per-expert means sum to 1 and split into the HoME groups
    # candidates: shared e0 e1, category e2 (y1's) e3 (y2's), task e4 (y1's) e5 (y2's)
    w = [float(m[f"routing/val/y1/weight_e{i}"]) for i in range(6)]
    assert abs(sum(w) - 1) < 1e-5 and w[3] == 0 and w[5] == 0  # y2's branch is masked for y1
    groups = sum(float(m[f"routing/val/y1/weight_{g}"]) for g in ("shared", "category", "task"))
    assert abs(groups - 1) < 1e-5
    res = trainer.test(task, dm, verbose=False)[0]
    assert {"test/auc_y1", "test/logloss_y2", "test/auc_mean"} <= set(res)
    ck = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ck)
    back = MultiTaskRecTask.load_from_checkpoint(ck, weights_only=False)  # hparams hold the partial
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

    L.seed_everything(0)
    dm = CensusDataModule(batch_size=2048)
    task = MultiTaskRecTask(
        backbone=partial(
            HoMEBackbone, expert_hidden=[64], categories=[[0], [1]], levels=2, meta_num_shared=2,
            meta_num_per_category=2, num_shared=2, num_per_category=1, num_per_task=1, expert_norm="bn",
            activation="silu", hierarchy_mask=True, self_gate=True,
        ),
        embed_dim=8, tower_hidden=[16], lr=3e-3,
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
    w = "routing/val/{}/weight_e{}"
    assert m[w.format("income", 3)] == 0 and m[w.format("income", 5)] == 0, "hierarchy mask not in force"
    assert m[w.format("never_married", 2)] == 0 and m[w.format("never_married", 4)] == 0, "mask not in force"
    zero_frac = {k: float(v) for k, v in m.items() if "/zero_frac_e" in k}
    assert zero_frac and max(zero_frac.values()) < 0.01, zero_frac  # Swish experts: no ReLU-style dead units
    res = trainer.test(task, dm, verbose=False)[0]
    for t, floor in CENSUS_HOME_MIN_AUC.items():
        assert res[f"test/auc_{t}"] >= floor, res
