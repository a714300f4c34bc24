"""The finance app contract. Serving reuses training: the same raw panel rows through the data module and
through the served predictor give identical network inputs (one :class:`PanelTransform`, missing rows masked
alike); a minimal (60 + step_len)-day window gives the same scores as a long history (Alpha158 looks back at
most 60 days); bad windows get errors naming the problem; training logs moe_core's routing statistics under
``routing/``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import apps.finance.data as finance_data
from apps.finance.app import APP, FinancePredictor
from apps.finance.data import PanelTransform, SP500DataModule
from apps.finance.features import alpha158, stack_features
from apps.finance.model import MIGA
from apps.finance.processors import RobustZScoreNorm
from apps.finance.task import FinanceTask


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
    return FinancePredictor(net=net, transform=PanelTransform(kind="alpha158", norm=norm), step_len=2)


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
    # NaN is refused, not coerced or silently dropped: the error names the ticker, date and column
    holed = df.copy()
    holed.loc[(holed["ticker"] == "CCC") & (holed["date"] == holed["date"].iloc[70]), "volume"] = np.nan
    with pytest.raises(
        ValueError, match=rf"NaN/inf.*ticker CCC, date {holed['date'].iloc[70]}, column 'volume'"
    ):
        predictor.predict(holed)
    with pytest.raises(ValueError, match="NaN/inf"):
        predictor.predict(df.assign(high=np.where(df.index == 5, np.inf, df["high"])))
    # a window whose features do not match the network (a model trained with VWAP, a window without it)
    wide_net = FinancePredictor(
        net=MIGA(num_features=158, step_len=2, hidden_dim=8, num_groups=1, experts_per_group=2, top_k=1,
                 expert_dim=2, attention_heads=1),
        transform=predictor.transform, step_len=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"157 features, the model expects 158 .*'vwap'"):
        wide_net.predict(df)


def _miga(step_len: int) -> MIGA:
    return MIGA(
        num_features=157, step_len=step_len, hidden_dim=16, num_groups=2, experts_per_group=2, top_k=2,
        expert_dim=4, attention_heads=2,
    )  # fmt: skip


@pytest.fixture
def panel_module(tmp_path, monkeypatch) -> tuple[SP500DataModule, pd.DataFrame]:
    """A set-up SP500DataModule on a synthetic panel (own source; the ^GSPC index replaced by the panel's
    calendar) in which one ticker misses two days."""
    df = _panel(200)
    dates = sorted(df["date"].unique())
    gone = (df["ticker"] == "EEE") & df["date"].isin([dates[170], dates[179]])
    df = df[~gone].reset_index(drop=True)
    df.to_csv(tmp_path / "panel.csv", index=False)
    calendar = pd.DatetimeIndex(dates, name="date")
    monkeypatch.setattr(finance_data, "load_index", lambda data_dir=None: pd.Series(1.0, index=calendar))
    dm = SP500DataModule(
        source=str(tmp_path / "panel.csv"), features="alpha158", step_len=2, cache=False,
        train=(dates[0], dates[119]), valid=(dates[120], dates[159]), test=(dates[160], dates[-1]),
    )  # fmt: skip
    dm.setup()
    return dm, df


def test_predictor_inputs_equal_the_data_modules(panel_module) -> None:
    dm, df = panel_module
    torch.manual_seed(0)
    predictor = APP.build_predictor(FinanceTask(model=_miga(2)), dm)
    ds = dm.test_dataloader().dataset
    dates = sorted(df["date"].unique())
    for d in (180, 185, len(dates) - 1):  # 180: EEE is back after missing day 179 (inside its 2-day window)
        item = ds[int(np.flatnonzero(ds.days == d)[0])]
        # the raw rows the data module read, up to that day: the history a live request would send
        x, tickers = predictor.inputs(df[df["date"] <= dates[d]])
        assert list(tickers) == [dm.panel.tickers[i] for i in item["tickers"]]
        assert torch.equal(x, item["x"]), d  # (N, T, F), bit-identical
    assert item["x"].abs().sum() > 0
    missing = ds[int(np.flatnonzero(ds.days == 180)[0])]["x"][4, 0]  # EEE on day 179: masked -> 0
    assert torch.equal(missing, torch.zeros_like(missing))


def test_training_logs_routing_statistics_under_routing(panel_module) -> None:
    import lightning as L

    dm, _ = panel_module
    task = FinanceTask(model=_miga(2), loss="ic")
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, dm)
    m = trainer.callback_metrics
    r = "routing/train/router/"
    assert {f"{r}entropy", f"{r}max_over_mean_load", f"{r}load_entropy"} <= set(m)
    loads = [float(m[f"{r}expert_load_e{e}"]) for e in range(4)]
    assert abs(sum(loads) - 1) < 1e-5
    assert float(m[f"{r}active_experts"]) == 2.0  # top-2 of 4
    assert not any(k.startswith("train/router") or "max_expert_load" in k for k in m)
