"""TopK-Dropout backtest on a hand-made 4-stock, 6-day example; metrics against closed forms and scipy; the
``moekit finance backtest`` command passes every option on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from apps.finance.backtest import format_summary, topk_dropout_backtest
from apps.finance.metrics import daily_ic, ic_summary, risk_analysis

DAYS = pd.bdate_range("2021-01-04", periods=6)
TK = ["A", "B", "C", "D"]


def example():
    # scores of signal day s are traded on day s+1
    scores = pd.DataFrame(
        [[4, 3, 2, 1], [1, 4, 3, 2], [1, 4, 3, 2], [0, 4, 1, 5], [0, 4, 1, 5]],
        index=DAYS[:5],
        columns=TK,
        dtype=float,
    )
    rets = pd.DataFrame(
        [
            [0, 0, 0, 0],
            [0, 0, 0, 0],
            [0.10, -0.05, 0.0, 0.0],
            [0.0, 0.02, -0.01, 0.0],
            [0.0, 0.0, 0.03, 0.0],
            [0.0, 0.01, -0.02, 0.04],
        ],
        index=DAYS,
        columns=TK,
        dtype=float,
    )
    bench = pd.Series([0.0, 0.001, 0.002, -0.001, 0.0, 0.003], index=DAYS)
    return scores, rets, bench


def test_hand_computed_example():
    scores, rets, bench = example()
    res = topk_dropout_backtest(
        scores,
        rets,
        bench,
        topk=2,
        n_drop=1,
        buy_cost=0.0005,
        sell_cost=0.0015,
        min_cost=0.0,
        risk_degree=0.95,
        account=1000.0,
    )
    rep = res.report
    assert list(rep.index) == list(DAYS[1:])  # first trade on the day after the first signal day
    # day 1: buy the top-2 of day 0 (A, B) with 0.95 * 1000 / 2 each, 5 bp cost
    per = 475.0
    a = b = per - per * 0.0005
    cash = 1000.0 - 2 * per
    v1 = cash + a + b
    # day 2: A +10 %, B -5 %; day-1 ranking B > C > A(held, bottom) -> sell A (15 bp), buy C
    a, b = a * 1.10, b * 0.95
    v1_pre = v1
    cash += a - a * 0.0015
    sell_cost2 = a * 0.0015
    per = cash * 0.95
    c = per - per * 0.0005
    cost2 = sell_cost2 + per * 0.0005
    cash -= per
    v2 = cash + b + c
    # day 3: B +2 %, C -1 %; same ranking, holdings are the top 2 -> no trade
    b, c = b * 1.02, c * 0.99
    v3 = cash + b + c
    # day 4: C +3 %; day-3 ranking D > B > C -> sell C, buy D
    c = c * 1.03
    sell = c
    cash += sell - sell * 0.0015
    per = cash * 0.95
    d = per - per * 0.0005
    cost4 = sell * 0.0015 + per * 0.0005
    cash -= per
    v4 = cash + b + d
    # day 5: B +1 %, D +4 %; same ranking as day 4 -> no trade
    b, d = b * 1.01, d * 1.04
    v5 = cash + b + d
    values = [v1, v2, v3, v4, v5]
    np.testing.assert_allclose(rep["value"].to_numpy(), values, rtol=1e-12)
    rets_exp = np.array(values) / np.array([1000.0, v1, v2, v3, v4]) - 1
    np.testing.assert_allclose(rep["return"].to_numpy(), rets_exp, rtol=1e-10)
    np.testing.assert_allclose(
        rep["cost"].to_numpy(), [475 * 0.0005 * 2 / 1000, cost2 / v1_pre, 0.0, cost4 / v3, 0.0]
    )
    np.testing.assert_allclose(rep["excess"].to_numpy(), rets_exp - bench.to_numpy()[1:])
    assert rep["n_held"].tolist() == [2, 2, 2, 2, 2]
    assert rep["turnover"].iloc[2] == 0.0 and rep["turnover"].iloc[4] == 0.0
    s = format_summary(res.summary)
    assert "mode=sum" in s and "N=252" in s


def test_min_cost_and_invariants():
    scores, rets, bench = example()
    res = topk_dropout_backtest(scores, rets, bench, topk=2, n_drop=1, min_cost=1.0, account=1000.0)
    np.testing.assert_allclose(
        res.report["cost"].iloc[0], 2.0 / 1000
    )  # two buys of 475 -> 0.24 each -> min 1
    # n_drop = topk: holdings after trading are exactly the top-k of the signal
    res = topk_dropout_backtest(scores, rets, bench, topk=2, n_drop=2, account=1000.0)
    assert (res.report["n_held"] <= 2).all()
    with pytest.raises(ValueError, match="n_drop"):
        topk_dropout_backtest(scores, rets, bench, topk=2, n_drop=3)


def test_ic_matches_scipy():
    rng = np.random.default_rng(0)
    rows = []
    for d in range(5):
        n = 30 + d
        s = rng.normal(size=n)
        y = 0.3 * s + rng.normal(size=n)
        y[rng.random(n) < 0.1] = np.nan
        rows.append(pd.DataFrame({"date": d, "score": s, "label": y}))
    f = pd.concat(rows)
    ic = daily_ic(f)
    for d, g in f.dropna().groupby("date"):
        assert ic.loc[d, "ic"] == pytest.approx(stats.pearsonr(g["score"], g["label"])[0], abs=1e-12)
        assert ic.loc[d, "rank_ic"] == pytest.approx(stats.spearmanr(g["score"], g["label"])[0], abs=1e-12)
    s = ic_summary(ic)
    assert s["ICIR"] == pytest.approx(ic["ic"].mean() / ic["ic"].std(ddof=1))
    # invariance: positive affine per day (IC) / monotone (RankIC)
    g = f.assign(score=np.exp(3 * f["score"]) + 5)
    np.testing.assert_allclose(daily_ic(g)["rank_ic"], ic["rank_ic"], atol=1e-12)


def test_risk_analysis_closed_forms():
    r = np.array([0.01, -0.02, 0.005, 0.0, 0.01])
    s = risk_analysis(r, mode="sum", days_per_year=252)
    assert s["AR"] == pytest.approx(252 * r.mean())
    assert s["IR"] == pytest.approx(r.mean() / r.std(ddof=1) * np.sqrt(252))
    assert s["MDD"] == pytest.approx(-0.02)
    assert risk_analysis(r, mode="sum", days_per_year=238)["AR"] == pytest.approx(238 * r.mean())
    c = risk_analysis(r, mode="compound", days_per_year=252)
    assert c["AR"] == pytest.approx(np.prod(1 + r) ** (252 / 5) - 1)
    assert c["MDD"] == pytest.approx(1.01 * 0.98 / 1.01 - 1)
    z = risk_analysis(np.zeros(10))
    assert z["AR"] == 0 and z["MDD"] == 0 and np.isnan(z["IR"])
    with pytest.raises(ValueError, match="mode"):
        risk_analysis(r, mode="product")


def test_backtest_command_parses_its_options(tmp_path, monkeypatch, capsys):
    """``moekit finance backtest`` (jsonargparse): every option reaches the backtest; outputs are written."""
    import apps.finance.backtest as bt

    scores, rets, bench = example()
    long = scores.stack().rename("score").reset_index().set_axis(["date", "ticker", "score"], axis=1)
    long["label"] = long["score"] * 0.01 + np.arange(len(long)) % 3 * 1e-3
    long["segment"] = np.where(long["date"] <= DAYS[1], "valid", "test")
    long.to_parquet(tmp_path / "preds.parquet")
    seen = {}

    def fake(preds, **kw):
        seen.update(kw, segments=sorted(preds["segment"].unique()))
        return topk_dropout_backtest(scores, rets, bench, **{k: kw[k] for k in ("topk", "n_drop", "mode")})

    monkeypatch.setattr(bt, "backtest_predictions", fake)
    bt.main([
        "--predictions", str(tmp_path / "preds.parquet"), "--segment", "valid", "--topk", "2",
        "--n_drop", "1", "--buy_cost", "0.001", "--sell_cost", "0.002", "--min_cost", "1.5",
        "--mode", "compound",
        "--days_per_year", "250", "--data_dir", "/data", "--out", str(tmp_path / "out"),
    ])  # fmt: skip
    assert seen == {
        "data_dir": "/data", "segment": "valid", "topk": 2, "n_drop": 1, "buy_cost": 0.001,
        "sell_cost": 0.002, "min_cost": 1.5, "mode": "compound", "days_per_year": 250,
        "segments": ["test", "valid"],
    }  # fmt: skip
    assert "mode=compound" in capsys.readouterr().out
    written = {p.name for p in (tmp_path / "out").iterdir()}
    assert written == {"report.csv", "summary.json", "excess.png", "daily_ic.png"}
    with pytest.raises(SystemExit):
        bt.main(["--predictions", "p.parquet", "--mode", "median"])


D5 = pd.bdate_range("2021-01-04", periods=5)


def _one_stock_example(a_returns: list[float]):
    """A always scores highest; topk 1, 5 bp sells, no buy cost, all cash invested (risk_degree 1)."""
    scores = pd.DataFrame({"A": 3.0, "B": 2.0, "C": 1.0}, index=D5[:4])
    rets = pd.DataFrame({"A": a_returns, "B": [0, 0, 0, 0, 0.05], "C": 0.0}, index=D5, dtype=float)
    kw = dict(topk=1, n_drop=1, buy_cost=0.0, sell_cost=0.0005, risk_degree=1.0, account=1000.0)
    return scores, rets, pd.Series(0.0, index=D5), kw


def test_delisted_holding_is_sold_at_its_last_close_and_replaced():
    """A trades for the last time on day 2 (+10 %): on day 3 it is sold at 1100 less 5 bp, B is bought."""
    from apps.finance.sources import DataWarning

    scores, rets, bench, kw = _one_stock_example([0, 0, 0.10, np.nan, np.nan])
    want = r"1 held stock\(s\) delisted.*A \(last trade 2021-01-06, closed 2021-01-07\)"
    with pytest.warns(DataWarning, match=want):
        res = topk_dropout_backtest(scores, rets, bench, **kw)
    rep = res.report
    cash3 = 1100.0 - 1100.0 * 0.0005  # the delisted position, sold at its last close
    np.testing.assert_allclose(rep["value"].to_numpy(), [1000.0, 1100.0, cash3, cash3 * 1.05])
    np.testing.assert_allclose(rep.loc[D5[3], "cost"], 1100.0 * 0.0005 / 1100.0)
    np.testing.assert_allclose(rep.loc[D5[3], "turnover"], (1100.0 + cash3) / (2 * 1100.0))
    assert rep["n_held"].tolist() == [1, 1, 1, 1] and res.summary["delisted_closed"] == 1


def test_suspended_holding_stays_held_until_trading_resumes():
    """A has no bar on day 3 but trades again on day 4: held (not sold), the whole move earned on day 4;
    ``last_trade`` on a longer calendar keeps a stock whose bars resume after the cut."""
    import warnings

    from apps.finance.sources import DataWarning

    scores, rets, bench, kw = _one_stock_example([0, 0, 0.10, np.nan, 0.20])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        rep = topk_dropout_backtest(scores, rets, bench, **kw).report
        np.testing.assert_allclose(rep["value"].to_numpy(), [1000.0, 1100.0, 1100.0, 1320.0])
        assert rep["turnover"].iloc[1:].tolist() == [0.0, 0.0, 0.0]
        scores, rets, bench, kw = _one_stock_example([0, 0, 0.10, np.nan, np.nan])
        later = pd.Series(pd.Timestamp("2021-02-01"), index=["A", "B", "C"])
        rep = topk_dropout_backtest(scores, rets, bench, last_trade=later, **kw).report
    np.testing.assert_allclose(rep["value"].to_numpy(), [1000.0, 1100.0, 1100.0, 1100.0])


def test_unsellable_holding_does_not_block_the_other_replacements():
    """Held A is suspended and unscored on day 2, held B is the lowest scored: B is sold and C bought (A takes
    no bottom slot); without that rule nothing trades and C's +20 % on day 3 is missed."""
    scores = pd.DataFrame({"A": [3.0, np.nan, 3.0], "B": [2.0, 1.0, 1.0], "C": [1.0, 2.0, 2.0]}, index=D5[:3])
    rets = pd.DataFrame(
        {"A": [0, 0, np.nan, 0.10], "B": [0, 0, 0, 0], "C": [0, 0, 0, 0.20]}, index=D5[:4], dtype=float
    )
    res = topk_dropout_backtest(
        scores, rets, pd.Series(0.0, index=D5[:4]), topk=2, n_drop=1, buy_cost=0.0, sell_cost=0.0,
        risk_degree=1.0, account=1000.0,
    )  # fmt: skip
    rep = res.report
    np.testing.assert_allclose(rep["turnover"].to_numpy(), [0.5, 0.5, 0.0])  # day 2: sell B 500, buy C 500
    np.testing.assert_allclose(rep["value"].to_numpy(), [1000.0, 1000.0, 550.0 + 600.0])
    assert rep["n_held"].tolist() == [2, 2, 2]


