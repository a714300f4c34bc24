"""PNG plots: cumulative excess return with drawdown, daily IC, expert usage over time."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_excess(report: pd.DataFrame | dict[str, pd.DataFrame], path: str | Path, *, title: str = "") -> None:
    """Cumulative (sum) excess return with cost and its drawdown; one report or a dict name -> report."""
    reps = report if isinstance(report, dict) else {"strategy": report}
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[2, 1])
    for name, rep in reps.items():
        cs = rep["excess"].cumsum()
        a1.plot(cs.index, cs.to_numpy(), label=name)
        a2.plot(cs.index, (cs - cs.cummax()).to_numpy(), label=name)
    a1.set_ylabel("cumulative excess (sum)")
    a2.set_ylabel("drawdown")
    a1.legend(fontsize=7)
    a1.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _dates(d: pd.DataFrame) -> pd.DatetimeIndex | range:
    """The x axis of a daily table: its dates (a ``date`` column or a DatetimeIndex), else day numbers."""
    if "date" in d.columns:
        return pd.DatetimeIndex(d["date"])
    return d.index if isinstance(d.index, pd.DatetimeIndex) else range(len(d))


def plot_daily_ic(ic: pd.DataFrame | dict[str, pd.DataFrame], path: str | Path) -> None:
    """One model: daily RankIC (bars) and its 20-day rolling mean. Several models (a dict): their
    cumulative daily RankIC (sum over days; a period's slope is its RankIC), readable where eight rolling
    means would overlap."""
    ics = ic if isinstance(ic, dict) else {"model": ic}
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, d in ics.items():
        x = _dates(d)
        if len(ics) == 1:
            ax.bar(x, d["rank_ic"].to_numpy(), color="0.7", label="daily RankIC")
            ax.plot(x, d["rank_ic"].rolling(20, min_periods=1).mean().to_numpy(), label=f"{name} (20d mean)")
        else:
            ax.plot(x, d["rank_ic"].fillna(0).cumsum().to_numpy(), label=name)
    ax.axhline(0, color="k", lw=0.5)
    dated = all(isinstance(_dates(d), pd.DatetimeIndex) for d in ics.values())
    ax.set_xlabel("date" if dated else "trading day")
    ax.set_ylabel("RankIC" if len(ics) == 1 else "cumulative daily RankIC (sum)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_expert_usage(preds: pd.DataFrame, path: str | Path) -> None:
    """Stacked daily mean router weight per expert (columns ``w_e*``)."""
    cols = [c for c in preds.columns if c.startswith("w_e")]
    daily = preds.groupby("date")[cols].mean()
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.stackplot(range(len(daily)), daily.to_numpy().T, labels=cols)
    ax.set_xlabel("trading day")
    ax.set_ylabel("mean router weight")
    ax.legend(fontsize=6, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
