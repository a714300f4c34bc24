"""MIGA end to end on a CSI 300 subset through ``moekit finance fit`` (issue 16): the shipped
``csi300_miga.yaml`` with the data cut to the first 150 instruments (by code) and 2014-2019, 2 epochs; the
trained model must reach a RankIC that the same run with each day's labels shuffled across its stocks (a
model that cannot have learnt the signal) misses, and the test predictions the fit writes a positive one.

The metric is the RankIC on the training days against the true labels (the in-sample fit: did training
learn the link between features and labels?), with lr 3e-3 so that 2 epochs move the model. Measured on the
2-core CPU, one torch thread, seed 0 (deterministic: repeated runs gave the same digits), with the config's
MIGA (MSE, market context, CSRank label): MIGA 0.0736, label-shuffled 0.0081; test-period RankIC 0.0148 and
-0.0023 (out of sample one seed does not separate them safely: a random mix of Alpha158 factors already
reaches |RankIC| ~ 0.02-0.05 on this market). The threshold sits midway; the statement is about this seeded
run (one seed; the margins are 0.033 each way), not a confidence interval. (With the earlier config, IC loss
on the CSZScore label: 0.0875 vs 0.0455.) Runtime ~75-110 s on the
shared CPU (above the 90 s aim when the machine is loaded).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from apps.finance.data import MarketDataModule
from apps.finance.metrics import daily_ic, ic_summary
from apps.finance.model import MIGA
from apps.finance.task import FinanceTask
from pipelines.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "apps" / "finance" / "configs" / "csi300_miga.yaml"
SUBSET = [
    "--data.init_args.max_instruments=150",
    "--data.init_args.period=[2014-01-01, 2019-12-31]",
    "--data.init_args.train=[2014-01-01, 2017-06-30]",
    "--data.init_args.valid=[2017-07-01, 2017-12-31]",
    "--data.init_args.test=[2018-01-01, 2019-12-31]",
    "--data.init_args.cache=false",
    "--trainer.max_epochs=2",
    "--model.init_args.lr=0.003",
    "--trainer.enable_progress_bar=false",
]
MIN_RANK_IC = 0.041  # midway between the measured 0.0736 (MIGA) and 0.0081 (label-shuffled)
MIGA_ARGS = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["model"]["init_args"]


def fit_rank_ic(tmp: Path, name: str, dm: MarketDataModule) -> tuple[float, float]:
    """``moekit finance fit`` on the subset; (train-days RankIC of the trained model (last checkpoint)
    against the true labels, test RankIC of the predictions file the fit wrote)."""
    preds = tmp / f"{name}.parquet"
    main(["finance", "fit", "--config", str(CONFIG), *SUBSET, f"--model.init_args.predictions_path={preds}",
          f"--run_dir={tmp / name}"])  # fmt: skip
    p = pd.read_parquet(preds)
    test = ic_summary(daily_ic(p[p["segment"] == "test"]))["RankIC"]
    (ckpt,) = (tmp / name).rglob("last.ckpt")  # the model after its 2 epochs
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    task = FinanceTask(model=MIGA(**MIGA_ARGS))
    task.load_state_dict(state)
    return train_rank_ic(task, dm), test


def train_rank_ic(task: FinanceTask, dm: MarketDataModule) -> float:
    frame = task.predict_frame(DataLoader(dm._ds(dm.split.train, False), batch_size=None))
    return ic_summary(daily_ic(frame.rename(columns={"day": "date"})))["RankIC"]


@pytest.mark.slow
@pytest.mark.needs_data("csi300_qlib/calendars/day.txt", "csi300_qlib/instruments/csi300.txt")
def test_miga_fit_on_csi300_beats_a_label_shuffled_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    data = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]
    data.update(max_instruments=150, period=("2014-01-01", "2019-12-31"), train=("2014-01-01", "2017-06-30"),
                valid=("2017-07-01", "2017-12-31"), test=("2018-01-01", "2019-12-31"))  # fmt: skip
    dm = MarketDataModule(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    dm.setup()
    good, good_test = fit_rank_ic(tmp_path, "miga", dm)
    setup = MarketDataModule.setup

    def shuffled_setup(self: MarketDataModule, stage: str | None = None) -> None:
        setup(self, stage)
        rng = np.random.default_rng(0)
        for d in range(len(self.y)):  # permute each day's learn labels across its stocks
            ok = np.flatnonzero(np.isfinite(self.y[d]) & self.present[d])
            self.y[d, ok] = self.y[d, rng.permutation(ok)]

    monkeypatch.setattr(MarketDataModule, "setup", shuffled_setup)
    broken, broken_test = fit_rank_ic(tmp_path, "shuffled", dm)
    print(
        f"train-days RankIC: MIGA {good:.4f}, shuffled {broken:.4f}; test {good_test:.4f} {broken_test:.4f}"
    )
    assert good > MIN_RANK_IC > broken, (good, broken)
    assert good_test > 0, good_test  # and the trained model's out-of-sample RankIC is positive