def test_topk_at_least_the_scored_universe_warns_once():
    import warnings

    scores, rets, bench = example()
    scores.iloc[2, 0] = np.nan  # 3 stocks scored on 2021-01-06
    with pytest.warns(UserWarning, match=r"topk=3 >= the number of stocks scored on 1 of 5 signal day\(s\) "
                      r"\(smallest universe: 3 stocks on 2021-01-06\)") as rec:  # fmt: skip
        topk_dropout_backtest(scores, rets, bench, topk=3, n_drop=1)
    assert sum("topk=" in str(w.message) for w in rec) == 1
    with pytest.warns(UserWarning, match=r"topk=4 .* on 5 of 5 signal day\(s\) \(smallest universe: 3 "):
        topk_dropout_backtest(scores, rets, bench, topk=4, n_drop=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        topk_dropout_backtest(scores, rets, bench, topk=2, n_drop=1)


def test_predictions_of_another_market_name_the_panel_and_suggest_the_config(tmp_path, monkeypatch):
    """Without a fit config the shipped S&P 500 panel is used: predictions of another market say so."""
    import apps.finance.data as fd
    from apps.finance.backtest import backtest_predictions

    days = pd.bdate_range("2013-02-08", periods=6)
    panel = pd.DataFrame(
        [{"date": d, "ticker": t, "open": 10.0, "high": 10.0, "low": 10.0, "close": 10.0 + i, "volume": 1e6}
         for i, d in enumerate(days) for t in ("AAPL", "MSFT")]
    )  # fmt: skip
    monkeypatch.setattr(fd, "load_sp500_panel", lambda data_dir=None: panel)
    monkeypatch.setattr(fd, "load_index", lambda data_dir=None: pd.Series(1.0 + np.arange(6), index=days))
    preds = pd.DataFrame({"date": pd.bdate_range("2022-07-01", periods=3), "ticker": "ZX001", "score": 1.0})
    msg = (
        r"no \(ticker, date\) of the 3 predictions \(tickers e.g. \['ZX001'\], "
        r"dates 2022-07-01..2022-07-05\) "
        r"matches the returns panel used: the shipped S&P 500 panel "
        + str(tmp_path)
        + r"/sp500_5yr/individual_stocks_5yr \(2 tickers, 2013-02-08..2013-02-15; .*--config <the fit config>"
    )
    with pytest.raises(ValueError, match=msg):
        backtest_predictions(preds, data_dir=str(tmp_path), segment=None, topk=1, n_drop=1)
    ok = preds.assign(ticker="AAPL", date=days[:3])  # on the panel: runs (trades on the 2 days after)
    res = backtest_predictions(ok, data_dir=str(tmp_path), segment=None, topk=1, n_drop=1)
    assert list(res.report.index) == list(days[1:3])


def test_market_backtest_takes_delistings_from_the_whole_calendar(tmp_path):
    """Bars: BBB (top score) has no bar on days 4-5, the predictions' last days, but trades again on day 6:
    kept (value flat on days 4-5); CCC's bars end on day 3 for good: with CCC on top it is sold on day 4."""
    import warnings

    from apps.finance.backtest import backtest_market
    from apps.finance.sources import DataWarning, read_bars

    days = pd.bdate_range("2022-03-01", periods=8)
    rows = [
        {"ticker": t, "date": d, "open": 10.0, "high": 10.0, "low": 10.0, "close": 10.0 + i, "volume": 1e3}
        for t in ("AAA", "BBB", "CCC")
        for i, d in enumerate(days)
        if not (t == "BBB" and i in (4, 5)) and not (t == "CCC" and i > 3)
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "bars.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        md = read_bars(tmp_path)

    def preds(top: str) -> pd.DataFrame:
        return pd.DataFrame(
            [
                {"date": d, "ticker": t, "score": 2.0 if t == top else 1.0}
                for d in days[:6]
                for t in ("AAA", top)
            ]
        )

    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        rep = backtest_market(preds("BBB"), md, topk=1, n_drop=1, account=1000.0).report
    assert rep["n_held"].tolist() == [1] * 5 and rep["turnover"].iloc[3:].tolist() == [0.0, 0.0]
    with pytest.warns(DataWarning, match=r"CCC \(last trade 2022-03-04, closed 2022-03-07\)"):
        rep = backtest_market(preds("CCC"), md, topk=1, n_drop=1, account=1000.0).report
    assert rep.loc[days[4], "turnover"] > 0.9  # CCC sold, AAA bought
