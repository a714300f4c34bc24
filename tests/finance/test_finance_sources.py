"""Market readers (issue 16): a hand-made qlib provider folder, each bar-folder column mapping, each data
problem's message, labels and returns across suspensions, the data module on a user's folder."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apps.finance.data import MarketDataModule, next_tradable_label
from apps.finance.sources import (
    ColumnMap,
    DataWarning,
    equal_weight_index,
    read_bars,
    read_qlib,
)

CAL = pd.bdate_range("2021-01-04", periods=8)


def write_bin(path: Path, start: int, values) -> None:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    np.r_[np.float32(start), np.asarray(values, np.float32)].astype("<f4").tofile(path)


def make_provider(root: Path) -> dict:
    """Calendar of 8 days; market m: AAA whole period, BBB two spells (IPO at day 2), CCC no features;
    index IDX; sh-lower-case folder for DDD (qlib's lower-case layout)."""
    (root / "calendars").mkdir(parents=True)
    (root / "calendars" / "day.txt").write_text("\n".join(d.strftime("%Y-%m-%d") for d in CAL) + "\n")
    (root / "instruments").mkdir()
    (root / "instruments" / "m.txt").write_text(
        "AAA\t2021-01-04\t2021-01-13\n"
        "BBB\t2021-01-06\t2021-01-07\n"
        "BBB\t2021-01-11\t2021-01-13\n"
        "CCC\t2021-01-04\t2021-01-13\n"
        "DDD\t2021-01-04\t2021-01-05\n"
    )
    a = np.array([10, 11, 12, 13, 14, 15, 16, 17], float)
    b = np.array([20, 21, 21, 21, 22, 23], float)  # from calendar index 2; suspended idx 4-5 (volume 0)
    vol_b = [100, 100, 0, 0, 100, 100]
    d = np.array([5, 5, 5, 5, 5, 5, 5, 5], float)
    for _inst, start, c, v, folder in (
        ("AAA", 0, a, [100] * 8, "AAA"),
        ("BBB", 2, b, vol_b, "BBB"),
        ("DDD", 0, d, [7] * 8, "ddd"),
        ("IDX", 0, 1000 + np.arange(8.0), [1] * 8, "IDX"),
    ):
        for f, vals in (("open", c), ("high", c * 1.01), ("low", c * 0.99), ("close", c), ("volume", v)):
            write_bin(root / "features" / folder / f"{f}.day.bin", start, vals)
        write_bin(root / "features" / folder / "factor.day.bin", start, np.full(len(c), 2.0))
    return {"a": a, "b": b}


def test_qlib_provider_reader(tmp_path: Path) -> None:
    v = make_provider(tmp_path)
    with pytest.warns(DataWarning, match=r"1 of 4 instruments of market 'm' have no features.*CCC"):
        md = read_qlib(tmp_path, market="m", benchmark="IDX")
    assert md.tickers == ["AAA", "BBB", "DDD"] and list(md.dates) == list(CAL)
    np.testing.assert_array_equal(md.wide["close"]["AAA"], v["a"])
    b = md.wide["close"]["BBB"].to_numpy()
    assert np.isnan(b[:2]).all() and np.array_equal(b[2:], v["b"])  # start index 2 honoured
    np.testing.assert_array_equal(md.wide["close"]["DDD"], 5.0)  # lower-case folder found
    assert "vwap" not in md.wide and md.wide["factor"]["AAA"].eq(2.0).all()
    # universe = membership spells: BBB in 01-06..01-07 and 01-11..01-13, DDD only the first two days
    assert md.universe["BBB"].tolist() == [False, False, True, True, False, True, True, True]
    assert md.universe["DDD"].tolist() == [True, True] + [False] * 6
    assert md.tradable["BBB"].tolist() == [False, False, True, True, False, False, True, True]
    np.testing.assert_array_equal(md.bench, 1000 + np.arange(8.0))
    assert md.bench_name == "IDX"
    # period: explicit, the days outside counted
    md2 = read_qlib(tmp_path, market="m", benchmark="IDX", period=("2021-01-05", "2021-01-08"))
    assert len(md2.dates) == 4 and md2.report["days_outside_period"] == 4
    with pytest.raises(FileNotFoundError, match="benchmark 'NOPE'"):
        read_qlib(tmp_path, market="m", benchmark="NOPE")
    with pytest.raises(FileNotFoundError, match=r"markets here: \['m'\]"):
        read_qlib(tmp_path, market="csi300")


def test_returns_and_label_across_a_suspension(tmp_path: Path) -> None:
    make_provider(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        md = read_qlib(tmp_path, market="m", benchmark="IDX")
    r = md.returns()["BBB"].to_numpy()
    # BBB trades idx 2,3 (20, 21), suspended 4,5 (stale 21, 21 in the file), resumes at 6 (22) and 7 (23)
    assert r[2] == 0.0 and r[3] == pytest.approx(0.05) and np.isnan(r[4]) and np.isnan(r[5])
    assert r[6] == pytest.approx(22 / 21 - 1)  # the return across the suspension is kept
    lab, end = next_tradable_label(md.wide["close"], md.tradable, horizon=2)
    j = md.tickers.index("BBB")
    # label(t=2) = close[n(n(2))] / close[n(2)] - 1 = close[6] / close[3] - 1 (3 -> 6 skips the suspension)
    assert lab[2, j] == pytest.approx(22 / 21 - 1) and end[2, j] == 6
    assert lab[3, j] == pytest.approx(23 / 22 - 1) and end[3, j] == 7
    assert np.isnan(lab[6, j]) and end[6, j] == -1  # no second tradable day after 6
    a = md.tickers.index("AAA")
    np.testing.assert_allclose(
        lab[:6, a], np.array([12, 13, 14, 15, 16, 17.0]) / [11, 12, 13, 14, 15, 16] - 1
    )
    ew = equal_weight_index(md.wide["close"], md.tradable, md.universe)
    # day 1: AAA +10 %, DDD 0 % (BBB not listed yet) -> mean +5 %
    assert ew.iloc[0] == 1.0 and ew.iloc[1] == pytest.approx(1.05)


def bars(tickers=("AAA", "BBB"), n: int = 6, seed: int = 0) -> pd.DataFrame:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    rows = []
    for t in tickers:
        c = 10 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
        for d, x in zip(pd.bdate_range("2022-03-01", periods=n), c, strict=True):
            rows.append({"ticker": t, "date": d.strftime("%Y-%m-%d"), "open": x, "high": x * 1.01,
                         "low": x * 0.99, "close": x, "volume": 1000.0})  # fmt: skip
    return pd.DataFrame(rows)


def test_bars_default_mapping_csv_and_parquet(tmp_path: Path) -> None:
    df = bars()
    (tmp_path / "csv").mkdir()
    df.to_csv(tmp_path / "csv" / "all.csv", index=False)
    md = read_bars(tmp_path / "csv")
    assert md.tickers == ["AAA", "BBB"] and len(md.dates) == 6 and md.bench_name == "equal_weight"
    want = df[df.ticker == "BBB"]["close"].to_numpy()
    np.testing.assert_allclose(md.wide["close"]["BBB"], want)
    (tmp_path / "pq").mkdir()
    df.to_parquet(tmp_path / "pq" / "all.parquet")
    md2 = read_bars(tmp_path / "pq")
    pd.testing.assert_frame_equal(md2.wide["close"], md.wide["close"])


def test_bars_file_per_ticker_integer_dates_units_amount(tmp_path: Path) -> None:
    """Tushare-like files: ts_code-less (ticker = file stem), YYYYMMDD integers, vol in lots of 100, amount
    in thousands -> here given in currency; VWAP from amount / shares."""
    for t, g in bars().groupby("ticker"):
        out = pd.DataFrame({
            "trade_date": pd.to_datetime(g["date"]).dt.strftime("%Y%m%d").astype(int),
            "o": g["open"], "h": g["high"], "l": g["low"], "c": g["close"], "vol": g["volume"] / 100,
            "amount": g["close"] * g["volume"],
        })  # fmt: skip
        out.to_csv(tmp_path / f"{t}.csv", index=False)
    cm = ColumnMap(ticker=None, date="trade_date", open="o", high="h", low="l", close="c", volume="vol",
                   amount="amount", volume_unit=100)  # fmt: skip
    md = read_bars(tmp_path, columns=cm)
    assert md.dates[0] == pd.Timestamp("2022-03-01")  # not 1970-01-01 00:00:00.020220301
    assert md.tickers == ["AAA", "BBB"]
    np.testing.assert_allclose(md.wide["volume"].to_numpy(), 1000.0)
    np.testing.assert_allclose(md.wide["vwap"].to_numpy(), md.wide["close"].to_numpy())
    assert md.has_vwap


def test_bars_adjustment_factor_and_prev_close(tmp_path: Path) -> None:
    # raw closes 10, 10.5, then a 2-for-1 split: 5.5, 5.6; factor steps 1 -> 2
    raw = [10.0, 10.5, 5.5, 5.6]
    f = pd.DataFrame({"ticker": "X", "date": pd.bdate_range("2022-01-03", periods=4), "open": raw,
                      "high": raw, "low": raw, "close": raw, "volume": 1.0, "adj": [1.0, 1.0, 2.0, 2.0],
                      "pre": [np.nan, 10.0, 5.25, 5.5]})  # fmt: skip
    f.to_csv(tmp_path / "x.csv", index=False)
    md = read_bars(tmp_path, columns=ColumnMap(factor="adj"))
    np.testing.assert_allclose(md.wide["close"]["X"], [10, 10.5, 11, 11.2])
    md = read_bars(tmp_path, columns=ColumnMap(prev_close="pre"))
    # factor = cumprod(close_{t-1} / pre_close_t) = 1, 1, 2, 2 -> the same adjusted series
    np.testing.assert_allclose(md.wide["close"]["X"], [10, 10.5, 11, 11.2])
    np.testing.assert_allclose(md.wide["factor"]["X"], [1, 1, 2, 2])


def test_bars_named_benchmark_sets_the_calendar(tmp_path: Path) -> None:
    df = bars(("AAA", "IDX"), n=6)
    df = df[~((df.ticker == "AAA") & (df.date == "2022-03-03"))]  # AAA suspended one day
    df.to_csv(tmp_path / "b.csv", index=False)
    md = read_bars(tmp_path, benchmark="IDX")
    assert md.tickers == ["AAA"] and len(md.dates) == 6 and md.bench_name == "IDX"
    assert not md.tradable["AAA"].iloc[2]
    with pytest.raises(ValueError, match="benchmark 'SPX' is not a ticker"):
        read_bars(tmp_path, benchmark="SPX")


def test_data_problem_messages_name_file_ticker_date(tmp_path: Path) -> None:
    df = bars()
    df.to_csv(tmp_path / "good.csv", index=False)
    df.drop(columns=["volume"]).to_csv(tmp_path / "zbad.csv", index=False)
    with pytest.raises(ValueError, match=r"file .*zbad\.csv lacks column\(s\) 'volume' \(volume\)"):
        read_bars(tmp_path)
    (tmp_path / "zbad.csv").unlink()
    df.iloc[:0].to_csv(tmp_path / "empty.csv", index=False)  # header only
    dup = df.iloc[[2]].copy()
    neg = df.iloc[[8]].copy()
    neg["close"] = -3.0
    pd.concat([dup, neg]).to_csv(tmp_path / "more.csv", index=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        md = read_bars(tmp_path)
    msgs = [str(x.message) for x in w if issubclass(x.category, DataWarning)]
    assert any("empty.csv has a header but no rows" in m for m in msgs), msgs
    assert any(
        "2 duplicated (ticker, date)" in m and "good.csv, ticker AAA, date 2022-03-03" in m for m in msgs
    ), msgs
    assert any("negative price" in m and "file more.csv, ticker BBB, date 2022-03-03" in m for m in msgs), (
        msgs
    )
    assert md.report["empty_files"] == 1 and md.report["duplicated_dates"] == 2
    assert md.report["negative_values"] == 1
    with pytest.raises(ValueError, match=r"unparseable date 'yesterday'"):
        bad = df.copy()
        bad.loc[0, "date"] = "yesterday"
        (tmp_path / "x").mkdir()
        bad.to_csv(tmp_path / "x" / "d.csv", index=False)
        read_bars(tmp_path / "x")


def write_user_folder(root: Path, n_tickers: int = 12, n_days: int = 320, seed: int = 0) -> None:
    """A user's folder of per-ticker files in another layout: code / trade_date (YYYYMMDD int) / vol."""
    rng = np.random.default_rng(seed)
    days = pd.bdate_range("2019-01-01", periods=n_days)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_tickers):
        c = 20 * np.exp(np.cumsum(rng.normal(0, 0.02, n_days)))
        pd.DataFrame({
            "code": f"T{i:02d}", "trade_date": days.strftime("%Y%m%d").astype(int), "Open": c * 0.999,
            "High": c * 1.01, "Low": c * 0.99, "Close": c, "vol": rng.integers(100, 1000, n_days),
        }).to_csv(root / f"T{i:02d}.csv", index=False)  # fmt: skip


def test_market_data_module_on_a_users_folder(tmp_path: Path) -> None:
    write_user_folder(tmp_path / "mine")
    dm = MarketDataModule(
        path=str(tmp_path / "mine"), source="bars",
        columns={"ticker": "code", "date": "trade_date", "open": "Open", "high": "High", "low": "Low",
                 "close": "Close", "volume": "vol", "volume_unit": 100},
        train=("2019-01-01", "2019-09-30"), valid=("2019-10-01", "2019-12-31"),
        test=("2020-01-01", "2020-03-31"),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="known after setup"):
        _ = dm.num_features
    dm.setup()
    assert dm.num_features == 157 and dm.x.shape == (320, 12, 157)
    assert dm.panel.bench_name == "equal_weight"
    # no train label uses a price of the valid segment
    last_train = dm.split.train.max()
    assert last_train < dm.split.valid.min() - 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape[1:] == (1, 157)


@pytest.mark.parametrize("scope", ["universe", "market"])
def test_learn_label_normalised_over_the_universe_or_the_market(tmp_path: Path, scope: str) -> None:
    """label_scope: the day's universe (qlib: the handler's instruments) or every tradable stock; the oracle
    ranks each day's raw labels by hand, with pandas, over the chosen stocks."""
    rng = np.random.default_rng(3)
    n_days, names = 160, [f"S{i:02d}" for i in range(10)]
    cal = pd.bdate_range("2020-01-01", periods=n_days)
    (tmp_path / "calendars").mkdir(parents=True)
    (tmp_path / "calendars" / "day.txt").write_text("\n".join(cal.strftime("%Y-%m-%d")) + "\n")
    (tmp_path / "instruments").mkdir()
    # the market "m": half the stocks are members throughout, the other half only in the first 5 days (they go
    # on trading, out of the index: in the data, not in the universe)
    members = names[:5]
    (tmp_path / "instruments" / "m.txt").write_text(
        "".join(f"{n}\t{cal[0]:%Y-%m-%d}\t{cal[-1 if n in members else 4]:%Y-%m-%d}\n" for n in names)
    )
    for n in names:
        c = 10 * np.exp(np.cumsum(rng.normal(0, 0.02, n_days)))
        for f, vals in (("open", c), ("high", c * 1.01), ("low", c * 0.99), ("close", c)):
            write_bin(tmp_path / "features" / n / f"{f}.day.bin", 0, vals)
        write_bin(tmp_path / "features" / n / "volume.day.bin", 0, np.full(n_days, 100.0))
    dm = MarketDataModule(
        path=str(tmp_path), source="qlib", market="m", label_norm="csrank", label_scope=scope,
        train=("2020-01-01", "2020-04-30"), valid=("2020-05-01", "2020-06-15"),
        test=("2020-06-16", "2020-12-31"), warmup_days=20,
    )  # fmt: skip
    dm.setup()
    day = int(dm.split.train[10])
    cols = [dm.panel.tickers.index(n) for n in (members if scope == "universe" else names)]
    raw = pd.Series(dm.y_raw[day, cols])
    want = (raw.rank(pct=True) - 0.5) * 3.46
    np.testing.assert_allclose(dm.y[day, cols], want.to_numpy(), rtol=1e-12)
    # training rows are the universe's in both scopes
    assert dm.present[day].sum() == len(members)
    x, y, _, idx = dm.flat(dm.split.train, train=True)
    assert set(np.asarray(dm.panel.tickers)[np.unique(idx[:, 1])]) == set(members)
    with pytest.raises(ValueError, match="label_scope must be"):
        MarketDataModule(path="x", label_scope="all", train=("a", "b"), valid=("a", "b"), test=("a", "b"))


def test_unparseable_date_names_the_1_based_data_row(tmp_path: Path) -> None:
    df = bars()
    df.loc[2, "date"] = "2022-13-45"  # the third data row: line 4 of the file
    df.to_csv(tmp_path / "d.csv", index=False)
    assert (tmp_path / "d.csv").read_text().splitlines()[3].split(",")[1] == "2022-13-45"
    want = r"d\.csv, column 'date': unparseable date '2022-13-45' \(data row 3, 1-based, header not counted\)"
    with pytest.raises(ValueError, match=want):
        read_bars(tmp_path)


def test_relative_data_path_not_found_names_both_places(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    dm = MarketDataModule(path="zx_barz", data_dir=str(tmp_path / "dd"), train=("a", "b"), valid=("a", "b"),
                          test=("a", "b"))  # fmt: skip
    want = (
        rf"bars: data path 'zx_barz' not found: looked for {tmp_path}/cwd/zx_barz \(relative to the current "
        rf"directory\) and {tmp_path}/dd/zx_barz \(under the data dir"
    )
    with pytest.raises(FileNotFoundError, match=want):
        dm.read()
    (tmp_path / "dd" / "zx_barz").mkdir(parents=True)  # found under the data dir
    assert dm.resolved_path() == tmp_path / "dd" / "zx_barz"


def test_nan_price_warns_and_report_counts_missing_bars_apart_from_zero_volume(tmp_path: Path) -> None:
    """6 days; AAA complete; BBB lists on day 1, NaN close on day 2, no bar on day 3, zero volume on day 4;
    CCC delists after day 3."""
    df = bars(("AAA", "BBB", "CCC"))
    days = sorted(df["date"].unique())
    b = df["ticker"] == "BBB"
    df.loc[b & (df["date"] == days[2]), "close"] = np.nan
    df.loc[b & (df["date"] == days[4]), "volume"] = 0.0
    drop = (b & df["date"].isin([days[0], days[3]])) | ((df["ticker"] == "CCC") & df["date"].isin(days[4:]))
    df[~drop].to_csv(tmp_path / "x.csv", index=False)
    want = (
        r"bars: 1 row\(s\) with a missing \(NaN\) price or volume set to NaN \(no trade that day\) "
        r"\(first: file x\.csv, ticker BBB, date 2022-03-03\)"
    )
    with pytest.warns(DataWarning, match=want):
        md = read_bars(tmp_path)
    rep = md.report
    assert rep["missing_values"] == 1
    assert rep["missing_bars_in_span"] == 2  # BBB days 2 (NaN close) and 3 (no bar)
    assert rep["zero_volume_days"] == 1  # BBB day 4
    assert rep["listed_after_start"] == 1 and rep["delisted_before_end"] == 1  # BBB, CCC
    assert rep["non_tradable_days"] == 1  # bars: the universe is the days with a bar
    assert not md.tradable.loc[pd.Timestamp(days[2]), "BBB"]


def test_close_only_benchmark_file(tmp_path: Path) -> None:
    df = bars()
    df.to_csv(tmp_path / "stocks.csv", index=False)
    days = sorted(df["date"].unique())
    idx = pd.DataFrame({"ticker": "IDX", "date": days, "close": 1000.0 + np.arange(6)})
    idx.to_csv(tmp_path / "idx.csv", index=False)
    md = read_bars(tmp_path, benchmark="IDX")
    np.testing.assert_allclose(md.bench.to_numpy(), 1000.0 + np.arange(6))
    assert md.tickers == ["AAA", "BBB"] and "missing_values" not in md.report
    # one file per ticker (ticker = file stem), with a factor column the index file lacks
    (tmp_path / "stem").mkdir()
    for t, g in df.assign(f=2.0).groupby("ticker"):
        g.drop(columns="ticker").to_csv(tmp_path / "stem" / f"{t}.csv", index=False)
    idx.drop(columns="ticker").to_csv(tmp_path / "stem" / "IDX.csv", index=False)
    md = read_bars(tmp_path / "stem", columns=ColumnMap(ticker=None, factor="f"), benchmark="IDX")
    np.testing.assert_allclose(md.bench.to_numpy(), 1000.0 + np.arange(6))
    np.testing.assert_allclose(md.wide["close"]["AAA"], 2 * df[df.ticker == "AAA"]["close"].to_numpy())
    # a stock file still needs every bar column
    df.drop(columns="open").to_csv(tmp_path / "stocks.csv", index=False)
    with pytest.raises(ValueError, match=r"stocks\.csv lacks column\(s\) 'open' \(open\)"):
        read_bars(tmp_path, benchmark="IDX")
