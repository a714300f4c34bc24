"""S&P 500 panel loading, validation, labels, purged splits and the daily-batch DataModule.

Recipe after qlib (arXiv 2009.11189) as restated in ``docs/finance.md`` §3-4 and ``datasets/sp500_5yr.md``:
label ``close[t+2] / close[t+1] - 1``; processors fitted on the train window only; one trading day =
one batch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from apps.datadir import data_dir as resolve_data_dir
from apps.datadir import require_file
from apps.finance.features import FIELDS, cached_features
from apps.finance.processors import RobustZScoreNorm, cs_rank_norm, cs_zscore_norm

log = logging.getLogger(__name__)
progress = logging.getLogger("moekit.progress")  # stage lines of long steps; the moekit CLI shows them

PANEL_URL = "https://github.com/CNuge/kaggle-code/tree/f1109438d6cfb3ffdaa7d4480437cfbaaedd3236/stock_data/individual_stocks_5yr"
INDEX_URL = "https://github.com/fja05680/stock_market_calendar/blob/7041e86bf1f3a18c7b0a24a2fbb27031dc1388c5/%5EGSPC.csv"
PANEL_ROWS, PANEL_TICKERS = 619_040, 505
PANEL_SHA256 = (
    "a96979217198d040e81f0af39180cd27efccd8391be73c68c552fecc29237316"  # files concatenated in name order
)
INDEX_SHA256 = "baf4e47ab3d5f1328ab22772a836f3579af810d861a95742fd472f33ba180a7c"
# |r| > 30 % moves that are real market moves (``datasets/sp500_5yr.md``); every other such move is masked.
MARKET_MOVES = (
    ("STZ", "2013-02-14"),
    ("VRTX", "2013-04-19"),
    ("INCY", "2013-08-21"),
    ("VRTX", "2014-06-24"),
    ("MNST", "2014-08-15"),
    ("WMB", "2016-01-14"),
    ("WMB", "2016-02-08"),
    ("CHK", "2016-02-08"),
    ("CHK", "2016-04-12"),
    ("AMD", "2016-04-22"),
    ("EVHC", "2017-11-01"),
    ("SIG", "2017-11-21"),
)
COLS = ("date", "ticker", *FIELDS)


# ----------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------
def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    ren = {c: c.lower() for c in df.columns}
    df = df.rename(columns=ren).rename(columns={"name": "ticker", "instrument": "ticker", "datetime": "date"})
    missing = [c for c in COLS if c not in df.columns]
    if missing:
        raise ValueError(f"panel: missing column(s) {missing}; have {list(df.columns)}")
    df = df[list(COLS) + (["vwap"] if "vwap" in df.columns else [])].copy()
    df["date"] = pd.to_datetime(df["date"])
    df["ticker"] = df["ticker"].astype(str)
    for c in FIELDS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(np.float64)
    return df


def load_panel(source: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """Load a long OHLCV panel from a folder of per-ticker CSVs, one CSV/Parquet file, or a DataFrame.

    Returns:
        Long DataFrame with columns ``date, ticker, open, high, low, close, volume`` (``vwap`` if given).
    """
    if isinstance(source, pd.DataFrame):
        return _normalise(source)
    p = Path(source)
    if p.is_dir():
        files = sorted(p.glob("*.csv"))
        if not files:
            raise FileNotFoundError(f"panel: no *.csv files in {p}")
        return _normalise(pd.concat([pd.read_csv(f) for f in files], ignore_index=True))
    if not p.is_file():
        raise FileNotFoundError(f"panel: {p} not found")
    if p.suffix == ".parquet":
        return _normalise(pd.read_parquet(p))
    return _normalise(pd.read_csv(p))


def load_sp500_panel(data_dir: str | os.PathLike | None = None, *, verify: bool = True) -> pd.DataFrame:
    """The shipped ``sp500_5yr`` panel (505 per-ticker CSVs), checked by sha256 and row count."""
    folder = resolve_data_dir(data_dir) / "sp500_5yr" / "individual_stocks_5yr"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"sp500_5yr: folder {folder} not found; set MOEKIT_DATA or download {PANEL_URL}"
        )
    files = sorted(folder.glob("*.csv"))
    if verify:
        h = hashlib.sha256()
        for f in files:
            h.update(f.read_bytes())
        if h.hexdigest() != PANEL_SHA256:
            raise ValueError(
                f"sp500_5yr: sha256 mismatch for {folder} ({len(files)} files); re-download {PANEL_URL}"
            )
    df = load_panel(folder)
    if verify and (len(df) != PANEL_ROWS or df["ticker"].nunique() != PANEL_TICKERS):
        raise ValueError(
            f"sp500_5yr: expected {PANEL_ROWS} rows / {PANEL_TICKERS} tickers, got {len(df)} / "
            f"{df['ticker'].nunique()}"
        )
    return df


def load_index(
    data_dir: str | os.PathLike | None = None, *, start: str = "2013-02-08", end: str = "2018-02-07"
) -> pd.Series:
    """^GSPC close (``sp500_index/GSPC.csv``, sha256-checked) from ``start`` to ``end``, indexed by date."""
    path = require_file(
        resolve_data_dir(data_dir) / "sp500_index" / "GSPC.csv",
        sha256=INDEX_SHA256,
        url=INDEX_URL,
        what="sp500_index",
    )
    df = pd.read_csv(path, parse_dates=["Date"])
    s = df.set_index("Date")["Close"].astype(np.float64).loc[start:end]
    s.index.name = "date"
    return s


# ----------------------------------------------------------------------------------------------------------
# validation / cleaning
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Panel:
    """A validated panel on a trading calendar.

    Attributes:
        wide: field -> ``(days, tickers)`` DataFrame (NaN where no row).
        move_mask: ``(days, tickers)`` bool, True where the close-to-close return into that day is an absurd
            move (masked from labels and zeroed in the backtest).
        report: counts of everything validation touched.
    """

    wide: dict[str, pd.DataFrame]
    move_mask: pd.DataFrame
    report: dict[str, int] = field(default_factory=dict)

    @property
    def dates(self) -> pd.DatetimeIndex:
        return self.wide["close"].index

    @property
    def tickers(self) -> list[str]:
        return list(self.wide["close"].columns)


def validate_panel(
    df: pd.DataFrame,
    *,
    calendar: pd.DatetimeIndex | None = None,
    max_move: float = 0.30,
    allow_moves: tuple[tuple[str, str], ...] = MARKET_MOVES,
) -> Panel:
    """Validate and clean a long panel; warn with counts of everything touched.

    Rules: duplicated (ticker, date) -> keep the last; non-positive prices -> NaN; high < low or OHLC
    inconsistent -> clamp ``high >= max(o, c)``, ``low <= min(o, c)``; NaN fields counted (kept;
    features go NaN and are filled later); zero volume counted (kept); one-day
    ``|close/close_prev - 1| > max_move`` not on
    ``allow_moves`` -> flagged in ``move_mask`` (labels masked). Rows are reindexed to ``calendar`` (default:
    the union of dates).
    """
    df = _normalise(df)
    rep: dict[str, int] = {}
    dup = df.duplicated(["ticker", "date"], keep="last")
    rep["duplicated_rows"] = int(dup.sum())
    df = df[~dup]
    price = ["open", "high", "low", "close"]
    nonpos = df[price] <= 0
    rep["non_positive_prices"] = int(nonpos.to_numpy().sum())
    df[price] = df[price].mask(nonpos)
    rep["nan_fields"] = int(df[list(FIELDS)].isna().to_numpy().sum())
    rep["high_lt_low"] = int((df["high"] < df["low"]).sum())
    hi = df[["open", "high", "close"]].max(axis=1, skipna=True)
    lo = df[["open", "low", "close"]].min(axis=1, skipna=True)
    rep["ohlc_clamped"] = int(((df["high"] < hi) | (df["low"] > lo)).sum())
    df["high"] = df["high"].where(df["high"].isna(), hi)
    df["low"] = df["low"].where(df["low"].isna(), lo)
    rep["zero_volume"] = int((df["volume"] == 0).sum())
    if calendar is None:
        calendar = pd.DatetimeIndex(sorted(df["date"].unique()))
    extra = ~df["date"].isin(calendar)
    rep["rows_off_calendar"] = int(extra.sum())
    df = df[~extra]
    wide = {f: df.pivot(index="date", columns="ticker", values=f).reindex(calendar) for f in df.columns[2:]}
    wide = {f: w.astype(np.float64) for f, w in wide.items()}
    rep["missing_rows_inside_span"] = int(
        sum(((w.bfill().notna() & w.ffill().notna()) & w.isna()).to_numpy().sum() for w in [wide["close"]])
    )
    c = wide["close"]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = c / c.shift(1) - 1
    mm = r.abs() > max_move
    for tk, d in allow_moves:
        if tk in mm.columns and pd.Timestamp(d) in mm.index:
            mm.loc[pd.Timestamp(d), tk] = False
    rep["absurd_moves_masked"] = int(mm.to_numpy().sum())
    for k, n in rep.items():
        if n and k not in ("nan_fields",):
            warnings.warn(f"validate_panel: {k} = {n}", stacklevel=2)
    log.info("validate_panel: %s", rep)
    return Panel(wide=wide, move_mask=mm, report=rep)


def make_label(close: pd.DataFrame, move_mask: pd.DataFrame | None = None, horizon: int = 2) -> np.ndarray:
    """``label[t] = close[t+H] / close[t+H-1] - 1`` (qlib ``Ref($close,-2)/Ref($close,-1)-1`` for H = 2).

    Masked (NaN) where the return into ``t+H`` is flagged in ``move_mask``. Returns ``(days, tickers)``.
    """
    c = close.to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ret = c[1:] / c[:-1] - 1  # (days-1, tickers): return into day t+1
    if move_mask is not None:
        ret = np.where(move_mask.to_numpy()[1:], np.nan, ret)
    lab = np.full_like(c, np.nan)
    lab[: len(c) - horizon] = ret[horizon - 1 :]
    return lab


def daily_returns(close: pd.DataFrame, move_mask: pd.DataFrame | None = None) -> pd.DataFrame:
    """Close-to-close return into each day; NaN and flagged moves -> 0 (backtest input)."""
    r = close / close.shift(1) - 1
    if move_mask is not None:
        r = r.mask(move_mask)
    return r.fillna(0.0)


@dataclass
class Split:
    """Day indices of each segment (after warm-up and purge)."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


