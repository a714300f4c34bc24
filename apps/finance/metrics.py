"""Signal metrics (qlib ``contrib/eva/alpha.py``) and portfolio risk analysis (qlib ``contrib/evaluate.py``).

qlib: arXiv 2009.11189. Formulas as in docs/finance.md §8: daily Pearson IC / Spearman RankIC over the
cross-section on the raw label; ICIR = mean/std (ddof=1, not annualised). Portfolio: ``mode`` sum or compound
and ``days_per_year`` N are explicit and echoed in every result.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch


def daily_ic(frame: pd.DataFrame, *, score: str = "score", label: str = "label") -> pd.DataFrame:
    """Per-day IC (Pearson) and RankIC (Spearman) over the stocks with a finite score and label.

    Args:
        frame: long table with columns ``date``, ``score``, ``label``.

    Returns:
        DataFrame indexed by date with columns ``ic``, ``rank_ic`` (NaN on days with < 2 stocks or no
        variance).
    """
    for c in ("date", score, label):
        if c not in frame.columns:
            raise ValueError(f"daily_ic: missing column {c!r}")
    f = frame[["date", score, label]].replace([np.inf, -np.inf], np.nan).dropna()
    f = f.assign(_rs=f.groupby("date")[score].rank(), _rl=f.groupby("date")[label].rank())

    def pearson(a: pd.Series, b: pd.Series) -> pd.Series:
        g = pd.DataFrame({"a": a, "b": b, "date": f["date"]}).groupby("date")
        ma, mb = g["a"].transform("mean"), g["b"].transform("mean")
        da, db = a - ma, b - mb
        tmp = (
            pd.DataFrame({"ab": da * db, "aa": da * da, "bb": db * db, "date": f["date"]})
            .groupby("date")
            .sum()
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            r = tmp["ab"] / np.sqrt(tmp["aa"] * tmp["bb"])
        return r.replace([np.inf, -np.inf], np.nan)

    out = pd.DataFrame({"ic": pearson(f[score], f[label]), "rank_ic": pearson(f["_rs"], f["_rl"])})
    out.loc[f.groupby("date").size() < 2] = np.nan
    return out


def ic_summary(ic: pd.DataFrame) -> dict[str, float]:
    """IC, ICIR, RankIC, RankICIR from :func:`daily_ic` output."""
    res = {}
    for col, name in (("ic", "IC"), ("rank_ic", "RankIC")):
        s = ic[col].dropna()
        res[name] = float(s.mean()) if len(s) else float("nan")
        sd = float(s.std(ddof=1)) if len(s) > 1 else float("nan")
        res[name + "IR"] = res[name] / sd if sd and sd > 0 else float("nan")
    return res


def risk_analysis(
    r: pd.Series | np.ndarray, *, mode: Literal["sum", "compound"] = "sum", days_per_year: int = 252
) -> dict[str, float | str | int]:
    """Annualised return, information ratio and max drawdown of a daily (excess) return series.

    ``sum``: AR = N·mean, IR = mean/std·√N, MDD = min(cumsum − cummax(cumsum)). ``compound``:
    AR = Π(1+r)^(N/T) − 1, IR = (Π(1+r)^(1/T) − 1)/std(log(1+r))·√N, MDD = min(cumprod/cummax − 1).
    The result carries ``mode`` and ``days_per_year``. A zero-variance series has IR = NaN (not inf).
    """
    if mode not in ("sum", "compound"):
        raise ValueError(f"mode must be 'sum' or 'compound', got {mode!r}")
    x = np.asarray(r, dtype=np.float64)
    x = x[~np.isnan(x)]
    n, T = days_per_year, len(x)
    if T == 0:
        return {"AR": float("nan"), "IR": float("nan"), "MDD": float("nan"), "mode": mode, "days_per_year": n}
    if mode == "sum":
        sd = x.std(ddof=1) if T > 1 else 0.0
        ar = n * x.mean()
        ir = x.mean() / sd * np.sqrt(n) if sd > 0 else float("nan")
        cs = np.cumsum(x)
        mdd = float(np.min(cs - np.maximum.accumulate(cs)))
    else:
        cp = np.cumprod(1 + x)
        ar = cp[-1] ** (n / T) - 1
        sd = np.log1p(x).std(ddof=1) if T > 1 else 0.0
        ir = (cp[-1] ** (1 / T) - 1) / sd * np.sqrt(n) if sd > 0 else float("nan")
        mdd = float(np.min(cp / np.maximum.accumulate(cp) - 1))
    return {"AR": float(ar), "IR": float(ir), "MDD": min(mdd, 0.0), "mode": mode, "days_per_year": n}


# ---- torch versions used inside training ---------------------------------------------------------------
def pearson_torch(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """Pearson correlation of two ``(N,)`` tensors; None when undefined (< 2 stocks or zero variance)."""
    if pred.numel() < 2:
        return None
    p, t = pred - pred.mean(), y - y.mean()
    den = p.norm() * t.norm()
    if den.item() <= 1e-12:
        return None
    return (p * t).sum() / den
