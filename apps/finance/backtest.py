"""TopK-Dropout backtest (qlib ``contrib/strategy/signal_strategy.py``, qlib: arXiv 2009.11189).

Timing (qlib, docs/finance.md §3, §6): on trading day t the strategy uses the scores predicted for the
previous trading day, trades at the close of t, and the position earns ``close[t+1]/close[t] - 1``,
the label of the signal day. Costs per order ``max(value * rate, min_cost)``: buys ``buy_cost``, sells
``sell_cost``.
Market rules (:class:`MarketRules`, presets ``us`` and ``cn``, each field configurable): no buying a stock
that closes at its limit-up nor selling one at its limit-down (China: 10 % main board, 20 % ChiNext from
2020-08-24 and STAR, 30 % Beijing, 5 % ST where the data has an ST flag; qlib's ``limit_threshold`` 9.5 %
reading = limit minus ``limit_tolerance``), no trading a suspended stock (no trade that day), a minimum
listing age before a first buy, buys in whole lots (raw price = adjusted close / factor), a minimum
commission per order. Not modelled: market impact, partial fills, intraday prices.

Daily accounting: ``value_t`` = cash + positions at the close of t after trading; ``return_t`` =
``value_t / value_{t-1} - 1`` (net of costs); ``cost_t`` = costs / ``value_{t-1}``; excess = return − bench.

CLI: ``python -m apps.finance.backtest --predictions preds.parquet [--segment test] [--topk 50 --n_drop 5]``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from apps.finance.metrics import risk_analysis

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MarketRules:
    """Trading rules of one market (each overridable; presets :data:`PRESETS` ``us`` and ``cn``).

    Args:
        buy_cost, sell_cost: cost rates of buys and sells (qlib: open 5 bp, close 15 bp).
        min_cost: minimum cost per order (account currency; qlib: 5).
        limit: ``none``; ``cn`` (board/period/ST limits, :func:`cn_limit_pct`); ``fixed`` (``limit_pct``).
        limit_pct: the limit of ``fixed``.
        limit_tolerance: a close is "at the limit" when its return is within this of the limit (qlib's
            ``limit_threshold=0.095`` for a 10 % limit).
        lot_size: shares per lot; buys are rounded down to whole lots at the raw price.
        min_listing_days: trading days since the first trade before a stock may be bought.
        days_per_year: annualisation of the summary.
    """

    buy_cost: float = 0.0005
    sell_cost: float = 0.0005
    min_cost: float = 0.0
    limit: Literal["none", "cn", "fixed"] = "none"
    limit_pct: float = 0.10
    limit_tolerance: float = 0.005
    lot_size: int = 1
    min_listing_days: int = 0
    days_per_year: int = 252


PRESETS: dict[str, MarketRules] = {
    "us": MarketRules(),
    "cn": MarketRules(
        buy_cost=0.0005,
        sell_cost=0.0015,
        min_cost=5.0,
        limit="cn",
        lot_size=100,
        min_listing_days=60,
        days_per_year=238,
    ),
}


def market_rules(preset: str | MarketRules = "us", **overrides) -> MarketRules:
    """A preset (``us``, ``cn``) with any field overridden."""
    base = preset if isinstance(preset, MarketRules) else PRESETS.get(preset)
    if base is None:
        raise ValueError(f"rules preset must be one of {sorted(PRESETS)}, got {preset!r}")
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


CHINEXT_REFORM = pd.Timestamp("2020-08-24")  # ChiNext registration reform: 10 % -> 20 %


def cn_board(ticker: str) -> str:
    """``main``, ``chinext``, ``star`` or ``bj`` from a China A-share code (``SZ300750``, ``688001.SH``)."""
    m = re.search(r"(\d{6})", str(ticker))
    if not m:
        return "main"
    code = m.group(1)
    if code.startswith("688") or code.startswith("689"):
        return "star"
    if code.startswith(("300", "301")):
        return "chinext"
    if code[0] in "48" or code.startswith("92"):
        return "bj"
    return "main"


def cn_limit_pct(dates: pd.DatetimeIndex, tickers: list[str], st: pd.DataFrame | None = None) -> pd.DataFrame:
    """China's daily price limit of each (day, ticker): 10 % main board, 20 % STAR, 20 % ChiNext on/after
    2020-08-24 (10 % before), 30 % Beijing; 5 % for main-board ST stocks where ``st`` (bool, same shape) says.
    """
    out = np.full((len(dates), len(tickers)), 0.10)
    after = np.asarray(dates >= CHINEXT_REFORM)
    for j, t in enumerate(tickers):
        b = cn_board(t)
        if b == "star":
            out[:, j] = 0.20
        elif b == "chinext":
            out[after, j] = 0.20
        elif b == "bj":
            out[:, j] = 0.30
    if st is not None:
        s = st.reindex(index=dates, columns=tickers).fillna(0).to_numpy().astype(bool)
        main = np.array([cn_board(t) == "main" for t in tickers])
        out = np.where(s & main[None, :], 0.05, out)
    return pd.DataFrame(out, index=dates, columns=tickers)


def trade_masks(
    returns: pd.DataFrame,
    rules: MarketRules,
    *,
    listing_age: pd.DataFrame | None = None,
    st: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Which (day, ticker) may be bought / sold at that day's close under ``rules``.

    Args:
        returns: ``(days, tickers)`` return into each day from the previous tradable close; NaN = no trade
            that day (suspended / no bar).
        rules: the market rules.
        listing_age: ``(days, tickers)`` trading days since the first trade (None: no listing rule).
        st: ``(days, tickers)`` ST flag (China 5 % limit).

    Returns:
        ``can_buy``, ``can_sell``: bool ``(days, tickers)``.
    """
    tradable = returns.notna()
    can_buy, can_sell = tradable.copy(), tradable.copy()
    if rules.limit != "none":
        if rules.limit == "cn":
            lim = cn_limit_pct(returns.index, list(returns.columns), st).to_numpy()
        elif rules.limit == "fixed":
            lim = np.full(returns.shape, rules.limit_pct)
        else:
            raise ValueError(f"limit must be none, cn or fixed, got {rules.limit!r}")
        r = returns.to_numpy()
        with np.errstate(invalid="ignore"):
            up = r >= lim - rules.limit_tolerance
            down = r <= -(lim - rules.limit_tolerance)
        can_buy &= ~up
        can_sell &= ~down
    if rules.min_listing_days > 0 and listing_age is not None:
        can_buy &= listing_age.reindex_like(returns).fillna(0) >= rules.min_listing_days
    return can_buy, can_sell


