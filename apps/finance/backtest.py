"""TopK-Dropout backtest (qlib ``contrib/strategy/signal_strategy.py``, qlib: arXiv 2009.11189).

Timing (qlib, docs/finance.md §3, §6): on trading day t the strategy uses the scores predicted for the
previous trading day, trades at the close of t, and the position earns ``close[t+1]/close[t] - 1``,
the label of the signal day. Costs per order ``max(value * rate, min_cost)``: buys ``buy_cost``, sells
``sell_cost``.
Our simplifications (documented): fractional shares (US trade unit 1 approximated), no price limits, no
suspensions beyond "no close that day = not tradable", no market impact.

Daily accounting: ``value_t`` = cash + positions at the close of t after trading; ``return_t`` =
``value_t / value_{t-1} - 1`` (net of costs); ``cost_t`` = costs / ``value_{t-1}``; excess = return − bench.

CLI: ``python -m apps.finance.backtest --predictions preds.parquet [--segment test] [--topk 50 --n_drop 5]``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from apps.finance.metrics import risk_analysis

log = logging.getLogger(__name__)


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
) -> BacktestResult:
    """Run TopK-Dropout.

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

    Returns:
        :class:`BacktestResult`; the report covers the trading days after the first signal day.
    """
    if not 0 < n_drop <= topk:
        raise ValueError(f"need 0 < n_drop <= topk, got n_drop={n_drop}, topk={topk}")
    days = returns.index
    sig_days = [d for d in scores.index if d in days]
    if not sig_days:
        raise ValueError("backtest: no score date is on the returns calendar")
    pos_of = {d: i for i, d in enumerate(days)}
    cash, hold = float(account), {}  # ticker -> position value at the last close
    held_days: dict[str, int] = {}
    rows = []
    start = pos_of[sig_days[0]] + 1
    for ti in range(start, len(days)):
        t, prev = days[ti], days[ti - 1]
        value_prev = cash + sum(hold.values())
        r = returns.loc[t]
        for tk in list(hold):  # mark to market at today's close
            rt = r.get(tk, np.nan)
            hold[tk] *= 1.0 + (0.0 if np.isnan(rt) else rt)
        tradable = set(r.index[r.notna()])
        cost = traded = 0.0
        if prev in scores.index:
            s = scores.loc[prev].dropna()
            s = s[s.index.isin(tradable) | s.index.isin(hold.keys())]
            order = s.sort_values(ascending=False, kind="mergesort")
            last = sorted(hold, key=lambda k: -s.get(k, -np.inf))  # holdings by score (unscored last)
            not_held = [k for k in order.index if k not in hold and k in tradable]
            today = not_held[: n_drop + topk - len(last)]
            comb = sorted(set(last) | set(today), key=lambda k: -s.get(k, -np.inf))
            bottom = set(comb[-n_drop:]) if len(comb) > 0 else set()
            sell = [k for k in last if k in bottom and k in tradable and held_days.get(k, 0) >= 1]
            buy = today[: len(sell) + topk - len(last)]
            for k in sell:
                v = hold.pop(k)
                held_days.pop(k, None)
                c = max(v * sell_cost, min_cost) if v > 0 else 0.0
                cash += v - c
                cost, traded = cost + c, traded + v
            if buy:
                per = cash * risk_degree / len(buy)
                for k in buy:
                    c = max(per * buy_cost, min_cost)
                    if per - c <= 0:
                        continue
                    cash -= per
                    hold[k] = per - c  # cost paid out of the order value (qlib deducts trade_val + cost)
                    cost, traded = cost + c, traded + per
        for k in hold:
            held_days[k] = held_days.get(k, 0) + 1
        value = cash + sum(hold.values())
        ret = value / value_prev - 1
        rows.append(
            {
                "date": t,
                "return": ret,
                "bench": float(bench.get(t, 0.0)),
                "cost": cost / value_prev,
                "turnover": traded / (2 * value_prev),
                "value": value,
                "n_held": len(hold),
            }
        )
    rep = pd.DataFrame(rows).set_index("date")
    rep["excess"] = rep["return"] - rep["bench"]
    summary = {
        "excess_return_with_cost": risk_analysis(rep["excess"], mode=mode, days_per_year=days_per_year),
        "excess_return_without_cost": risk_analysis(
            rep["excess"] + rep["cost"], mode=mode, days_per_year=days_per_year
        ),
        "return": risk_analysis(rep["return"], mode=mode, days_per_year=days_per_year),
        "mean_turnover": float(rep["turnover"].mean()),
        "topk": topk,
        "n_drop": n_drop,
        "buy_cost": buy_cost,
        "sell_cost": sell_cost,
        "min_cost": min_cost,
        "mode": mode,
        "days_per_year": days_per_year,
    }
    return BacktestResult(report=rep, summary=summary)


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
    """Backtest a predictions table (``date, ticker, score``) on the shipped panel and ^GSPC."""
    from apps.finance.data import daily_returns, load_index, load_sp500_panel, validate_panel

    if segment is not None and "segment" in preds.columns:
        preds = preds[preds["segment"] == segment]
    bench_close = load_index(data_dir)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        panel = validate_panel(load_sp500_panel(data_dir), calendar=pd.DatetimeIndex(bench_close.index))
    rets = daily_returns(panel.wide["close"], panel.move_mask)
    rets = rets.where(panel.wide["close"].notna())  # no close = not tradable
    scores = preds.pivot(index="date", columns="ticker", values="score")
    bench = bench_close.pct_change().fillna(0.0)
    last = scores.index.max()
    days = rets.index[(rets.index >= scores.index.min()) & (rets.index <= last)]
    return topk_dropout_backtest(scores, rets.loc[days], bench.loc[days], **kw)


def backtest(
    predictions: str,
    *,
    segment: str = "test",
    topk: int = 50,
    n_drop: int = 5,
    buy_cost: float = 0.0005,
    sell_cost: float = 0.0015,
    min_cost: float = 0.0,
    mode: Literal["sum", "compound"] = "sum",
    days_per_year: int = 252,
    data_dir: str | None = None,
    out: str | None = None,
) -> BacktestResult:
    """TopK-Dropout backtest of a predictions Parquet file; prints the IC summary and the backtest summary.

    Args:
        predictions: Parquet file with ``date, ticker, score`` (and ``segment``), e.g. written by
            ``FinanceTask(predictions_path=...)``.
        segment: the segment to backtest (``valid`` or ``test``).
        topk: number of stocks held.
        n_drop: maximum replacements per day.
        buy_cost: cost rate of buys.
        sell_cost: cost rate of sells.
        min_cost: minimum cost per order (account currency).
        mode: accumulation of the summary returns.
        days_per_year: annualisation.
        data_dir: folder with ``sp500_5yr/`` and ``sp500_index/`` (default ``apps.datadir.data_dir()``).
        out: folder for report.csv, summary.json and PNG plots.
    """
    from apps.finance.metrics import daily_ic, ic_summary

    preds = pd.read_parquet(predictions)
    res = backtest_predictions(
        preds,
        data_dir=data_dir,
        segment=segment,
        topk=topk,
        n_drop=n_drop,
        buy_cost=buy_cost,
        sell_cost=sell_cost,
        min_cost=min_cost,
        mode=mode,
        days_per_year=days_per_year,
    )
    seg = preds[preds["segment"] == segment] if "segment" in preds.columns else preds
    ic = daily_ic(seg)
    print({k: round(v, 4) for k, v in ic_summary(ic).items()})
    print(format_summary(res.summary))
    if out:
        from pathlib import Path

        from apps.finance.plots import plot_daily_ic, plot_excess, plot_expert_usage

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        res.report.to_csv(folder / "report.csv")
        (folder / "summary.json").write_text(json.dumps(res.summary, indent=1))
        plot_excess(res.report, folder / "excess.png", title=format_summary(res.summary))
        plot_daily_ic(ic, folder / "daily_ic.png")
        if any(c.startswith("w_e") for c in seg.columns):
            plot_expert_usage(seg, folder / "expert_usage.png")
    return res


def main(argv: list[str] | None = None) -> None:
    """``moekit finance backtest`` (or ``python -m apps.finance.backtest``): :func:`backtest` as a command."""
    from jsonargparse import CLI

    CLI(backtest, args=argv, as_positional=False, prog="moekit finance backtest")


if __name__ == "__main__":
    main()
