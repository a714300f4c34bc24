"""Market rules of the backtest (issue 16), one test per rule on a hand-built panel: limit-up buys and
limit-down sells refused (China's limits by board, period and ST), suspended stocks not traded, minimum
listing age, whole lots, minimum commission; presets and qlib's metric names."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.finance.backtest import (
    cn_board,
    cn_limit_pct,
    listing_age,
    market_rules,
    topk_dropout_backtest,
    trade_masks,
)

DAYS = pd.bdate_range("2021-03-01", periods=4)
TK = ["SH600000", "SZ300750", "SH688001", "SZ000001"]


def panel(r1: list[float]) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Scores on day 0 rank the stocks in TK order; returns into day 1 are ``r1``."""
    scores = pd.DataFrame([[4.0, 3.0, 2.0, 1.0]] * 3, index=DAYS[:3], columns=TK)
    rets = pd.DataFrame(0.0, index=DAYS, columns=TK)
    rets.iloc[1] = r1
    return scores, rets, pd.Series(0.0, index=DAYS)


def bought_on_day1(rets: pd.DataFrame, rules: str = "cn", topk: int = 2, **kw) -> set[str]:  # noqa: ANN003
    scores = pd.DataFrame([[4.0, 3.0, 2.0, 1.0]] * 3, index=DAYS[:3], columns=TK)
    rl = market_rules(rules)
    can_buy, can_sell = trade_masks(rets, rl)
    res = topk_dropout_backtest(scores, rets, pd.Series(0.0, index=DAYS), topk=topk, n_drop=1,
                                can_buy=can_buy, can_sell=can_sell, account=1e6, **kw)  # fmt: skip
    return res


def test_presets_and_qlib_costs():
    cn, us = market_rules("cn"), market_rules("us")
    assert (cn.buy_cost, cn.sell_cost, cn.min_cost, cn.lot_size, cn.limit) == (0.0005, 0.0015, 5.0, 100, "cn")
    assert (us.limit, us.lot_size, us.min_cost) == ("none", 1, 0.0)
    assert market_rules("cn", lot_size=1).lot_size == 1 and market_rules("cn", lot_size=None).lot_size == 100
    with pytest.raises(ValueError, match="preset"):
        market_rules("jp")


def test_cn_limits_by_board_period_and_st():
    assert [cn_board(t) for t in ("SH600000", "300750.SZ", "sh688001", "SZ301001", "BJ830799")] == [
        "main", "chinext", "star", "chinext", "bj"]  # fmt: skip
    dates = pd.DatetimeIndex(["2020-08-21", "2020-08-24"])
    st = pd.DataFrame([[True, False, False, True]] * 2, index=dates, columns=TK)
    lim = cn_limit_pct(dates, TK, st)
    # main 10 % (ST 5 %), ChiNext 10 % before the 2020-08-24 reform then 20 %, STAR 20 %
    np.testing.assert_allclose(lim.to_numpy(), [[0.05, 0.10, 0.20, 0.05], [0.05, 0.20, 0.20, 0.05]])


def test_no_buy_at_limit_up_close():
    # day 1: SH600000 +10 % (limit up: refused), SZ300750 +10 % in 2021 (ChiNext limit 20 %: allowed)
    _, rets, _ = panel([0.10, 0.10, 0.0, 0.0])
    res = bought_on_day1(rets, topk=2)
    assert res.report["n_held"].iloc[0] == 2
    can_buy, _ = trade_masks(rets, market_rules("cn"))
    assert not can_buy.iloc[1, 0] and can_buy.iloc[1, 1]
    # the same panel under the us preset buys the limit-up stock
    can_buy_us, _ = trade_masks(rets, market_rules("us"))
    assert can_buy_us.iloc[1].all()
    # held: the top-2 buyable by score = SZ300750 and SH688001 (SH600000 skipped)
    scores = pd.DataFrame([[4.0, 3.0, 2.0, 1.0]] * 3, index=DAYS[:3], columns=TK)
    rets2 = rets.copy()
    rets2.iloc[2] = [0.0, 0.05, -0.05, 0.0]
    cb, cs = trade_masks(rets2, market_rules("cn"))
    r = topk_dropout_backtest(
        scores, rets2, pd.Series(0.0, index=DAYS), topk=2, n_drop=1, can_buy=cb, can_sell=cs
    )
    # value after day 2: half in each of SZ300750 (+5 %) and SH688001 (-5 %) -> day-2 return ~0
    assert r.report["return"].iloc[1] == pytest.approx(0.0, abs=3e-3)  # up to the day-2 rotation costs
    r_us = topk_dropout_backtest(scores, rets2, pd.Series(0.0, index=DAYS), topk=2, n_drop=1)
    assert r_us.report["return"].iloc[1] > 0.01  # us: held SH600000 (0 %) and SZ300750 (+5 %)