def listing_age(tradable: pd.DataFrame) -> pd.DataFrame:
    """Trading days since each ticker's first trade ``(days, tickers)``; a ticker trading on the calendar's
    first day is taken as listed before the data starts (age counted from a full ``len(calendar)``)."""
    ok = tradable.to_numpy()
    T = len(ok)
    first = np.where(ok.any(0), ok.argmax(0), T)  # (tickers,)
    age = np.arange(T)[:, None] - first[None, :]
    age = np.where(first[None, :] == 0, age + T, age).astype(np.float64)
    return pd.DataFrame(np.where(age >= 0, age, -1.0), index=tradable.index, columns=tradable.columns)


@dataclass
class BacktestResult:
    """Daily report (``return, bench, cost, excess, turnover, value``) and summary metrics."""

    report: pd.DataFrame
    summary: dict


def topk_dropout_backtest(
    scores: pd.DataFrame,
    returns: pd.DataFrame,
    bench: pd.Series,
    *,
    topk: int = 50,
    n_drop: int = 5,
    buy_cost: float = 0.0005,
    sell_cost: float = 0.0015,
    min_cost: float = 0.0,
    risk_degree: float = 0.95,
    account: float = 1e8,
    mode: Literal["sum", "compound"] = "sum",
    days_per_year: int = 252,
    can_buy: pd.DataFrame | None = None,
    can_sell: pd.DataFrame | None = None,
    lot_size: int = 1,
    raw_close: pd.DataFrame | None = None,
    last_trade: pd.Series | None = None,
) -> BacktestResult:
    """Run TopK-Dropout.

    Untradable and delisted holdings (docs/finance.md §6-7). qlib's ``TopkDropoutStrategy`` (default
    ``only_tradable=False``) picks the bottom ``n_drop`` of the held-plus-candidate list without looking at
    tradability, skips the untradable ones at order time, and buys ``len(sell) + topk - len(last)`` names
    anyway (holding more than topk); with ``only_tradable=True`` it picks the bottom ``n_drop`` among
    tradable names only. Its account keeps a stock with no price (suspended or delisted) at its last price
    for ever (``Account.update_current_position`` skips suspended stocks). moekit's reading:

    * sells take the ``only_tradable=True`` reading: a holding that cannot be sold today (suspended, at its
      limit-down, held under a day) is left out of the bottom-``n_drop`` choice, so it neither is sold nor
      blocks the replacement of the sellable names below it; buys fill up to ``topk`` holdings, never more.
    * a holding whose ticker has no trade on any later day of the calendar (delisted; ``last_trade``) is
      closed at its last close (the value it is marked at), with the usual sell cost, on the first trading
      day after its last trade, and one :class:`~apps.finance.sources.DataWarning` names the ticker(s) and
      date(s). A suspended stock whose trading resumes later stays held (not sellable, marked at its last
      close) as before.

    Args:
        scores: wide ``(signal days, tickers)`` scores (NaN = no score); row t is used to trade on the next
            trading day of ``returns``' index.
        returns: wide ``(days, tickers)`` close-to-close return into each day (NaN = not tradable that day).
        bench: benchmark daily return on the same days.
        topk, n_drop: portfolio size and maximum replacements per day.
        buy_cost, sell_cost, min_cost: cost rates and the minimum cost per order (account currency).
        risk_degree: fraction of available cash invested on buys (qlib default 0.95).
        account: initial cash.
        mode, days_per_year: accumulation and annualisation of the summary (echoed in the result).
        can_buy, can_sell: bool ``(days, tickers)`` from :func:`trade_masks` (default: any stock with a
            return that day).
        lot_size: buys are whole lots of this many shares at ``raw_close`` (default: the adjusted close).
        raw_close: ``(days, tickers)`` raw (unadjusted) close for the lot rounding.
        last_trade: ticker -> date of its last trade on the market's whole calendar (NaT = never traded);
            a holding is delisted after that date. Default: the last day with a return in ``returns``
            (pass it when ``returns`` is cut from a longer calendar, so that a stock trading again after
            the cut is not taken as delisted).

    Returns:
        :class:`BacktestResult`; the report covers the trading days after the first signal day.
    """
    if not 0 < n_drop <= topk:
        raise ValueError(f"need 0 < n_drop <= topk, got n_drop={n_drop}, topk={topk}")
    if lot_size > 1 and raw_close is None:
        raise ValueError("lot_size > 1 needs raw_close (the raw price that lots are counted at)")
    days = returns.index
    sig_days = [d for d in scores.index if d in days]
    if not sig_days:
        raise ValueError("backtest: no score date is on the returns calendar")
    # numpy views aligned to the returns' columns: one row per day, one column per ticker
    cols = returns.columns
    R = returns.to_numpy(dtype=np.float64)  # (days, N)
    ok = ~np.isnan(R)  # tradable
    CB = ok if can_buy is None else can_buy.reindex(index=days, columns=cols).fillna(False).to_numpy(bool)
    CS = ok if can_sell is None else can_sell.reindex(index=days, columns=cols).fillna(False).to_numpy(bool)
    RC = None if raw_close is None else raw_close.reindex(index=days, columns=cols).to_numpy(np.float64)
    S = scores.reindex(columns=cols)
    srow = {d: i for i, d in enumerate(S.index)}
    S = S.to_numpy(dtype=np.float64)  # (signal days, N)
    B = bench.reindex(days).fillna(0.0).to_numpy(np.float64) if len(bench) else np.zeros(len(days))
    pos_of = {d: i for i, d in enumerate(days)}
    # last_pos[j]: index in ``days`` of ticker j's last trade; a holding is delisted on days after it
    if last_trade is None:
        any_ok = ok.any(0)
        last_pos = np.where(any_ok, len(days) - 1 - ok[::-1].argmax(0), -1)  # (N,)
    else:
        lt = pd.to_datetime(last_trade.reindex(cols))
        last_pos = np.where(lt.isna(), -1, days.searchsorted(lt.fillna(days[0]).to_numpy(), side="right") - 1)
    delisted: list[tuple[str, pd.Timestamp, pd.Timestamp]] = []  # (ticker, last trade, closed on)
    n_sig, small_days, smallest = 0, 0, (np.inf, None)  # signal days used; those with <= topk scored
    cash, hold = float(account), {}  # column -> position value at the last close (insertion-ordered)
    held_days: dict[int, int] = {}
    rows = []
    start = pos_of[sig_days[0]] + 1
    for ti in range(start, len(days)):
        prev = days[ti - 1]
        value_prev = cash + sum(hold.values())
        r = R[ti]
        for j in hold:  # mark to market at today's close
            if ok[ti, j]:
                hold[j] *= 1.0 + r[j]
        cost = traded = 0.0
        for j in [j for j in hold if ti > last_pos[j]]:  # delisted: closed at the last close it is marked at
            v = hold.pop(j)
            held_days.pop(j, None)
            c = max(v * sell_cost, min_cost) if v > 0 else 0.0
            cash += v - c
            cost, traded = cost + c, traded + v
            delisted.append((str(cols[j]), days[last_pos[j]] if last_pos[j] >= 0 else None, days[ti]))
        si = srow.get(prev)
        if si is not None:
            s = S[si]  # (N,)
            n_scored = int(np.isfinite(s).sum())
            n_sig += 1
            if topk >= n_scored:
                small_days += 1
                if n_scored < smallest[0]:
                    smallest = (n_scored, prev)
            held = np.zeros(len(cols), bool)
            held[list(hold)] = True
            valid = ~np.isnan(s) & (ok[ti] | held)
            idx = np.flatnonzero(valid)
            order = idx[np.argsort(-s[idx], kind="stable")]  # by score, column order on ties

            def key(j: int, s: np.ndarray = s, valid: np.ndarray = valid) -> float:
                return -s[j] if valid[j] else np.inf  # unscored holdings last

            last = sorted(hold, key=key)
            cand = order[~held[order] & CB[ti, order]]
            today = [int(j) for j in cand[: max(n_drop + topk - len(last), 0)]]
            comb = sorted(last + today, key=key)
            # the bottom n_drop among the names that could change hands today (qlib's only_tradable reading):
            # an unsellable holding takes no slot, so it cannot block the sellable ones below it
            pool = [j for j in comb if j not in hold or (CS[ti, j] and held_days.get(j, 0) >= 1)]
            bottom = set(pool[-n_drop:]) if pool else set()
            sell = [j for j in last if j in bottom]
            buy = today[: len(sell) + topk - len(last)]
            for j in sell:
                v = hold.pop(j)
                held_days.pop(j, None)
                c = max(v * sell_cost, min_cost) if v > 0 else 0.0
                cash += v - c
                cost, traded = cost + c, traded + v
            if buy:
                per = cash * risk_degree / len(buy)
                for j in buy:
                    val = per
                    if RC is not None:
                        px = RC[ti, j]
                        if not np.isfinite(px) or px <= 0:
                            continue
                        val = np.floor(per / (px * lot_size)) * px * lot_size  # whole lots only
                    c = max(val * buy_cost, min_cost)
                    if val <= 0 or val - c <= 0:
                        continue
                    cash -= val
                    hold[j] = val - c  # cost paid out of the order value (qlib deducts trade_val + cost)
                    cost, traded = cost + c, traded + val
        for j in hold:
            held_days[j] = held_days.get(j, 0) + 1
        value = cash + sum(hold.values())
        rows.append(
            {
                "date": days[ti],
                "return": value / value_prev - 1,
                "bench": float(B[ti]),
                "cost": cost / value_prev,
                "turnover": traded / (2 * value_prev),
                "value": value,
                "n_held": len(hold),
            }
        )
    if delisted:
        from apps.finance.sources import DataWarning

        what = ", ".join(
            f"{t} (last trade {a.date() if a is not None else 'none'}, closed {b.date()})"
            for t, a, b in delisted
        )
        warnings.warn(
            f"backtest: {len(delisted)} held stock(s) delisted (no trade on any later day of the calendar), "
            f"sold at their last close with the sell cost: {what}",
            DataWarning,
            stacklevel=2,
        )
    if small_days:
        warnings.warn(
            f"backtest: topk={topk} >= the number of stocks scored on {small_days} of {n_sig} signal "
            f"day(s) (smallest universe: {smallest[0]} stocks on {smallest[1].date()}); the portfolio holds "
            "(nearly) every scored stock there: lower --topk",
            UserWarning,
            stacklevel=2,
        )
    rep = pd.DataFrame(rows).set_index("date")
    rep["excess"] = rep["return"] - rep["bench"]
    ex = risk_analysis(rep["excess"], mode=mode, days_per_year=days_per_year)
    summary = {
        # qlib's names (``risk_analysis`` of the excess return with cost)
        "annualized_return": ex["AR"],
        "information_ratio": ex["IR"],
        "max_drawdown": ex["MDD"],
        "excess_return_with_cost": risk_analysis(rep["excess"], mode=mode, days_per_year=days_per_year),
        "excess_return_without_cost": risk_analysis(
            rep["excess"] + rep["cost"], mode=mode, days_per_year=days_per_year
        ),
        "return": risk_analysis(rep["return"], mode=mode, days_per_year=days_per_year),
        "mean_turnover": float(rep["turnover"].mean()),
        "delisted_closed": len(delisted),
        "topk": topk,
        "n_drop": n_drop,
        "buy_cost": buy_cost,
        "sell_cost": sell_cost,
        "min_cost": min_cost,
        "lot_size": lot_size,
        "mode": mode,
        "days_per_year": days_per_year,
    }
    return BacktestResult(report=rep, summary=summary)