def purged_split(
    dates: pd.DatetimeIndex,
    *,
    train: tuple[str, str] = ("2013-02-08", "2015-12-31"),
    valid: tuple[str, str] = ("2016-01-01", "2016-12-31"),
    test: tuple[str, str] = ("2017-01-01", "2018-02-07"),
    horizon: int = 2,
    purge_days: int | None = None,
    warmup_days: int = 60,
) -> Split:
    """Time-ordered split, purging ``max(H, 5)`` days at the end of train and valid.

    The protocol and its indices on the shipped panel: ``datasets/sp500_5yr.md`` (Split).

    The first ``warmup_days`` trading days of the calendar are feature history only.
    """
    purge = max(horizon, 5) if purge_days is None else purge_days
    if purge < horizon:
        raise ValueError(f"purge_days={purge} < horizon={horizon}: labels would cross a segment boundary")
    seg = []
    for name, (a, b) in (("train", train), ("valid", valid), ("test", test)):
        idx = np.flatnonzero((dates >= pd.Timestamp(a)) & (dates <= pd.Timestamp(b)))
        if len(idx) == 0:
            raise ValueError(f"split: segment {name} {a}..{b} has no trading days")
        if name != "test":
            idx = idx[: max(len(idx) - purge, 0)]
        seg.append(idx)
    seg[0] = seg[0][seg[0] >= warmup_days]
    if not (seg[0].max() < seg[1].min() and seg[1].max() < seg[2].min()):
        raise ValueError("split: segments must be ordered train < valid < test")
    return Split(*seg)


