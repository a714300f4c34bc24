"""Alpha158 / Alpha360 feature engines (qlib's factor libraries; qlib: arXiv 2009.11189).

Formulas follow ``microsoft/qlib: qlib/contrib/data/loader.py`` (``Alpha158DL``, ``Alpha360DL``) as restated
in qlib's ``qlib/contrib/data/handler.py`` (each feature below beside its expression). Two implementations:

* :func:`alpha158` — vectorised over the whole panel: every field is a ``(days, tickers)`` wide array and
  every operator is one pandas/numpy rolling call over all tickers at once (no Python loop over tickers).
* :func:`alpha158_reference` — slow and obvious: one ticker at a time, one day at a time, numpy on the
  explicit window. Used as the oracle by the tests and timed by the benchmark.

Operator semantics (qlib ``ops.py`` / ``_libs/rolling.pyx``): every rolling op uses ``min_periods=1`` (early
windows are partial) and skips NaN inside the window; ``Std`` has ddof=1; ``Slope``/``Rsquare``/``Resi`` are
OLS of x on its position in the window using the non-NaN points; ``Rank`` is the average-method percentile
rank of the last value; ``Corr`` is NaN where either rolling std is ~0 (``atol=2e-5``).

Our reading / deviations (marked, not from qlib):
* ``IdxMax``/``IdxMin`` skip NaN (qlib's ``x.argmax()`` would return the position of a NaN); the position is
  1-based inside the available window (partial at the start, as qlib's ``min_periods=1`` apply does).
* ``±inf`` produced by a division by zero volume (``Log($volume/Ref($volume,1)+1)``) is treated as NaN.
* The shipped panel has **no VWAP**: ``VWAP0`` (and Alpha360's ``VWAP*`` block) are all-NaN; by default they
  are dropped, giving 157 (Alpha158) / 300 (Alpha360) columns.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
prog = logging.getLogger("moekit.progress")  # stage lines of long steps; the moekit CLI shows them

WINDOWS = (5, 10, 20, 30, 60)
KBAR = ("KMID", "KLEN", "KMID2", "KUP", "KUP2", "KLOW", "KLOW2", "KSFT", "KSFT2")
PRICE = ("OPEN0", "HIGH0", "LOW0", "VWAP0")
ROLLING_OPS = (
    "ROC",
    "MA",
    "STD",
    "BETA",
    "RSQR",
    "RESI",
    "MAX",
    "MIN",
    "QTLU",
    "QTLD",
    "RANK",
    "RSV",
    "IMAX",
    "IMIN",
    "IMXD",
    "CORR",
    "CORD",
    "CNTP",
    "CNTN",
    "CNTD",
    "SUMP",
    "SUMN",
    "SUMD",
    "VMA",
    "VSTD",
    "WVMA",
    "VSUMP",
    "VSUMN",
    "VSUMD",
)
ALPHA158_NAMES: tuple[str, ...] = KBAR + PRICE + tuple(f"{op}{d}" for op in ROLLING_OPS for d in WINDOWS)
assert len(ALPHA158_NAMES) == 158
FIELDS = ("open", "high", "low", "close", "volume")
ALPHA360_FIELDS = ("close", "open", "high", "low", "vwap", "volume")
EPS = 1e-12


def _finite(a: np.ndarray) -> np.ndarray:
    """Replace ±inf by NaN (our reading for divisions by a zero volume)."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isinf(a), np.nan, a)


def _check_fields(wide: Mapping[str, pd.DataFrame]) -> None:
    missing = [f for f in FIELDS if f not in wide]
    if missing:
        raise ValueError(f"alpha158: missing fields {missing}; need {list(FIELDS)}")
    shape = wide["close"].shape
    for f in FIELDS:
        if wide[f].shape != shape:
            raise ValueError(f"alpha158: field {f!r} has shape {wide[f].shape}, close has {shape}")