def backtest_market(
    preds: pd.DataFrame,
    md,  # noqa: ANN001 - apps.finance.sources.MarketData
    *,
    rules: str | MarketRules = "us",
    topk: int = 50,
    n_drop: int = 5,
    account: float = 1e8,
    mode: Literal["sum", "compound"] = "sum",
    **overrides,
) -> BacktestResult:
    """TopK-Dropout of ``preds`` (``date, ticker, score``) on a market read by :mod:`apps.finance.sources`,
    with its rules (a preset name or :class:`MarketRules`; ``overrides`` change single fields), its
    benchmark, its suspensions (returns across them kept) and its raw prices (lots)."""
    rl = market_rules(rules, **overrides)
    rets_all = md.returns()  # (days, tickers), NaN = no trade that day
    st = md.wide.get("st")
    can_buy, can_sell = trade_masks(
        rets_all, rl, listing_age=listing_age(md.tradable), st=None if st is None else st.astype(bool)
    )
    raw = md.wide["close"] / md.wide["factor"] if "factor" in md.wide else md.wide["close"]
    scores = preds.pivot(index="date", columns="ticker", values="score")
    days = md.dates[(md.dates >= scores.index.min()) & (md.dates <= scores.index.max())]
    if len(days) == 0:
        raise ValueError("backtest: no prediction date is on the market's calendar")
    return topk_dropout_backtest(
        scores,
        rets_all.loc[days],
        md.bench_returns().loc[days],
        topk=topk,
        n_drop=n_drop,
        buy_cost=rl.buy_cost,
        sell_cost=rl.sell_cost,
        min_cost=rl.min_cost,
        account=account,
        mode=mode,
        days_per_year=rl.days_per_year,
        can_buy=can_buy.loc[days],
        can_sell=can_sell.loc[days],
        lot_size=rl.lot_size,
        raw_close=raw.loc[days] if rl.lot_size > 1 else None,
        last_trade=md.tradable.apply(lambda c: c[c].index.max()),  # on the whole calendar: delistings
    )


