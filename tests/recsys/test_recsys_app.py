"""The recsys app contract: serving reuses training. The same raw rows through the data module and through the
served predictor give identical network inputs, so the predictor's probabilities equal the trained task's."""

from __future__ import annotations

from functools import partial

import lightning as L
import numpy as np
import pandas as pd
import torch

from apps.recsys.app import APP, RecsysPredictor
from apps.recsys.data import MultiTaskDataModule
from apps.recsys.model import HoMEBackbone
from apps.recsys.task import MultiTaskRecTask


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "u": rng.integers(0, 9, n).astype(str), "age": rng.integers(18, 90, n), "x": rng.lognormal(size=n),
        "y1": rng.integers(0, 2, n), "y2": rng.integers(0, 2, n),
    })  # fmt: skip


def test_predictor_inputs_equal_the_data_modules(tmp_path) -> None:
    _frame(300, 0).to_csv(tmp_path / "train.csv", index=False)
    test = _frame(50, 1)
    test.loc[0, "u"] = "never-seen"  # out-of-vocabulary on both paths
    test.to_csv(tmp_path / "test.csv", index=False)
    dm = MultiTaskDataModule(
        train_path=str(tmp_path / "train.csv"), val_path=str(tmp_path / "train.csv"),
        test_path=str(tmp_path / "test.csv"), categorical=["u"], numeric=["age", "x"], log1p=["x"],
        numeric_as_categorical=["age"],
        labels=["y1", "y2"], batch_size=64,
    )  # fmt: skip
    task = MultiTaskRecTask(backbone=partial(HoMEBackbone, expert_hidden=[8]), embed_dim=4, tower_hidden=[4])
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(task, dm)
    predictor = APP.build_predictor(task, dm)
    assert isinstance(predictor, RecsysPredictor)

    raw = pd.read_csv(tmp_path / "test.csv")  # the same raw rows the data module read, labels dropped
    got = predictor.inputs(raw.drop(columns=["y1", "y2"]))
    want = dm.splits["test"]
    assert torch.equal(got["cat"], want["cat"]) and torch.equal(got["num"], want["num"])
    assert got["cat"][0, 0] == 0 and (want["cat"][1:, 0] > 0).all()  # the unseen value is OOV, others are not

    task.eval()
    with torch.no_grad():
        expected = torch.sigmoid(task(want["cat"], want["num"]).logits).numpy()
    out = predictor.predict(raw)
    np.testing.assert_allclose(out[["y1", "y2"]].to_numpy(), expected, rtol=1e-6, atol=1e-7)
    assert expected.std(0).min() > 0  # not a constant model: the comparison can fail
