"""Panel loading/validation, labels, purged splits, processors: counts, formulas, no look-ahead."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from apps.finance.data import (
    DayDataset,
    load_panel,
    make_label,
    purged_split,
    validate_panel,
)
from apps.finance.processors import RobustZScoreNorm, cs_rank_norm, cs_zscore_norm, fillna


def long_panel(T: int = 12, tickers=("AAA", "BBB", "CCC"), seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2020-01-01", periods=T)
    rows = []
    for tk in tickers:
        c = 50 * np.exp(np.cumsum(rng.normal(0, 0.01, T)))
        for d, cc in zip(dates, c, strict=True):
            rows.append(
                {
                    "date": d,
                    "open": cc,
                    "high": cc * 1.01,
                    "low": cc * 0.99,
                    "close": cc,
                    "volume": 1000.0,
                    "Name": tk,
                }
            )
    return pd.DataFrame(rows)


def test_validation_counts_what_it_touches():
    df = long_panel()
    df = pd.concat([df, df.iloc[[3]]], ignore_index=True)  # one duplicated (ticker, date)
    df.loc[5, "close"] = -1.0  # non-positive price
    df.loc[6, ["high", "low"]] = [40.0, 60.0]  # high < low
    df.loc[7, "open"] = np.nan
    df.loc[8, "volume"] = 0
    bbb = df.index[df["Name"] == "BBB"]
    df.loc[bbb[6], "close"] = df.loc[bbb[5], "close"] * 0.4  # -60 % glitch, reverts next day
    with pytest.warns(UserWarning, match="duplicated_rows = 1"):
        p = validate_panel(df)
    r = p.report
    assert r["duplicated_rows"] == 1 and r["non_positive_prices"] == 1 and r["high_lt_low"] == 1
    assert r["zero_volume"] == 1 and r["nan_fields"] >= 2  # open NaN + the non-positive close
    assert r["absurd_moves_masked"] == 2  # the drop and the rebound
    hi, lo = p.wide["high"].to_numpy(), p.wide["low"].to_numpy()
    assert np.nanmin(hi - lo) >= 0
    lab = make_label(p.wide["close"], p.move_mask)
    # labels whose return window covers the glitch are masked
    assert np.isnan(lab[4, 1]) and np.isnan(lab[5, 1]) and np.isfinite(lab[3, 1]) and np.isfinite(lab[6, 1])
    with pytest.raises(ValueError, match="missing column"):
        validate_panel(df.drop(columns=["volume"]))


def test_load_panel_sources(tmp_path):
    df = long_panel(T=5)
    folder = tmp_path / "csvs"
    folder.mkdir()
    for tk, g in df.groupby("Name"):
        g.to_csv(folder / f"{tk}_data.csv", index=False)
    df.to_parquet(tmp_path / "p.parquet")
    df.to_csv(tmp_path / "p.csv", index=False)
    outs = [load_panel(x) for x in (df, folder, tmp_path / "p.parquet", tmp_path / "p.csv")]
    for o in outs:
        assert list(o.columns) == ["date", "ticker", "open", "high", "low", "close", "volume"]
        assert len(o) == 15
        np.testing.assert_allclose(
            o.sort_values(["ticker", "date"])["close"], outs[0].sort_values(["ticker", "date"])["close"]
        )
    with pytest.raises(FileNotFoundError):
        load_panel(tmp_path / "nope.csv")


def test_label_formula():
    close = pd.DataFrame({"A": [1.0, 2.0, 4.0, 5.0, 10.0]})
    lab = make_label(close)
    np.testing.assert_allclose(lab[:3, 0], [4 / 2 - 1, 5 / 4 - 1, 10 / 5 - 1])
    assert np.isnan(lab[3:, 0]).all()


def test_purged_split_no_label_crosses():
    dates = pd.bdate_range("2013-02-08", "2018-02-07")
    for H in (2, 5):
        sp = purged_split(dates, horizon=H)
        for seg, end in ((sp.train, "2015-12-31"), (sp.valid, "2016-12-31")):
            last_label_day = dates[seg.max() + H]
            assert last_label_day <= pd.Timestamp(end)
        assert sp.train.max() < sp.valid.min() and sp.valid.max() < sp.test.min()
        assert sp.train.min() == 60
    with pytest.raises(ValueError, match="purge"):
        purged_split(dates, horizon=5, purge_days=2)


def test_training_labels_and_fit_stats_ignore_future_prices():
    T = 120
    df = long_panel(T=T, tickers=("A", "B", "C", "D"))
    p = validate_panel(df)
    dates = p.dates
    sp = purged_split(
        dates,
        train=(str(dates[0].date()), str(dates[59].date())),
        valid=(str(dates[60].date()), str(dates[89].date())),
        test=(str(dates[90].date()), str(dates[-1].date())),
        warmup_days=10,
    )
    lab1 = make_label(p.wide["close"], p.move_mask)
    close2 = p.wide["close"].copy()
    close2.iloc[sp.train.max() + 6 :] *= 1.5 + np.random.default_rng(0).random(
        close2.iloc[sp.train.max() + 6 :].shape
    )
    lab2 = make_label(close2, p.move_mask)
    np.testing.assert_array_equal(lab1[sp.train], lab2[sp.train])  # no training label uses a later price
    x = np.random.default_rng(1).normal(size=(T, 4, 3)).astype(np.float32)
    fit = np.zeros(T, bool)
    fit[sp.train] = True
    n1 = RobustZScoreNorm().fit(x, fit)
    x2 = x.copy()
    x2[sp.valid.min() :] *= 100
    n2 = RobustZScoreNorm().fit(x2, fit)
    np.testing.assert_array_equal(n1.median, n2.median)
    np.testing.assert_array_equal(n1.scale, n2.scale)


def test_processors_math():
    rng = np.random.default_rng(0)
    x = rng.standard_t(2, size=(20, 10, 3)).astype(np.float32)
    x[0, 0, 0] = np.nan
    fit = np.zeros(20, bool)
    fit[:10] = True
    n = RobustZScoreNorm().fit(x, fit)
    sub = x[:10].reshape(-1, 3).astype(np.float64)
    med = np.nanmedian(sub, 0)
    np.testing.assert_allclose(n.median, med)
    np.testing.assert_allclose(n.scale, 1.4826 * (np.nanmedian(np.abs(sub - med), 0) + 1e-12))
    z = n.transform(x)
    assert np.nanmax(np.abs(z)) <= 3 and np.isnan(z[0, 0, 0])
    assert not np.isnan(fillna(z)).any()
    y = rng.normal(size=(5, 8))
    y[0, 0] = np.nan
    r = cs_rank_norm(y)
    np.testing.assert_allclose(r, cs_rank_norm(np.exp(y)))  # monotone invariance within a day
    assert np.isnan(r[0, 0])
    np.testing.assert_allclose(r[1], (pd.Series(y[1]).rank(pct=True).to_numpy() - 0.5) * 3.46)
    zz = cs_zscore_norm(y)
    np.testing.assert_allclose(np.nanmean(zz, 1), 0, atol=1e-12)
    np.testing.assert_allclose(np.nanstd(zz, 1, ddof=1), 1)


def test_day_dataset_batches():
    days, N, F = 10, 5, 3
    x = np.arange(days * N * F, dtype=np.float32).reshape(days, N, F)
    y = np.random.default_rng(0).normal(size=(days, N))
    y[4, 2] = np.nan
    present = np.ones((days, N), bool)
    present[4, 0] = False
    ds = DayDataset(x=x, y=y, y_raw=y, present=present, days=np.arange(days), step_len=3, drop_nan_label=True)
    item = ds[4]
    assert item["tickers"].tolist() == [1, 3, 4]
    assert item["x"].shape == (3, 3, F)
    np.testing.assert_array_equal(item["x"][0].numpy(), x[2:5, 1])  # (T, F) history of ticker 1 ending today
    item0 = ds[0]
    assert torch.all(item0["x"][:, :2] == 0)  # left padding before the first day


@pytest.mark.needs_data("sp500_index/GSPC.csv")
def test_real_split_indices():
    from apps.finance.data import load_index

    cal = pd.DatetimeIndex(load_index().index)
    assert len(cal) == 1259
    sp = purged_split(cal)
    assert (sp.train.min(), sp.train.max(), sp.valid.min(), sp.valid.max(), sp.test.min(), sp.test.max()) == (
        60,
        724,
        730,
        976,
        982,
        1258,
    )