def test_no_sell_at_limit_down_close():
    scores = pd.DataFrame([[4.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 4.0], [1.0, 3.0, 2.0, 4.0]],
                          index=DAYS[:3], columns=TK)  # fmt: skip
    rets = pd.DataFrame(0.0, index=DAYS, columns=TK)
    rets.iloc[2, 0] = -0.10  # day 2: SH600000 (to be sold) closes limit-down
    rets.iloc[3, 0] = 0.10  # day 3: it rebounds, earned only if it was kept on day 2
    cb, cs = trade_masks(rets, market_rules("cn"))
    assert not cs.iloc[2, 0] and cs.iloc[3, 0]
    day3 = []
    for can_sell in (cs, None):
        r = topk_dropout_backtest(scores, rets, pd.Series(0.0, index=DAYS), topk=2, n_drop=1, can_buy=cb,
                                  can_sell=can_sell, account=1e6)  # fmt: skip
        assert r.report["turnover"].iloc[1] > 0  # day 2 rotates one name either way
        day3.append(r.report["return"].iloc[2])
    # refused sell: SH600000 is kept (the unsellable name takes no bottom slot, so SZ300750 is the one
    # rotated out for SZ000001) and earns its +10 % on day 3; without the rule it is sold on day 2
    assert day3[0] > 0.04 and day3[1] == 0.0


def test_suspended_stock_not_traded():
    _, rets, _ = panel([np.nan, 0.0, 0.0, 0.0])  # SH600000 suspended on day 1 (no bar)
    cb, cs = trade_masks(rets, market_rules("us"))
    assert not cb.iloc[1, 0] and not cs.iloc[1, 0]
    scores = pd.DataFrame([[4.0, 3.0, 2.0, 1.0]] * 3, index=DAYS[:3], columns=TK)
    r = topk_dropout_backtest(scores, rets, pd.Series(0.0, index=DAYS), topk=1, n_drop=1, can_buy=cb,
                              can_sell=cs, account=1e6)  # fmt: skip
    assert r.report["n_held"].iloc[0] == 1  # bought SZ300750, not the suspended top stock


def test_min_listing_age():
    trad = pd.DataFrame(True, index=pd.bdate_range("2021-01-04", periods=70), columns=["OLD", "NEW"])
    trad.iloc[:10, 1] = False  # NEW lists on day 10
    age = listing_age(trad)
    assert age["NEW"].iloc[10] == 0 and age["NEW"].iloc[69] == 59 and age["OLD"].iloc[0] >= 60
    rets = trad.astype(float).where(trad) * 0.0
    cb, _ = trade_masks(rets, market_rules("cn", limit="none"), listing_age=age)
    assert not cb["NEW"].iloc[69] and cb["OLD"].iloc[0]
    cb, _ = trade_masks(rets, market_rules("cn", limit="none", min_listing_days=50), listing_age=age)
    assert cb["NEW"].iloc[60] and not cb["NEW"].iloc[59]


def test_lot_size_and_min_commission():
    scores = pd.DataFrame([[2.0, 1.0]], index=DAYS[:1], columns=["A", "B"])
    rets = pd.DataFrame(0.0, index=DAYS[:2], columns=["A", "B"])
    raw = pd.DataFrame([[33.0, 7.0]] * 2, index=DAYS[:2], columns=["A", "B"])
    bench = pd.Series(0.0, index=DAYS[:2])
    r = topk_dropout_backtest(scores, rets, bench, topk=2, n_drop=1, account=10_000.0, lot_size=100,
                              raw_close=raw, buy_cost=0.0005, min_cost=5.0)  # fmt: skip
    # 0.95 * 10000 / 2 = 4750 per stock: A 1 lot of 100 x 33 = 3300, B 6 lots = 4200; each cost max(., 5) = 5
    assert r.report["cost"].iloc[0] == pytest.approx(10.0 / 10_000)
    assert r.report["turnover"].iloc[0] == pytest.approx((3300 + 4200) / 20_000)
    assert r.report["value"].iloc[0] == pytest.approx(10_000 - 10)
    with pytest.raises(ValueError, match="raw_close"):
        topk_dropout_backtest(scores, rets, bench, topk=2, n_drop=1, lot_size=100)
    s = r.summary
    assert s["annualized_return"] == s["excess_return_with_cost"]["AR"]
    assert s["information_ratio"] == s["excess_return_with_cost"]["IR"] or np.isnan(s["information_ratio"])
    assert s["max_drawdown"] == s["excess_return_with_cost"]["MDD"]
