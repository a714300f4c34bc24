"""End-to-end on the shipped S&P 500 panel (slow): MIGA must fit its training window; the GRU pipeline runs
features -> training -> IC metrics -> backtest.

The GRU test's model is the GRU baseline with qlib's recipe (MSE on the CSRankNorm label), seed 0,
2 epochs — the same run as the benchmark's GRU seed 0 (valid RankIC 0.022 there). Signals on this panel are
weak (every model's test RankIC is within ±0.01 of zero in benchmarks/results/finance_sp500.json), so the
positive-RankIC assertion is a statement about this seeded run, not a margin.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest


@pytest.mark.slow
@pytest.mark.needs_data("sp500_5yr/individual_stocks_5yr", "sp500_index/GSPC.csv")
def test_real_panel_short_run(tmp_path):
    from apps.finance.backtest import topk_dropout_backtest
    from apps.finance.data import SP500DataModule, daily_returns
    from apps.finance.metrics import daily_ic, ic_summary
    from apps.finance.model import GRU
    from apps.finance.task import FinanceTask, write_predictions

    L.seed_everything(0, verbose=False)
    dm = SP500DataModule(features="alpha158", step_len=1)
    task = FinanceTask(model=GRU(num_features=157, hidden_dim=64), loss="mse", lr=5e-4)
    tr = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    tr.fit(task, datamodule=dm)
    assert math.isfinite(float(tr.callback_metrics["train/loss"]))
    preds = write_predictions(task, dm, str(tmp_path / "p.parquet"))
    valid = preds[preds["segment"] == "valid"]
    s = ic_summary(daily_ic(valid))
    assert all(math.isfinite(v) for v in s.values()), s
    assert s["RankIC"] > 0, s
    close = dm.panel.wide["close"]
    rets = daily_returns(close, dm.panel.move_mask).where(close.notna())
    days = dm.panel.dates[dm.split.valid]
    bt = topk_dropout_backtest(
        valid.pivot(index="date", columns="ticker", values="score"),
        rets.loc[days],
        dm.bench.pct_change().fillna(0.0).loc[days],
        topk=50,
        n_drop=5,
    )
    e = bt.summary["excess_return_with_cost"]
    assert np.isfinite([e["AR"], e["IR"], e["MDD"]]).all() and e["MDD"] <= 0


# MIGA in-sample fit (test_miga_fits_its_training_window). Measured on the 2-core CPU machine, one
# torch thread, sp500_miga.yaml's model and loss (ic, switch balance 0.01, lr 5e-4), 500 steps (~8.5
# epochs) on the 59 training days of 2015-10-01..2015-12-31; mean daily RankIC of the trained model on
# those same days:
#   working MIGA, seeds 0-4:                          0.185 0.176 0.173 0.170 0.166
#   label-shuffled within each day, seeds 0-2:        -0.016 -0.005 -0.007
#   untrained (init), seeds 0-4:                      |RankIC| <= 0.023
#   encoder output detached, seeds 0-2:               0.098 0.095 0.088
#   expert read-out detached (only the router learns): 0.091 0.097 0.083
#   routing weights zeroed:                           NaN (constant score)
# The out-of-sample RankIC of every one of these is within +-0.01 of zero: this panel has no signal that
# generalises, so the test checks that MIGA learns the cross-section it is trained on. The threshold sits
# between the lowest working seed (0.166, 28 % above) and the best partly broken model (0.098, 25 % below).
MIGA_FIT_STEPS = 500
MIGA_FIT_MIN_RANKIC = 0.13


@pytest.mark.slow
@pytest.mark.needs_data("sp500_5yr/individual_stocks_5yr", "sp500_index/GSPC.csv")
def test_miga_fits_its_training_window():
    from torch.utils.data import DataLoader

    from apps.finance.data import DayDataset, SP500DataModule
    from apps.finance.metrics import daily_ic, ic_summary
    from apps.finance.model import MIGA
    from apps.finance.task import FinanceTask

    dm = SP500DataModule(features="alpha158", step_len=1, train=("2015-10-01", "2015-12-31"))
    dm.setup()
    y_true = dm.y

    def in_sample_rank_ic(task: FinanceTask) -> float:
        days = DayDataset(x=dm.x, y=y_true, y_raw=dm.y_raw, present=dm.present, days=dm.split.train)
        frame = task.predict_frame(DataLoader(days, batch_size=None)).rename(columns={"day": "date"})
        return ic_summary(daily_ic(frame))["RankIC"]  # label = the raw next-day return

    def fit(y: np.ndarray) -> tuple[float, float]:
        """(RankIC before, after) training on learn label ``y``, both against the true labels."""
        dm.y = y
        L.seed_everything(0, verbose=False)
        task = FinanceTask(model=MIGA(num_features=157, hidden_dim=64), loss="ic", w_balance=0.01, lr=5e-4)
        before = in_sample_rank_ic(task)
        L.Trainer(
            max_steps=MIGA_FIT_STEPS,
            accelerator="cpu",  # the measured numbers above are CPU numbers
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(task, datamodule=dm)
        return before, in_sample_rank_ic(task)

    assert len(dm.split.train) == 59
    before, after = fit(y_true)
    assert abs(before) < MIGA_FIT_MIN_RANKIC and after > MIGA_FIT_MIN_RANKIC, (before, after)
    # the same training with each day's labels permuted across its stocks must miss the threshold: the fit
    # above comes from the link between features and labels, not from the procedure
    rng = np.random.default_rng(0)
    shuffled = y_true.copy()
    for d in dm.split.train:
        ok = np.flatnonzero(np.isfinite(shuffled[d]))
        shuffled[d, ok] = shuffled[d, rng.permutation(ok)]
    _, after_shuffled = fit(shuffled)
    assert after_shuffled < MIGA_FIT_MIN_RANKIC, after_shuffled
