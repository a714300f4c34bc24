"""qlib-style processors on ``(days, tickers, F)`` arrays (qlib: arXiv 2009.11189, ``dataset/processor.py``).

Math as in ``docs/finance.md`` §4 (qlib's processors). Fitted processors take their statistics only from the
days flagged in ``fit_days`` (the train window); cross-sectional processors work one day at a time and never
mix days. NaN marks a missing (ticker, day) or feature value.
"""

from __future__ import annotations

import numpy as np


class RobustZScoreNorm:
    """Per column over the fit window's stock-days: ``clip((x - med) / (1.4826 * (mad + 1e-12)), -3, 3)``.

    Args:
        clip_outlier: clip the result to ``[-3, 3]`` (qlib's ``clip_outlier=True``).
    """

    def __init__(self, *, clip_outlier: bool = True) -> None:
        self.clip_outlier = clip_outlier
        self.median: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    def fit(self, x: np.ndarray, fit_days: np.ndarray, mask: np.ndarray | None = None) -> RobustZScoreNorm:
        """Fit on ``x[fit_days]``. x: ``(days, tickers, F)``; fit_days: ``(days,)`` bool; mask: optional
        ``(days, tickers)`` bool, the stock-days that count (e.g. the universe; others are ignored)."""
        if x.ndim != 3:
            raise ValueError(f"RobustZScoreNorm expects (days, tickers, F), got shape {x.shape}")
        if mask is not None:
            sub = x[fit_days][mask[fit_days]].astype(np.float64)  # (stock-days in the mask, F)
        else:
            sub = x[fit_days].reshape(-1, x.shape[-1]).astype(np.float64)  # (days_fit*tickers, F)
        sub = np.where(np.isinf(sub), np.nan, sub)
        med = np.nanmedian(sub, axis=0)
        mad = np.nanmedian(np.abs(sub - med), axis=0)
        self.median, self.scale = med, 1.4826 * (mad + 1e-12)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        if self.median is None:
            raise RuntimeError("RobustZScoreNorm.transform called before fit")
        med, scale = self.median.astype(np.float32), self.scale.astype(np.float32)
        out = np.asarray(x, dtype=np.float32) - med  # float32 throughout: no float64 copy of a large panel
        out /= scale
        out[np.isinf(out)] = np.nan
        return np.clip(out, -3, 3, out=out) if self.clip_outlier else out


def fillna(x: np.ndarray, value: float = 0.0) -> np.ndarray:
    """qlib ``Fillna``: NaN -> ``value``."""
    return np.where(np.isnan(x), np.float32(value), x).astype(x.dtype)


def cs_rank_norm(y: np.ndarray) -> np.ndarray:
    """qlib ``CSRankNorm`` per day: ``(rank_pct(y) - 0.5) * 3.46``; NaN stays; y ``(days, tickers)``."""
    import pandas as pd

    r = pd.DataFrame(y).rank(axis=1, pct=True).to_numpy()
    return (r - 0.5) * 3.46


def cs_zscore_norm(y: np.ndarray) -> np.ndarray:
    """qlib ``CSZScoreNorm`` per day (row): ``(y - mean) / std`` (ddof=1). y: ``(days, tickers)``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.nanmean(y, axis=1, keepdims=True)
        sd = np.nanstd(y, axis=1, ddof=1, keepdims=True)
        return (y - mu) / sd
