"""The finance serving predictor (panel window -> score per ticker): a minimal (60 + step_len)-day window
gives the same scores as a long history (so serving a window reproduces the features computed on the full
panel in training, Alpha158 looking back at most 60 days), and bad windows get errors naming the problem."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from apps.finance.features import alpha158, stack_features
from apps.finance.model import MIGA
from apps.finance.processors import RobustZScoreNorm
from pipelines.app_adapters import FinancePredictor


def _panel(n_days: int = 160, tickers: tuple[str, ...] = ("AAA", "BBB", "CCC", "DDD", "EEE")) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    dates = pd.bdate_range("2017-01-02", periods=n_days)
    rows = []
    for t in tickers:
        close = 50 * np.exp(np.cumsum(rng.normal(0, 0.02, n_days)))
        open_ = close * np.exp(rng.normal(0, 0.005, n_days))
        high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.01, n_days))
        low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.01, n_days))
        vol = rng.integers(1e5, 1e6, n_days).astype(float)
        day = dates.strftime("%Y-%m-%d")
        cols = {"open": open_, "high": high, "low": low, "close": close, "volume": vol}
        rows.append(pd.DataFrame({"date": day, "ticker": t, **cols}))
    return pd.concat(rows, ignore_index=True)


@pytest.fixture(scope="module")
def predictor() -> FinancePredictor:
    torch.manual_seed(0)
    df = _panel()
    wide = {
        f: df.pivot(index="date", columns="ticker", values=f)
        for f in ("open", "high", "low", "close", "volume")
    }
    x = stack_features(alpha158(wide))  # (days, tickers, F)
    norm = RobustZScoreNorm().fit(x, np.arange(len(x)) >= 60)
    net = MIGA(
        num_features=x.shape[-1], step_len=2, hidden_dim=16, num_groups=2, experts_per_group=2, top_k=2,
        expert_dim=4, attention_heads=2,
    ).eval()  # fmt: skip
    return FinancePredictor(net=net, norm=norm, kind="alpha158", step_len=2)


def test_short_window_equals_long_history(predictor: FinancePredictor) -> None:
    df = _panel()
    dates = sorted(df["date"].unique())
    long = predictor.predict(df)
    short = predictor.predict(df[df["date"].isin(dates[-predictor.min_days :])])
    assert list(long["ticker"]) == ["AAA", "BBB", "CCC", "DDD", "EEE"]
    np.testing.assert_allclose(short["score"].to_numpy(), long["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert sorted(long["rank"]) == [1, 2, 3, 4, 5]
    assert long["score"].std() > 0  # not a constant model: the comparison can fail
    # changing the last day's prices changes the scores (the window is really read)
    bumped = df.copy()
    last = bumped["date"] == dates[-1]
    bumped.loc[last & (bumped["ticker"] == "AAA"), ["close", "high"]] *= 1.2
    assert not np.allclose(predictor.predict(bumped)["score"], long["score"])


def test_bad_windows_are_named(predictor: FinancePredictor) -> None:
    df = _panel(80)
    with pytest.raises(ValueError, match="volume"):
        predictor.predict(df.drop(columns=["volume"]))
    with pytest.raises(ValueError, match="close"):
        predictor.predict(df.assign(close=df["close"].astype(object).where(df.index != 3, "abc")))
    with pytest.raises(ValueError, match="at least 62"):
        predictor.predict(df[df["date"] >= sorted(df["date"].unique())[-30]])
    with pytest.raises(ValueError, match="duplicated"):
        predictor.predict(pd.concat([df, df.head(2)]))