# ----------------------------------------------------------------------------------------------------------
# vectorised engine
# ----------------------------------------------------------------------------------------------------------
def _idx_extreme(a: np.ndarray, d: int, kind: str) -> np.ndarray:
    """1-based position of the max/min of the last ``d`` rows (NaN skipped; the earliest on ties), per column.

    a: (T, N). One pass per lag over whole ``(T, N)`` slabs (float32 compares): no ``(T, N, d)`` window array,
    ~4x faster than ``argmax`` over a strided window view on the CSI 300 panel.
    """
    t, n = a.shape
    a = np.asarray(a, dtype=np.float32)
    best = np.full((t, n), np.nan, np.float32)
    at = np.full((t, n), -1, np.int64)  # row index of the current best
    rows = np.broadcast_to(np.arange(t)[:, None], (t, n))
    better = np.greater if kind == "max" else np.less
    for k in range(min(d, t) - 1, -1, -1):  # oldest lag first, strict compare: the earliest extreme wins ties
        cand, cur = a[: t - k], best[k:]  # cand[r - k] = a[r - k] is row r's value k days back
        with np.errstate(invalid="ignore"):
            take = better(cand, cur) | (np.isnan(cur) & ~np.isnan(cand))  # (T-k, N)
        np.copyto(cur, cand, where=take)  # in place into best[k:]
        np.copyto(at[k:], rows[: t - k], where=take)  # row index r - k
    start = np.maximum(np.arange(t) - d + 1, 0)[:, None]  # first row of each (possibly partial) window
    out = (at - start + 1).astype(np.float64)
    out[at < 0] = np.nan
    return out