def format_summary(s: dict) -> str:
    """One-line summary that always names the accumulation and the days per year."""
    e = s["excess_return_with_cost"]
    return (
        f"excess w/ cost: AR {e['AR']:.4f}  IR {e['IR']:.3f}  MDD {e['MDD']:.4f}  turnover "
        f"{s['mean_turnover']:.3f}  [mode={s['mode']}, N={s['days_per_year']}, topk={s['topk']}, "
        f"n_drop={s['n_drop']}, buy {s['buy_cost'] * 1e4:.0f}bp, sell {s['sell_cost'] * 1e4:.0f}bp, "
        f"min_cost {s['min_cost']}]"
    )


def backtest_predictions(
    preds: pd.DataFrame, *, data_dir: str | None = None, segment: str | None = "test", **kw
) -> BacktestResult:
    """Backtest a predictions table (``date, ticker, score``) on the shipped panel and ^GSPC.

    Raises:
        ValueError: no (ticker, date) of the predictions is a bar of the shipped panel (predictions of
            another market: pass its fit config, ``--config``).
    """
    from apps.datadir import data_dir as resolve_data_dir
    from apps.finance.data import daily_returns, load_index, load_sp500_panel, validate_panel

    if segment is not None and "segment" in preds.columns:
        preds = preds[preds["segment"] == segment]
    bench_close = load_index(data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        panel = validate_panel(load_sp500_panel(data_dir), calendar=pd.DatetimeIndex(bench_close.index))
    rets = daily_returns(panel.wide["close"], panel.move_mask)
    rets = rets.where(panel.wide["close"].notna())  # no close = not tradable
    close = panel.wide["close"]
    on_panel = close.stack().index  # (date, ticker) of every bar
    pairs = pd.MultiIndex.from_arrays([pd.to_datetime(preds["date"]), preds["ticker"].astype(str)])
    if not pairs.isin(on_panel).any():
        folder = resolve_data_dir(data_dir) / "sp500_5yr" / "individual_stocks_5yr"
        seg = f" of segment {segment!r}" if segment is not None and "segment" in preds.columns else ""
        when = pairs.levels[0]
        span = f"dates {when.min().date()}..{when.max().date()}" if len(preds) else "no dates"
        raise ValueError(
            f"backtest: no (ticker, date) of the {len(preds)} predictions{seg} (tickers e.g. "
            f"{sorted(preds['ticker'].astype(str).unique())[:3]}, {span}) matches the returns panel used: "
            f"the shipped S&P 500 panel {folder} ({close.shape[1]} tickers, {close.index[0].date()}.."
            f"{close.index[-1].date()}; the default without a fit config); pass --config <the fit config> "
            "to backtest on the market the model was fitted on"
        )
    scores = preds.pivot(index="date", columns="ticker", values="score")
    bench = bench_close.pct_change().fillna(0.0)
    last = scores.index.max()
    days = rets.index[(rets.index >= scores.index.min()) & (rets.index <= last)]
    last_trade = rets.apply(lambda c: c.last_valid_index())
    return topk_dropout_backtest(scores, rets.loc[days], bench.loc[days], last_trade=last_trade, **kw)


def fit_config_args(argv: list[str] | None) -> list[str]:
    """``--config X`` (the fit YAML, as for ``moekit finance fit``) -> ``--fit_config X``: jsonargparse
    reserves ``--config`` for its own argument files."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    out = []
    for a in args:
        if a == "--config":
            out.append("--fit_config")
        elif a.startswith("--config="):
            out.append("--fit_config=" + a.split("=", 1)[1])
        else:
            out.append(a)
    return out


def data_module_from_config(config: str):  # noqa: ANN201 - a finance data module
    """The ``data`` section of a ``moekit finance fit`` YAML, instantiated (nothing is read yet)."""
    import importlib
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load(Path(config).read_text())
    data = (cfg or {}).get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{config}: no data.class_path section (use the same config as moekit finance fit)")
    mod, _, name = data["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in (data.get("init_args") or {}).items()}
    return cls(**args)


def backtest(
    predictions: str,
    *,
    fit_config: str | None = None,
    segment: str = "test",
    topk: int = 50,
    n_drop: int = 5,
    rules: Literal["us", "cn"] | None = None,
    buy_cost: float | None = None,
    sell_cost: float | None = None,
    min_cost: float | None = None,
    lot_size: int | None = None,
    min_listing_days: int | None = None,
    limit: Literal["none", "cn", "fixed"] | None = None,
    mode: Literal["sum", "compound"] = "sum",
    days_per_year: int | None = None,
    data_dir: str | None = None,
    out: str | None = None,
) -> BacktestResult:
    """TopK-Dropout backtest of a predictions Parquet file; prints the IC summary and the backtest summary.

    Args:
        predictions: Parquet file with ``date, ticker, score`` (and ``segment``, ``label``), e.g. written by
            ``FinanceTask(predictions_path=...)`` or ``moekit finance predict``.
        fit_config: the ``moekit finance fit`` YAML (also accepted as ``--config``): its ``data`` section
            names the market (calendar, benchmark, suspensions, raw prices) and its rules preset. Without it:
            the shipped S&P 500 panel and ^GSPC.
        segment: the segment to backtest (``valid`` or ``test``).
        topk: number of stocks held.
        n_drop: maximum replacements per day.
        rules: market preset (default: the data config's, else ``us``); the options below override single
            rules.
        buy_cost: cost rate of buys.
        sell_cost: cost rate of sells.
        min_cost: minimum cost per order (account currency).
        lot_size: shares per lot.
        min_listing_days: trading days after the first trade before a stock may be bought.
        limit: price-limit rule (``none``, ``cn``, ``fixed``).
        mode: accumulation of the summary returns.
        days_per_year: annualisation (default: the preset's).
        data_dir: root of the data sets (default ``apps.datadir.data_dir()``).
        out: folder for report.csv, summary.json and PNG plots.
    """
    from apps.finance.metrics import daily_ic, ic_summary

    preds = pd.read_parquet(predictions)
    over = {
        "buy_cost": buy_cost,
        "sell_cost": sell_cost,
        "min_cost": min_cost,
        "lot_size": lot_size,
        "min_listing_days": min_listing_days,
        "limit": limit,
        "days_per_year": days_per_year,
    }
    if fit_config is not None:
        config = fit_config
        dm = data_module_from_config(config)
        if data_dir is not None and hasattr(dm, "data_dir"):
            dm.data_dir = data_dir
        if not hasattr(dm, "read"):
            raise ValueError(
                f"{config}: data module {type(dm).__name__} has no market reader (use MarketDataModule)"
            )
        md = dm.read()
        seg_preds = preds[preds["segment"] == segment] if "segment" in preds.columns else preds
        res = backtest_market(
            seg_preds,
            md,
            rules=rules or getattr(dm, "rules", "us"),
            topk=topk,
            n_drop=n_drop,
            mode=mode,
            **over,
        )
    else:
        rl = market_rules(rules or "us", **over)
        res = backtest_predictions(
            preds,
            data_dir=data_dir,
            segment=segment,
            topk=topk,
            n_drop=n_drop,
            buy_cost=rl.buy_cost,
            sell_cost=rl.sell_cost,
            min_cost=rl.min_cost,
            mode=mode,
            days_per_year=rl.days_per_year,
        )
    seg = preds[preds["segment"] == segment] if "segment" in preds.columns else preds
    if "label" in seg.columns:
        ic = daily_ic(seg)
        print({k: round(v, 4) for k, v in ic_summary(ic).items()})
    else:
        ic = None
    print(format_summary(res.summary))
    if out:
        from pathlib import Path

        from apps.finance.plots import plot_daily_ic, plot_excess, plot_expert_usage

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        res.report.to_csv(folder / "report.csv")
        (folder / "summary.json").write_text(json.dumps(res.summary, indent=1, default=str))
        plot_excess(res.report, folder / "excess.png", title=format_summary(res.summary))
        if ic is not None:
            plot_daily_ic(ic, folder / "daily_ic.png")
        if any(c.startswith("w_e") for c in seg.columns):
            plot_expert_usage(seg, folder / "expert_usage.png")
        print(f"backtest: wrote {folder}")
    return res


def main(argv: list[str] | None = None) -> None:
    """``moekit finance backtest`` (or ``python -m apps.finance.backtest``): :func:`backtest` as a command."""
    from jsonargparse import CLI

    CLI(backtest, args=fit_config_args(argv), as_positional=False, prog="moekit finance backtest")


if __name__ == "__main__":
    main()
