"""Per-task metrics (issue 15): GAUC against a hand-computed value, a single-class task left out of the task
means with a warning naming it, positives per split, and positive re-weighting of sparse tasks."""

from __future__ import annotations

import logging
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from apps.recsys.task import MultiTaskRecTask, gauc, positive_weights
from moe_core.multigate import MMoE


def test_gauc_matches_a_hand_computed_value() -> None:
    # user 0: labels 1,0,0 preds .9,.2,.95 -> 1 of 2 pairs ordered: AUC 0.5, 3 rows
    # user 1: labels 0,1 preds .1,.8 -> AUC 1, 2 rows
    # user 2: labels 1,1 -> one class: left out (2 rows)
    # user 3: labels 0,1,0,1 preds .3,.3,.1,.6 -> pairs (.3~.3)=.5, (.3>.1), (.6>.3), (.6>.1): 3.5/4, 4 rows
    # GAUC = (3*.5 + 2*1 + 4*.875) / 9 = 7/9; users used 3; their share of rows 9/11
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    labels = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1.0])
    preds = torch.tensor([0.9, 0.2, 0.95, 0.1, 0.8, 0.5, 0.7, 0.3, 0.3, 0.1, 0.6])
    perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(0))  # order must not matter
    value, kept, share = gauc(preds[perm], labels[perm], groups[perm])
    assert value == pytest.approx(7 / 9, abs=1e-12)
    assert kept == 3
    assert share == pytest.approx(9 / 11)
    assert np.isnan(gauc(preds[5:7], labels[5:7], groups[5:7])[0])  # no user with both classes


def _gauc_loop(p: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[float, int, float]:
    """Oracle: one ``sklearn.metrics.roc_auc_score`` per group with both classes, weighted by its rows."""
    num = den = kept = 0
    for u in np.unique(g):
        yy, pp = y[g == u], p[g == u]
        if 0 < yy.sum() < len(yy):
            num, den, kept = num + len(yy) * roc_auc_score(yy, pp), den + len(yy), kept + 1
    return num / den, kept, den / len(y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gauc_matches_a_per_group_sklearn_loop_with_ties(seed: int) -> None:
    # 3,000 rows, 400 users of 1-20 rows, scores on a coarse grid (many ties inside a user), sparse labels
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 400, 3000) * 7 + 3  # ids need not be contiguous
    p = np.round(rng.random(3000), 1).astype(np.float32)
    y = (rng.random(3000) < 0.1 + 0.5 * p).astype(np.float32)
    got = gauc(torch.from_numpy(p), torch.from_numpy(y), torch.from_numpy(g))
    want = _gauc_loop(p.astype(np.float64), y, g)
    assert got[0] == pytest.approx(want[0], abs=1e-12)
    assert got[1:] == (want[1], pytest.approx(want[2]))


def _task(**kw) -> MultiTaskRecTask:
    return MultiTaskRecTask(
        backbone=partial(MMoE, num_experts=2, expert_hidden=[8]), embed_dim=4, tower_hidden=[4],
        cardinalities=[5, 7], num_numeric=2, task_names=["a", "b", "c"], **kw,
    )  # fmt: skip


def _batches(n: int, seed: int, *, constant_task: int | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, 5, (n,), generator=g), torch.randint(0, 7, (n,), generator=g)], 1)
    num = torch.randn(n, 2, generator=g)
    labels = (torch.rand(n, 3, generator=g) < torch.tensor([0.5, 0.3, 0.1])).float()
    if constant_task is not None:
        labels[:, constant_task] = 0.0
    group = torch.randint(0, 20, (n,), generator=g)
    return [
        {
            "cat": cat[i : i + 64],
            "num": num[i : i + 64],
            "labels": labels[i : i + 64],
            "group": group[i : i + 64],
        }
        for i in range(0, n, 64)
    ]


def test_single_class_task_is_left_out_of_the_mean_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    L.seed_everything(0, verbose=False)
    task = _task()
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, DataLoader(_batches(512, 0), batch_size=None))
    val = _batches(400, 1, constant_task=1)
    with caplog.at_level(logging.WARNING, logger="apps.recsys.task"):
        res = trainer.validate(task, DataLoader(val, batch_size=None), verbose=False)[0]
    assert any("task 'b' has a single class" in r.getMessage() for r in caplog.records)
    assert "val/auc_b" not in res and "val/gauc_b" not in res
    task.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(task(b["cat"], b["num"]).logits) for b in val]).numpy()
    y = torch.cat([b["labels"] for b in val]).numpy()
    groups = torch.cat([b["group"] for b in val])
    aucs = [roc_auc_score(y[:, k], probs[:, k]) for k in (0, 2)]
    assert res["val/auc_a"] == pytest.approx(aucs[0], abs=1e-5)
    assert res["val/auc_mean"] == pytest.approx(np.mean(aucs), abs=1e-5)  # b (AUC undefined) left out
    gaucs = [gauc(torch.from_numpy(probs[:, k]), torch.from_numpy(y[:, k]), groups)[0] for k in (0, 2)]
    assert res["val/gauc_mean"] == pytest.approx(np.mean(gaucs), abs=1e-5)
    assert res["val/positives_b"] == 0 and res["val/positives_a"] == pytest.approx(y[:, 0].sum())
    assert (
        res["val/gauc_groups_a"] == gauc(torch.from_numpy(probs[:, 0]), torch.from_numpy(y[:, 0]), groups)[1]
    )


def test_positive_reweighting_of_sparse_tasks() -> None:
    hp = {"task_names": ["dense", "sparse", "rare"], "pos_rates": [0.5, 0.01, 1e-5], "pos_weight_max": 100.0}
    assert positive_weights({**hp, "pos_weighting": "none"}).tolist() == [1.0, 1.0, 1.0]
    inv = positive_weights({**hp, "pos_weighting": "inverse"})
    torch.testing.assert_close(inv, torch.tensor([1.0, 99.0, 100.0]))  # capped at pos_weight_max
    sq = positive_weights({**hp, "pos_weighting": "sqrt_inverse"})
    torch.testing.assert_close(sq, torch.tensor([1.0, 99.0**0.5, 100.0]))
    with pytest.raises(ValueError, match="needs the train positive rate"):
        positive_weights({"task_names": ["a"], "pos_weighting": "inverse"})

    task = MultiTaskRecTask(
        backbone=partial(MMoE, num_experts=2, expert_hidden=[8]), cardinalities=[3], num_numeric=1,
        task_names=["a", "b"], pos_weighting="inverse", pos_rates=[0.2, 0.05],
    )  # fmt: skip
    logits, labels = torch.randn(50, 2), (torch.rand(50, 2) < 0.3).float()
    w = torch.tensor([4.0, 19.0])
    want = torch.stack([
        F.binary_cross_entropy_with_logits(logits[:, k], labels[:, k], pos_weight=w[k]) for k in range(2)
    ])  # fmt: skip
    torch.testing.assert_close(task.task_losses(logits, labels), want)
    with pytest.raises(ValueError, match="pos_weighting must be"):
        _task(pos_weighting="balanced")