def _ols(y: pd.DataFrame, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rolling OLS of y on time (NaN-skipping): slope, R², last-point residual. y: (T, N)."""
    t_idx = np.arange(len(y), dtype=np.float64)[:, None] - len(y) / 2  # centred for precision
    tt = pd.DataFrame(np.where(y.isna().to_numpy(), np.nan, np.broadcast_to(t_idx, y.shape)), index=y.index)
    yy = pd.DataFrame(y.to_numpy(), index=y.index)
    r_y, r_t = yy.rolling(d, min_periods=1), tt.rolling(d, min_periods=1)
    cov = r_y.cov(tt).to_numpy()
    var_t = r_t.var().to_numpy()
    var_y = r_y.var().to_numpy()
    mean_y, mean_t = r_y.mean().to_numpy(), r_t.mean().to_numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = cov / var_t
        # a constant window has R^2 = 0/0 = NaN (qlib); pandas' online variance leaves a residue there
        # (std 1.4e-8 of the mean on a 30-day suspension), so constancy is tested exactly: max == min
        const = (r_y.max().to_numpy() - r_y.min().to_numpy()) == 0
        rsq = np.where(const | ~(var_y > 0), np.nan, cov * cov / (var_t * var_y))
        resi = yy.to_numpy() - (mean_y + slope * (np.broadcast_to(t_idx, y.shape) - mean_t))
    return slope, rsq, resi


def alpha158(
    wide: Mapping[str, pd.DataFrame], *, drop_vwap: bool = True, progress: bool = False
) -> dict[str, pd.DataFrame]:
    """Compute Alpha158 for a whole panel.

    Args:
        wide: field name -> ``(days, tickers)`` DataFrame for ``open, high, low, close, volume`` (NaN where a
            ticker has no row). ``vwap`` is optional (absent in the shipped panel -> ``VWAP0`` is NaN).
        drop_vwap: drop ``VWAP0`` when the panel has no vwap (157 features).
        progress: log a line per rolling window to ``moekit.progress`` (long panels).

    Returns:
        Ordered dict feature name -> ``(days, tickers)`` DataFrame, in qlib's column order.
    """
    _check_fields(wide)
    idx, cols = wide["close"].index, wide["close"].columns
    o, h, lo, c, v = (wide[f].to_numpy(dtype=np.float64) for f in FIELDS)
    C = pd.DataFrame(c, index=idx)  # integer columns: every internal frame aligns
    H = pd.DataFrame(h, index=idx)  # integer columns: every internal frame aligns
    Lo = pd.DataFrame(lo, index=idx)  # integer columns: every internal frame aligns
    V = pd.DataFrame(v, index=idx)  # integer columns: every internal frame aligns
    out: dict[str, np.ndarray] = _Float32Dict()  # each feature stored as float32 at once (half the memory)
    with np.errstate(invalid="ignore", divide="ignore"):
        rng = h - lo + EPS
        out["KMID"] = (c - o) / o
        out["KLEN"] = (h - lo) / o
        out["KMID2"] = (c - o) / rng
        out["KUP"] = (h - np.maximum(o, c)) / o
        out["KUP2"] = (h - np.maximum(o, c)) / rng
        out["KLOW"] = (np.minimum(o, c) - lo) / o
        out["KLOW2"] = (np.minimum(o, c) - lo) / rng
        out["KSFT"] = (2 * c - h - lo) / o
        out["KSFT2"] = (2 * c - h - lo) / rng
        out["OPEN0"], out["HIGH0"], out["LOW0"] = o / c, h / c, lo / c
        vw = wide.get("vwap")
        out["VWAP0"] = (vw.to_numpy(dtype=np.float64) / c) if vw is not None else np.full_like(c, np.nan)

        c1 = C.shift(1).to_numpy()
        dc = c - c1
        up = pd.DataFrame(np.maximum(dc, 0.0), index=idx)  # NaN stays NaN (np.maximum propagates)
        dn = pd.DataFrame(np.maximum(-dc, 0.0), index=idx)
        ab = pd.DataFrame(np.abs(dc), index=idx)
        gt = pd.DataFrame((c > c1).astype(np.float64), index=idx)  # NaN compares False, as in qlib
        lt = pd.DataFrame((c < c1).astype(np.float64), index=idx)
        v1 = V.shift(1).to_numpy()
        dv = v - v1
        vup = pd.DataFrame(np.maximum(dv, 0.0), index=idx)
        vdn = pd.DataFrame(np.maximum(-dv, 0.0), index=idx)
        vab = pd.DataFrame(np.abs(dv), index=idx)
        wv = pd.DataFrame(np.abs(c / c1 - 1) * v, index=idx)
        logv = pd.DataFrame(_finite(np.log(v + 1)), index=idx)
        cret = pd.DataFrame(_finite(c / c1), index=idx)
        lvret = pd.DataFrame(_finite(np.log(v / v1 + 1)), index=idx)
        vden = v + EPS

        t0 = time.perf_counter()
        for step, d in enumerate(WINDOWS):
            if progress:
                prog.info(
                    "alpha158: %d-day window [%d/%d] (%.0f s)",
                    d,
                    step + 1,
                    len(WINDOWS),
                    time.perf_counter() - t0,
                )
            rc, rh, rl, rv = (x.rolling(d, min_periods=1) for x in (C, H, Lo, V))
            out[f"ROC{d}"] = C.shift(d).to_numpy() / c
            out[f"MA{d}"] = rc.mean().to_numpy() / c
            out[f"STD{d}"] = _std(rc) / c
            slope, rsq, resi = _ols(C, d)
            out[f"BETA{d}"], out[f"RSQR{d}"], out[f"RESI{d}"] = slope / c, rsq, resi / c
            mx, mn = rh.max().to_numpy(), rl.min().to_numpy()
            out[f"MAX{d}"], out[f"MIN{d}"] = mx / c, mn / c
            out[f"QTLU{d}"] = rc.quantile(0.8).to_numpy() / c
            out[f"QTLD{d}"] = rc.quantile(0.2).to_numpy() / c
            out[f"RANK{d}"] = rc.rank(pct=True).to_numpy()
            out[f"RSV{d}"] = (c - mn) / (mx - mn + EPS)
            imax, imin = _idx_extreme(h, d, "max"), _idx_extreme(lo, d, "min")
            out[f"IMAX{d}"], out[f"IMIN{d}"], out[f"IMXD{d}"] = imax / d, imin / d, (imax - imin) / d
            out[f"CORR{d}"] = _corr(C, logv, d)
            out[f"CORD{d}"] = _corr(cret, lvret, d)
            cp, cn = (
                gt.rolling(d, min_periods=1).mean().to_numpy(),
                lt.rolling(d, min_periods=1).mean().to_numpy(),
            )
            out[f"CNTP{d}"], out[f"CNTN{d}"], out[f"CNTD{d}"] = cp, cn, cp - cn
            sp, sn = (
                up.rolling(d, min_periods=1).sum().to_numpy(),
                dn.rolling(d, min_periods=1).sum().to_numpy(),
            )
            sa = ab.rolling(d, min_periods=1).sum().to_numpy() + EPS
            out[f"SUMP{d}"], out[f"SUMN{d}"], out[f"SUMD{d}"] = sp / sa, sn / sa, (sp - sn) / sa
            out[f"VMA{d}"] = rv.mean().to_numpy() / vden
            out[f"VSTD{d}"] = _std(rv) / vden
            rw = wv.rolling(d, min_periods=1)
            out[f"WVMA{d}"] = _std(rw) / (rw.mean().to_numpy() + EPS)
            vp, vn = (
                vup.rolling(d, min_periods=1).sum().to_numpy(),
                vdn.rolling(d, min_periods=1).sum().to_numpy(),
            )
            va = vab.rolling(d, min_periods=1).sum().to_numpy() + EPS
            out[f"VSUMP{d}"], out[f"VSUMN{d}"], out[f"VSUMD{d}"] = vp / va, vn / va, (vp - vn) / va
    names = [n for n in ALPHA158_NAMES if not (drop_vwap and n == "VWAP0" and "vwap" not in wide)]
    return {n: pd.DataFrame(out[n], index=idx, columns=cols, copy=False) for n in names}


def _std(r) -> np.ndarray:  # noqa: ANN001 - pandas Rolling
    """Rolling sample std, exactly 0 on constant windows: pandas' online variance leaves a residue there that
    can be large in absolute terms after big values left the window (0.3 on a zero-volume stretch after
    turnover of 1e7), which ``/ (mean + 1e-12)`` then blows up (WVMA = 3e11 instead of 0)."""
    sd = r.std().to_numpy().copy()
    const = (r.max().to_numpy() - r.min().to_numpy()) == 0
    sd[const & ~np.isnan(sd)] = 0.0  # a one-value window stays NaN (ddof=1)
    return sd


class _Float32Dict(dict):
    """A dict that stores every value as a float32 array (the engine's output dtype; halves peak memory)."""

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        super().__setitem__(key, np.asarray(value, dtype=np.float32))


def _corr(a: pd.DataFrame, b: pd.DataFrame, d: int) -> np.ndarray:
    """qlib ``Corr``: rolling Pearson, NaN where either rolling std is ~0 (``isclose(std, 0, atol=2e-5)``)."""
    ra, rb = a.rolling(d, min_periods=1), b.rolling(d, min_periods=1)
    res = ra.corr(b).to_numpy().copy()
    sa, sb = ra.std().to_numpy(), rb.std().to_numpy()
    res[np.isclose(sa, 0, atol=2e-5) | np.isclose(sb, 0, atol=2e-5)] = np.nan
    return _finite(res)


def alpha360(wide: Mapping[str, pd.DataFrame], *, drop_vwap: bool = True) -> dict[str, pd.DataFrame]:
    """Alpha360: 60 lags of close/open/high/low(/vwap) over today's close and volume over today's volume.

    Column order ``[CLOSE59..0, OPEN59..0, HIGH59..0, LOW59..0, (VWAP59..0), VOLUME59..0]`` (qlib).
    """
    _check_fields(wide)
    c = wide["close"].to_numpy(dtype=np.float64)
    v = wide["volume"].to_numpy(dtype=np.float64)
    idx, cols = wide["close"].index, wide["close"].columns
    out: dict[str, pd.DataFrame] = {}
    for f in ALPHA360_FIELDS:
        if f == "vwap" and "vwap" not in wide and drop_vwap:
            continue
        src = wide.get(f)
        base = pd.DataFrame(np.nan, index=idx, columns=cols) if src is None else src.astype(np.float64)
        den = v + EPS if f == "volume" else c
        for i in range(59, -1, -1):
            with np.errstate(invalid="ignore", divide="ignore"):
                out[f"{f.upper()}{i}"] = pd.DataFrame(base.shift(i).to_numpy() / den, index=idx, columns=cols)
    return out


def stack_features(feats: Mapping[str, pd.DataFrame]) -> np.ndarray:
    """``(days, tickers, F)`` float32 array from a feature dict (order preserved)."""
    return np.stack([f.to_numpy(dtype=np.float32) for f in feats.values()], axis=-1)


def config_hash(wide: Mapping[str, pd.DataFrame], config: Mapping) -> str:
    """Hash of the panel content and the feature config (cache key)."""
    h = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for k in sorted(wide):
        df = wide[k]
        h.update(k.encode())
        h.update(np.ascontiguousarray(df.to_numpy(dtype=np.float64)).tobytes())
        h.update("|".join(map(str, df.columns)).encode())
        h.update("|".join(map(str, df.index)).encode())
    return h.hexdigest()[:20]


def cached_features(
    wide: Mapping[str, pd.DataFrame], *, kind: str = "alpha158", drop_vwap: bool = True, cache: bool = True
) -> tuple[np.ndarray, list[str]]:
    """Features ``(days, tickers, F)`` float32 plus names, cached as a float32 ``.npy`` (+ names ``.json``)
    under ``cache_dir('finance')``; the size is logged to ``moekit.progress``, as is each window's progress.

    The cache key hashes every input value and the config (and the engine version), so any change of data,
    settings or formulas recomputes. Writes are atomic (temporary file + ``os.replace``).
    """
    from apps.datadir import cache_dir

    if kind not in ("alpha158", "alpha360"):
        raise ValueError(f"kind must be 'alpha158' or 'alpha360', got {kind!r}")
    key = config_hash(wide, {"kind": kind, "drop_vwap": drop_vwap, "version": 2})
    days, tickers = wide["close"].shape
    path = cache_dir("finance") / f"{kind}_{key}.npy"
    names_path = path.with_suffix(".json")
    if cache and path.is_file() and names_path.is_file():
        arr = np.load(path, allow_pickle=False)
        names = json.loads(names_path.read_text())
        prog.info("features: cache hit %s (%.0f MB float32)", path, path.stat().st_size / 2**20)
        return arr, names
    feats = alpha158(wide, drop_vwap=drop_vwap, progress=True) if kind == "alpha158" else alpha360(wide)
    arr = stack_features(feats)  # (days, tickers, F)
    names = list(feats)
    if cache:
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        os.replace(tmp, path)
        tmp_names = names_path.with_name(f".{names_path.name}.tmp")
        tmp_names.write_text(json.dumps(names))
        os.replace(tmp_names, names_path)
        prog.info("features: wrote cache %s (%.0f MB float32)", path, path.stat().st_size / 2**20)
    return arr, names


# ----------------------------------------------------------------------------------------------------------
# slow per-ticker reference (test oracle)
# ----------------------------------------------------------------------------------------------------------
def _win(x: np.ndarray, t: int, d: int) -> np.ndarray:
    return x[max(0, t - d + 1) : t + 1]


def _ref_std(w: np.ndarray) -> float:
    w = w[~np.isnan(w)]
    return float(np.std(w, ddof=1)) if len(w) >= 2 else np.nan


def _ref_mean(w: np.ndarray) -> float:
    w = w[~np.isnan(w)]
    return float(np.mean(w)) if len(w) else np.nan


def _ref_sum(w: np.ndarray) -> float:
    w = w[~np.isnan(w)]
    return float(np.sum(w)) if len(w) else np.nan


def _ref_ols(w: np.ndarray) -> tuple[float, float, float]:
    x = np.arange(1, len(w) + 1, dtype=np.float64)
    ok = ~np.isnan(w)
    if ok.sum() < 2:
        return np.nan, np.nan, np.nan
    xs, ys = x[ok], w[ok]
    xm, ym = xs.mean(), ys.mean()
    sxx, sxy, syy = ((xs - xm) ** 2).sum(), ((xs - xm) * (ys - ym)).sum(), ((ys - ym) ** 2).sum()
    b = sxy / sxx
    r2 = sxy * sxy / (sxx * syy) if syy > 0 else np.nan
    resi = w[-1] - (ym + b * (x[-1] - xm))  # NaN when the last value is NaN
    return b, r2, resi


def _ref_rank(w: np.ndarray) -> float:
    last = w[-1]
    v = w[~np.isnan(w)]
    if np.isnan(last):
        return np.nan
    less, eq = (v < last).sum(), (v == last).sum()
    return float((less + (eq + 1) / 2) / len(v))


def _ref_idx(w: np.ndarray, kind: str) -> float:
    if np.isnan(w).all():
        return np.nan
    return float((np.nanargmax(w) if kind == "max" else np.nanargmin(w)) + 1)


def _ref_corr(a: np.ndarray, b: np.ndarray) -> float:
    a_raw, b_raw = a[~np.isnan(a)], b[~np.isnan(b)]
    sa = np.std(a_raw, ddof=1) if len(a_raw) >= 2 else np.nan
    sb = np.std(b_raw, ddof=1) if len(b_raw) >= 2 else np.nan
    if np.isnan(sa) or np.isnan(sb) or abs(sa) <= 2e-5 or abs(sb) <= 2e-5:
        return np.nan
    ok = ~np.isnan(a) & ~np.isnan(b)
    if ok.sum() < 2:
        return np.nan
    x, y = a[ok], b[ok]
    x, y = x - x.mean(), y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else np.nan


def alpha158_reference_one(o, h, lo, c, v) -> dict[str, np.ndarray]:  # noqa: ANN001 - 1-D float arrays
    """Alpha158 for ONE ticker with explicit per-day windows (slow oracle). Inputs: 1-D arrays (T,)."""
    o, h, lo, c, v = (np.asarray(x, dtype=np.float64) for x in (o, h, lo, c, v))
    T = len(c)
    res: dict[str, np.ndarray] = {n: np.full(T, np.nan) for n in ALPHA158_NAMES}
    with np.errstate(invalid="ignore", divide="ignore"):
        c1 = np.r_[np.nan, c[:-1]]
        v1 = np.r_[np.nan, v[:-1]]
        logv = _finite(np.log(v + 1))
        cret = _finite(c / c1)
        lvret = _finite(np.log(v / v1 + 1))
        wv = np.abs(c / c1 - 1) * v
        for t in range(T):
            rng = h[t] - lo[t] + EPS
            r = res
            r["KMID"][t] = (c[t] - o[t]) / o[t]
            r["KLEN"][t] = (h[t] - lo[t]) / o[t]
            r["KMID2"][t] = (c[t] - o[t]) / rng
            r["KUP"][t] = (h[t] - np.maximum(o[t], c[t])) / o[t]
            r["KUP2"][t] = (h[t] - np.maximum(o[t], c[t])) / rng
            r["KLOW"][t] = (np.minimum(o[t], c[t]) - lo[t]) / o[t]
            r["KLOW2"][t] = (np.minimum(o[t], c[t]) - lo[t]) / rng
            r["KSFT"][t] = (2 * c[t] - h[t] - lo[t]) / o[t]
            r["KSFT2"][t] = (2 * c[t] - h[t] - lo[t]) / rng
            r["OPEN0"][t], r["HIGH0"][t], r["LOW0"][t] = o[t] / c[t], h[t] / c[t], lo[t] / c[t]
            for d in WINDOWS:
                wc, wh, wl, wvv = _win(c, t, d), _win(h, t, d), _win(lo, t, d), _win(v, t, d)
                r[f"ROC{d}"][t] = (c[t - d] / c[t]) if t - d >= 0 else np.nan
                r[f"MA{d}"][t] = _ref_mean(wc) / c[t]
                r[f"STD{d}"][t] = _ref_std(wc) / c[t]
                b, r2, e = _ref_ols(wc)
                r[f"BETA{d}"][t], r[f"RSQR{d}"][t], r[f"RESI{d}"][t] = b / c[t], r2, e / c[t]
                okh, okl = wh[~np.isnan(wh)], wl[~np.isnan(wl)]
                mx = okh.max() if len(okh) else np.nan
                mn = okl.min() if len(okl) else np.nan
                r[f"MAX{d}"][t], r[f"MIN{d}"][t] = mx / c[t], mn / c[t]
                okc = wc[~np.isnan(wc)]
                r[f"QTLU{d}"][t] = np.quantile(okc, 0.8) / c[t] if len(okc) else np.nan
                r[f"QTLD{d}"][t] = np.quantile(okc, 0.2) / c[t] if len(okc) else np.nan
                r[f"RANK{d}"][t] = _ref_rank(wc)
                r[f"RSV{d}"][t] = (c[t] - mn) / (mx - mn + EPS)
                imax, imin = _ref_idx(wh, "max"), _ref_idx(wl, "min")
                r[f"IMAX{d}"][t], r[f"IMIN{d}"][t], r[f"IMXD{d}"][t] = imax / d, imin / d, (imax - imin) / d
                r[f"CORR{d}"][t] = _ref_corr(wc, _win(logv, t, d))
                r[f"CORD{d}"][t] = _ref_corr(_win(cret, t, d), _win(lvret, t, d))
                w0, w1 = wc, _win(c1, t, d)
                cp = float(np.mean(w0 > w1))  # NaN compares False
                cn = float(np.mean(w0 < w1))
                r[f"CNTP{d}"][t], r[f"CNTN{d}"][t], r[f"CNTD{d}"][t] = cp, cn, cp - cn
                dif = w0 - w1
                sp, sn, sa = (
                    _ref_sum(np.maximum(dif, 0)),
                    _ref_sum(np.maximum(-dif, 0)),
                    _ref_sum(np.abs(dif)) + EPS,
                )
                r[f"SUMP{d}"][t], r[f"SUMN{d}"][t], r[f"SUMD{d}"][t] = sp / sa, sn / sa, (sp - sn) / sa
                r[f"VMA{d}"][t] = _ref_mean(wvv) / (v[t] + EPS)
                r[f"VSTD{d}"][t] = _ref_std(wvv) / (v[t] + EPS)
                ww = _win(wv, t, d)
                r[f"WVMA{d}"][t] = _ref_std(ww) / (_ref_mean(ww) + EPS)
                vd = wvv - _win(v1, t, d)
                vp, vn, va = (
                    _ref_sum(np.maximum(vd, 0)),
                    _ref_sum(np.maximum(-vd, 0)),
                    _ref_sum(np.abs(vd)) + EPS,
                )
                r[f"VSUMP{d}"][t], r[f"VSUMN{d}"][t], r[f"VSUMD{d}"][t] = vp / va, vn / va, (vp - vn) / va
    return res


def alpha158_reference(
    wide: Mapping[str, pd.DataFrame], *, drop_vwap: bool = True
) -> dict[str, pd.DataFrame]:
    """Slow per-ticker Alpha158 (same output layout as :func:`alpha158`)."""
    _check_fields(wide)
    idx, cols = wide["close"].index, wide["close"].columns
    per = {}
    for j, tk in enumerate(cols):
        per[tk] = alpha158_reference_one(*(wide[f].iloc[:, j].to_numpy(dtype=np.float64) for f in FIELDS))
    names = [n for n in ALPHA158_NAMES if not (drop_vwap and n == "VWAP0" and "vwap" not in wide)]
    out = {}
    for n in names:
        if n == "VWAP0":
            vw = wide.get("vwap")
            arr = vw.to_numpy(dtype=np.float64) / wide["close"].to_numpy() if vw is not None else np.nan
            out[n] = pd.DataFrame(arr, index=idx, columns=cols)
        else:
            out[n] = pd.DataFrame(np.stack([per[tk][n] for tk in cols], axis=1), index=idx, columns=cols)
    return out