# ----------------------------------------------------------------------------------------------------------
# raw panel -> network inputs (one path for training and serving)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class PanelTransform:
    """Raw panel -> network inputs, fitted on the train window.

    The one feature path of the app: :class:`SP500DataModule` builds its training inputs with it and the
    served predictor (``apps.finance.app``) applies the same fitted object to a raw panel window, so training
    and serving cannot drift apart.

    Steps: Alpha158/Alpha360 of the validated wide panel (:func:`validate_panel`), NaN where a ticker has no
    close that day, :class:`~apps.finance.processors.RobustZScoreNorm` fitted on the train days, NaN -> 0.

    Attributes:
        kind: ``alpha158`` (157 columns) or ``alpha360`` (300).
        norm: the fitted normalisation (None before :meth:`fit`).
    """

    kind: Literal["alpha158", "alpha360"] = "alpha158"
    norm: RobustZScoreNorm | None = None

    def features(self, wide: dict[str, pd.DataFrame], *, cache: bool = False) -> tuple[np.ndarray, list[str]]:
        """Raw features ``(days, tickers, F)`` float32 and their names; NaN where the close is missing."""
        x, names = cached_features(wide, kind=self.kind, cache=cache)  # (days, tickers, F)
        present = wide["close"].notna().to_numpy()  # (days, tickers)
        return np.where(present[..., None], x, np.nan), names

    def fit(self, x: np.ndarray, fit_days: np.ndarray, mask: np.ndarray | None = None) -> PanelTransform:
        """Fit the normalisation on ``x[fit_days]`` (x from :meth:`features`; fit_days ``(days,)`` bool;
        mask ``(days, tickers)`` bool: only these stock-days count, e.g. the universe)."""
        self.norm = RobustZScoreNorm(clip_outlier=True).fit(x, fit_days, mask)
        return self

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Features from :meth:`features` -> network inputs ``(days, tickers, F)``: normalised, NaN -> 0."""
        if self.norm is None:
            raise RuntimeError("PanelTransform.normalise called before fit")
        out = self.norm.transform(x)
        out[np.isnan(out)] = 0.0  # qlib's Fillna, in place
        return out

    def __call__(self, wide: dict[str, pd.DataFrame]) -> np.ndarray:
        """Network inputs ``(days, tickers, F)`` of a validated wide panel."""
        return self.normalise(self.features(wide)[0])


# ----------------------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------------------
class DayDataset(Dataset):
    """One item = one trading day (the cross-section).

    Item: ``x (N, T, F)`` features over the last ``step_len`` days, ``y (N,)`` learn label, ``y_raw (N,)`` raw
    label, ``tickers (N,)`` ticker ids, ``day ()`` day index. Stocks are those with a close that day (and,
    with ``drop_nan_label``, a non-NaN learn label — qlib's DropnaLabel).
    """

    def __init__(
        self,
        *,
        x: np.ndarray,
        y: np.ndarray,
        y_raw: np.ndarray,
        present: np.ndarray,
        days: np.ndarray,
        step_len: int = 1,
        drop_nan_label: bool = False,
    ) -> None:
        self.x, self.y, self.y_raw, self.present = x, y, y_raw, present
        self.days, self.step_len, self.drop_nan_label = np.asarray(days), step_len, drop_nan_label
        keep = [d for d in self.days if self._stocks(d).size >= 2]
        self.days = np.asarray(keep, dtype=np.int64)

    def _stocks(self, d: int) -> np.ndarray:
        ok = self.present[d]
        if self.drop_nan_label:
            ok = ok & ~np.isnan(self.y[d])
        return np.flatnonzero(ok)

    def __len__(self) -> int:
        return len(self.days)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d = int(self.days[i])
        s = self._stocks(d)
        lo = d - self.step_len + 1
        if lo >= 0:
            win = self.x[lo : d + 1, s]  # (T, N, F)
        else:  # left-pad with zeros (normalised + Fillna space) like TSDatasetH's padding
            win = np.concatenate([np.zeros((-lo, len(s), self.x.shape[-1]), np.float32), self.x[: d + 1, s]])
        return {
            "x": torch.from_numpy(np.ascontiguousarray(win.transpose(1, 0, 2))),  # (N, T, F)
            "y": torch.from_numpy(np.nan_to_num(self.y[d, s]).astype(np.float32)),
            "y_raw": torch.from_numpy(self.y_raw[d, s].astype(np.float32)),
            "tickers": torch.from_numpy(s.astype(np.int64)),
            "day": torch.tensor(d),
        }


class _DayPanelLoaders(L.LightningDataModule):
    """Loaders and the tabular view shared by the panel data modules; a subclass's ``setup`` sets
    ``x (days, tickers, F)``, ``y``/``y_raw (days, tickers)``, ``present (days, tickers)``, ``split`` and
    ``step_len``."""

    def _ds(self, days: np.ndarray, train: bool) -> DayDataset:
        return DayDataset(
            x=self.x,
            y=self.y,
            y_raw=self.y_raw,
            present=self.present,
            days=days,
            step_len=self.step_len,
            drop_nan_label=train,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._ds(self.split.train, True), batch_size=None, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._ds(self.split.valid, False), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._ds(self.split.test, False), batch_size=None)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def flat(
        self, days: np.ndarray, *, train: bool, y: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tabular view for tree models: ``X (S, F)``, learn label, raw label, ``(day, ticker)`` index.
        ``y``: another ``(days, tickers)`` learn label instead of ``self.y`` (e.g. another normalisation)."""
        y = self.y if y is None else y
        d, t = np.nonzero(self.present[days])
        d = days[d]
        if train:
            ok = ~np.isnan(y[d, t])
            d, t = d[ok], t[ok]
        return self.x[d, t], y[d, t], self.y_raw[d, t], np.stack([d, t], 1)


class SP500DataModule(_DayPanelLoaders):
    """Protocol C of ``docs/finance.md`` §0: shipped S&P 500 panel, Alpha158/Alpha360, purged daily splits.

    Args:
        data_dir: folder with ``sp500_5yr/`` and ``sp500_index/`` (default ``apps.datadir.data_dir()``).
        source: optional own panel (folder of CSVs, CSV or Parquet file); then ``data_dir`` is only used for
            the index and no checksum is enforced.
        features: ``alpha158`` (157 columns without VWAP0) or ``alpha360`` (300).
        step_len: days of feature history per sample (T); 1 for tabular models.
        label_norm: cross-sectional learn-label normalisation (``csrank`` = CSRankNorm, ``cszscore``).
        horizon: label horizon H (2 = qlib's label).
        train/valid/test: date ranges (inclusive) before purging.
        warmup_days: leading calendar days used only as feature history.
        max_tickers: keep only the first n tickers (alphabetical) — for tiny configs/tests.
        max_move: absurd one-day move threshold.
        cache: cache features as Parquet under ``cache_dir('finance')``.
    """

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        source: str | None = None,
        features: Literal["alpha158", "alpha360"] = "alpha158",
        step_len: int = 1,
        label_norm: Literal["csrank", "cszscore"] = "csrank",
        horizon: int = 2,
        train: tuple[str, str] = ("2013-02-08", "2015-12-31"),
        valid: tuple[str, str] = ("2016-01-01", "2016-12-31"),
        test: tuple[str, str] = ("2017-01-01", "2018-02-07"),
        warmup_days: int = 60,
        max_tickers: int | None = None,
        max_move: float = 0.30,
        cache: bool = True,
    ) -> None:
        super().__init__()
        if features not in ("alpha158", "alpha360"):
            raise ValueError(f"features must be 'alpha158' or 'alpha360', got {features!r}")
        if label_norm not in ("csrank", "cszscore"):
            raise ValueError(f"label_norm must be 'csrank' or 'cszscore', got {label_norm!r}")
        if step_len < 1:
            raise ValueError(f"step_len must be >= 1, got {step_len}")
        self.save_hyperparameters()
        self.data_dir, self.source, self.kind, self.step_len = data_dir, source, features, step_len
        self.label_norm, self.horizon, self.max_tickers, self.max_move = (
            label_norm,
            horizon,
            max_tickers,
            max_move,
        )
        self.ranges, self.warmup_days, self.cache = (train, valid, test), warmup_days, cache
        self._ready = False
        self.transform = PanelTransform(kind=features)  # fitted in setup()

    @property
    def num_features(self) -> int:
        return 157 if self.kind == "alpha158" else 300

    @property
    def norm(self) -> RobustZScoreNorm | None:
        """The fitted feature normalisation (part of :attr:`transform`)."""
        return self.transform.norm

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        bench = load_index(self.data_dir)
        raw = load_panel(self.source) if self.source else load_sp500_panel(self.data_dir)
        if self.max_tickers:
            keep = sorted(raw["ticker"].unique())[: self.max_tickers]
            raw = raw[raw["ticker"].isin(keep)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            panel = validate_panel(raw, calendar=pd.DatetimeIndex(bench.index), max_move=self.max_move)
        self.panel, self.bench = panel, bench
        start = time.perf_counter()
        days, tickers = panel.wide["close"].shape
        progress.info("finance: %s features for %d days x %d tickers ...", self.kind, days, tickers)
        x, self.feature_names = self.transform.features(panel.wide, cache=self.cache)  # (days, tickers, F)
        progress.info("finance: features ready (%.1f s)", time.perf_counter() - start)
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {x.shape[-1]}")
        self.split = purged_split(
            panel.dates,
            train=self.ranges[0],
            valid=self.ranges[1],
            test=self.ranges[2],
            horizon=self.horizon,
            warmup_days=self.warmup_days,
        )
        fit_days = np.zeros(len(panel.dates), bool)
        fit_days[self.split.train] = True
        self.transform.fit(x, fit_days)
        self.x = self.transform.normalise(x)  # (days, tickers, F)
        present = panel.wide["close"].notna().to_numpy()
        self.y_raw = make_label(panel.wide["close"], panel.move_mask, self.horizon)  # (days, tickers)
        self.y = cs_rank_norm(self.y_raw) if self.label_norm == "csrank" else cs_zscore_norm(self.y_raw)
        self.present = present
        self._ready = True


# ----------------------------------------------------------------------------------------------------------
# any market: qlib provider folders and daily-bar folders (apps.finance.sources)
# ----------------------------------------------------------------------------------------------------------
def next_tradable_label(
    close: pd.DataFrame, tradable: pd.DataFrame, horizon: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """qlib's label ``close(t+H)/close(t+H-1) - 1`` on tradable closes: steps skip non-tradable days.

    ``n(t)`` = the first tradable day after t; the label of day t is ``close[n^H(t)] / close[n^(H-1)(t)] - 1``
    (for H = 2: bought at the next tradable close, sold at the one after), so the return across a suspension
    is kept, not dropped. Returns ``label (days, tickers)`` and ``end (days, tickers)`` int, the day index of
    the last price the label uses (``-1`` where the label is NaN), for purging at segment ends.
    """
    c = close.to_numpy(dtype=np.float64)
    ok = tradable.to_numpy() & np.isfinite(c)
    T, N = c.shape
    big = T  # "no tradable day"
    idx = np.where(ok, np.arange(T)[:, None], big)  # (T, N)
    # nxt[t] = first tradable index > t: suffix minimum of idx over s > t
    suf = np.minimum.accumulate(idx[::-1], axis=0)[::-1]  # suf[t] = min over s >= t
    nxt = np.vstack([suf[1:], np.full((1, N), big)])  # (T, N)
    cols = np.arange(N)[None, :]
    prev = np.broadcast_to(np.arange(T)[:, None], (T, N)).copy()
    cur = prev
    for _ in range(horizon - 1):
        cur = np.where(cur < big, nxt[np.minimum(cur, T - 1), cols], big)
    a = cur  # n^(H-1)(t)
    b = np.where(a < big, nxt[np.minimum(a, T - 1), cols], big)  # n^H(t)
    valid = (a < big) & (b < big)
    if horizon == 1:
        a = np.broadcast_to(np.arange(T)[:, None], (T, N))
        valid = (b < big) & ok
    ca = np.where(valid, c[np.minimum(a, T - 1), cols], np.nan)
    cb = np.where(valid, c[np.minimum(b, T - 1), cols], np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        lab = cb / ca - 1
    return lab, np.where(valid, b, -1)


class MarketDataModule(_DayPanelLoaders):
    """Any market's daily bars -> Alpha158/Alpha360 -> daily cross-sections (qlib's recipe, arXiv 2009.11189).

    The calendar and the benchmark come from the data (``docs/finance.md``, "Bring your own market"):
    a qlib provider folder (``source: qlib``) or a folder of CSV/Parquet bars with a column mapping
    (``source: bars``). The universe of day t is the market's membership that day (qlib spells; for bars,
    every ticker with a bar) among the tradable stocks (close and volume > 0).

    Args:
        path: the data folder (relative paths are looked up under ``data_dir`` when not found as given).
        source: ``qlib`` or ``bars``.
        market: qlib instruments file stem (``csi300``); unused for bars.
        benchmark: an index instrument/ticker of the data (``SH000300``) or ``equal_weight``.
        columns: bars column mapping (keys of :class:`~apps.finance.sources.ColumnMap`), e.g.
            ``{ticker: code, date: trade_date, volume: vol, volume_unit: 100}``.
        period: ``(start, end)`` of the data used (inclusive); None = all the data. Days outside are not used
            and their count is logged.
        train, valid, test: segments (inclusive) before purging.
        rules: market preset of the backtest (``us`` or ``cn``, :mod:`apps.finance.backtest`).
        features: ``alpha158`` (158 with VWAP, 157 without) or ``alpha360``.
        feature_norm: ``robust_zscore`` (qlib's RobustZScoreNorm fitted on the train universe, clip to
            [-3, 3], Fillna 0: the networks' inputs) or ``none`` (raw features, NaN kept: qlib's LightGBM
            handler has no feature processors).
        step_len: T. label_norm: ``cszscore`` (qlib's tree/MLP configs) or ``csrank``. horizon: H.
        label_scope: the stocks each day's learn label is normalised over: ``universe`` (the day's
            membership, as qlib's processors on the handler's instruments) or ``market`` (every tradable
            stock of the data with a label that day: for a qlib market, every instrument its file lists, in
            the index that day or not). The universe's rows are the only training rows either way; test
            metrics use the raw label.
        warmup_days: leading days used only as feature history.
        max_instruments: keep the first n instruments (tests).
        max_move: one-day moves beyond this are masked from labels (relistings, glitches); None = keep all.
        data_dir: root of the data sets (default ``apps.datadir.data_dir()``).
        cache: cache the feature array (float32 ``.npy``) under ``cache_dir('finance')``.
    """

    def __init__(
        self,
        *,
        path: str,
        source: Literal["qlib", "bars"] = "bars",
        market: str | None = None,
        benchmark: str = "equal_weight",
        columns: dict[str, str | float | None] | None = None,
        period: tuple[str, str] | None = None,
        train: tuple[str, str],
        valid: tuple[str, str],
        test: tuple[str, str],
        rules: Literal["us", "cn"] = "us",
        features: Literal["alpha158", "alpha360"] = "alpha158",
        feature_norm: Literal["robust_zscore", "none"] = "robust_zscore",
        step_len: int = 1,
        label_norm: Literal["csrank", "cszscore"] = "cszscore",
        label_scope: Literal["universe", "market"] = "universe",
        horizon: int = 2,
        warmup_days: int = 60,
        max_instruments: int | None = None,
        max_move: float | None = 0.30,
        data_dir: str | None = None,
        cache: bool = False,
    ) -> None:
        super().__init__()
        if label_scope not in ("universe", "market"):
            raise ValueError(f"label_scope must be 'universe' or 'market', got {label_scope!r}")
        self.label_scope = label_scope
        if source not in ("qlib", "bars"):
            raise ValueError(f"source must be 'qlib' or 'bars', got {source!r}")
        if features not in ("alpha158", "alpha360"):
            raise ValueError(f"features must be 'alpha158' or 'alpha360', got {features!r}")
        if label_norm not in ("csrank", "cszscore"):
            raise ValueError(f"label_norm must be 'csrank' or 'cszscore', got {label_norm!r}")
        if rules not in ("us", "cn"):
            raise ValueError(f"rules must be 'us' or 'cn', got {rules!r}")
        if feature_norm not in ("robust_zscore", "none"):
            raise ValueError(f"feature_norm must be 'robust_zscore' or 'none', got {feature_norm!r}")
        self.feature_norm = feature_norm
        if step_len < 1:
            raise ValueError(f"step_len must be >= 1, got {step_len}")
        self.save_hyperparameters()
        self.path, self.source, self.market, self.benchmark = path, source, market, benchmark
        self.columns = dict(columns or {})
        self.period, self.ranges, self.rules = period, (train, valid, test), rules
        self.kind, self.step_len, self.label_norm, self.horizon = features, step_len, label_norm, horizon
        self.warmup_days, self.max_instruments, self.max_move = warmup_days, max_instruments, max_move
        self.data_dir, self.cache = data_dir, cache
        self.transform = PanelTransform(kind=features)
        self.feature_names: list[str] = []
        self._ready = False

    def resolved_path(self) -> Path:
        """``path`` as given (relative to the current directory), else under the data dir.

        Raises:
            FileNotFoundError: a relative path found in neither place (both are named).
        """
        p = Path(self.path).expanduser()
        if p.exists() or p.is_absolute():
            return p
        under = resolve_data_dir(self.data_dir) / p
        if not under.exists():
            raise FileNotFoundError(
                f"{self.source}: data path {self.path!r} not found: looked for {Path.cwd() / p} (relative to "
                f"the current directory) and {under} (under the data dir; set data_dir or MOEKIT_DATA)"
            )
        return under

    def read(self):  # noqa: ANN201 - MarketData
        """The market as read (:class:`~apps.finance.sources.MarketData`), without features."""
        from apps.finance.sources import ColumnMap, read_market

        return read_market(
            source=self.source,
            path=self.resolved_path(),
            market=self.market,
            benchmark=self.benchmark,
            columns=ColumnMap(**self.columns) if self.source == "bars" else None,
            period=self.period,
            max_instruments=self.max_instruments,
        )

    @property
    def num_features(self) -> int:
        """Feature count, from the data (158 with VWAP, 157 without); known after :meth:`setup`."""
        if not self._ready:
            raise RuntimeError(
                "MarketDataModule.num_features is known after setup() (it comes from the data)"
            )
        return len(self.feature_names)

    @property
    def bench(self) -> pd.Series:
        return self.panel.bench

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        md = self.read()
        c = md.tradable_close()
        with np.errstate(invalid="ignore", divide="ignore"):
            r = c / c.ffill().shift(1) - 1
        md.move_mask = (r.abs() > self.max_move) if self.max_move is not None else r.isna() & False
        md.report["absurd_moves_masked"] = int(md.move_mask.to_numpy().sum())
        self.panel = md
        wide = {k: v for k, v in md.wide.items() if k in (*FIELDS, "vwap")}
        days, tickers = md.wide["close"].shape
        start = time.perf_counter()
        vw = "with VWAP (158 features)" if md.has_vwap else "without VWAP: VWAP0 left out (157 features)"
        progress.info("finance: %s for %d days x %d tickers %s ...", self.kind, days, tickers, vw)
        x, self.feature_names = cached_features(wide, kind=self.kind, cache=self.cache)  # (days, tickers, F)
        progress.info(
            "finance: %d features ready in %.1f s (%.0f MB float32)",
            len(self.feature_names),
            time.perf_counter() - start,
            x.nbytes / 2**20,
        )
        self.split = purged_split(
            md.dates,
            train=self.ranges[0],
            valid=self.ranges[1],
            test=self.ranges[2],
            horizon=self.horizon,
            warmup_days=self.warmup_days,
        )
        present = (md.universe & md.tradable).to_numpy()  # (days, tickers)
        x[~md.wide["close"].notna().to_numpy()] = np.nan  # in place: no second (days, tickers, F) copy
        fit_days = np.zeros(days, bool)
        fit_days[self.split.train] = True
        if self.feature_norm == "none":
            x[np.isinf(x)] = np.nan
            self.x = x  # raw, NaN kept (tree models)
        else:
            # the normalisation sees the train days' universe only (qlib fits on the handler's instruments)
            self.transform.fit(x, fit_days, present)
            self.x = self.transform.normalise(x)
        del x
        lab, end = next_tradable_label(md.wide["close"], md.tradable, self.horizon)
        mm = md.move_mask.to_numpy()
        # mask labels that use a flagged move (the move into the sell day)
        T = len(md.dates)
        cols = np.arange(tickers)[None, :]
        flagged = np.where(end >= 0, mm[np.clip(end, 0, T - 1), cols], False)
        lab[flagged] = np.nan
        # purge: no train/valid label may use a price beyond its segment's last day
        seg_end = np.full(T, T - 1)
        for seg in (self.split.train, self.split.valid):
            if len(seg):
                lo, hi = seg.min(), seg.max()
                nxt = self.split.valid.min() if seg is self.split.train else self.split.test.min()
                seg_end[lo : hi + 1] = nxt - 1
        lab[(end > seg_end[:, None])] = np.nan
        self.y_raw = lab
        # the learn label is normalised over each day's universe (qlib's CSZScoreNorm / CSRankNorm run on the
        # handler's instruments) or (label_scope="market") over every tradable instrument with a label
        lab_u = np.where(present if self.label_scope == "universe" else md.tradable.to_numpy(), lab, np.nan)
        self.y = cs_rank_norm(lab_u) if self.label_norm == "csrank" else cs_zscore_norm(lab_u)
        self.present = present
        self._ready = True

    def backtest(self, preds: pd.DataFrame, *, segment: str | None = "test", **kw):  # noqa: ANN201
        """TopK-Dropout of a predictions table (``date, ticker, score``) on this market with its rules."""
        from apps.finance.backtest import backtest_market

        if segment is not None and "segment" in preds.columns:
            preds = preds[preds["segment"] == segment]
        return backtest_market(preds, self.panel, rules=self.rules, **kw)
