"""Market data sources for the finance app: qlib provider folders and CSV/Parquet daily-bar folders.

qlib (arXiv 2009.11189) file storage, read without qlib:

* ``calendars/day.txt``: one ``YYYY-MM-DD`` per line; line k is calendar index k.
* ``instruments/<market>.txt``: ``INSTRUMENT<TAB>start<TAB>end`` membership spells (inclusive; one
  instrument may have several lines). The universe of day t = the instruments with a spell covering t.
* ``features/<INST>/<field>.day.bin``: little-endian float32; value 0 is the calendar index of the first
  value (stored as a float), then one value per calendar day, contiguous.

Daily-bar folders: one or many ``*.csv`` / ``*.parquet`` files, one row per (ticker, day); the column mapping
(:class:`ColumnMap`) names the user's columns. See ``docs/finance.md`` ("Bring your own market").

Both produce a :class:`MarketData`: wide ``(days, tickers)`` fields on the data's own calendar, the universe
of each day, the tradable mask and the benchmark series (a named index in the data, or an equal-weight market
built from the panel). Data problems are counted and surfaced as ``UserWarning`` naming file, ticker and date.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
progress = logging.getLogger("moekit.progress")

PRICE_FIELDS = ("open", "high", "low", "close")
BAR_FIELDS = (*PRICE_FIELDS, "volume")
EQUAL_WEIGHT = "equal_weight"


class DataWarning(UserWarning):
    """A data problem that was repaired or skipped (counted in :attr:`MarketData.report`)."""


@dataclass
class MarketData:
    """A market on its own trading calendar.

    Attributes:
        wide: field -> ``(days, tickers)`` float64 DataFrame: ``open, high, low, close`` (adjusted prices),
            ``volume`` (shares), optionally ``vwap`` (adjusted) and ``factor`` (adjusted = raw x factor).
        universe: ``(days, tickers)`` bool, the cross-section of each day (membership spells for qlib markets,
            every ticker with a bar for bar folders).
        tradable: ``(days, tickers)`` bool, a real trade happened (close finite and volume > 0). Prices of
            non-tradable days may be stale (qlib forward-fills suspensions) and are never traded on.
        bench: benchmark close (index level) on the calendar; ``bench_name`` says which.
        report: counts of every data problem found, by key: ``non_tradable_days`` (universe days without a
            trade, any cause), ``missing_bars_in_span`` (days between a ticker's first and last bar with no
            bar: suspensions, holes; days before listing and after delisting are not counted),
            ``zero_volume_days`` (a bar with a close but zero or missing volume: no trade),
            ``listed_after_start`` / ``delisted_before_end`` (tickers whose first bar is after the
            calendar's first day / last bar before its last day), plus the repaired problems
            (``negative_values``, ``missing_values``, ``non_positive_prices``, ``duplicated_dates``, ...).
        messages: the warnings issued (file / ticker / date named).
    """

    wide: dict[str, pd.DataFrame]
    universe: pd.DataFrame
    tradable: pd.DataFrame
    bench: pd.Series
    bench_name: str
    report: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    move_mask: pd.DataFrame | None = None

    @property
    def dates(self) -> pd.DatetimeIndex:
        return self.wide["close"].index

    @property
    def tickers(self) -> list[str]:
        return list(self.wide["close"].columns)

    @property
    def has_vwap(self) -> bool:
        return "vwap" in self.wide

    def tradable_close(self) -> pd.DataFrame:
        """Close on tradable days, NaN elsewhere ``(days, tickers)``."""
        return self.wide["close"].where(self.tradable)

    def returns(self) -> pd.DataFrame:
        """Return into each tradable day from the previous tradable close (kept across suspensions).

        NaN on non-tradable days (nothing can be traded; a held position earns 0 then the whole return
        across the suspension on the day trading resumes); 0 on a ticker's first tradable day.
        """
        c = self.tradable_close()
        prev = c.ffill().shift(1)
        r = c / prev - 1
        return r.where(self.tradable, np.nan).where(~(self.tradable & r.isna()), 0.0)

    def bench_returns(self) -> pd.Series:
        return self.bench.pct_change().fillna(0.0)

    def select(self, tickers: list[str]) -> MarketData:
        """The same market restricted to ``tickers`` (benchmark unchanged)."""
        return MarketData(
            wide={k: v[tickers] for k, v in self.wide.items()},
            universe=self.universe[tickers],
            tradable=self.tradable[tickers],
            bench=self.bench,
            bench_name=self.bench_name,
            report=dict(self.report),
            messages=list(self.messages),
            move_mask=None if self.move_mask is None else self.move_mask[tickers],
        )


def _warn(
    md_report: dict[str, int], messages: list[str], key: str, n: int, msg: str, *, stacklevel: int = 3
) -> None:
    md_report[key] = md_report.get(key, 0) + n
    messages.append(msg)
    warnings.warn(msg, DataWarning, stacklevel=stacklevel)


def _warn_rows(
    md_report: dict[str, int], messages: list[str], key: str, rows: pd.DataFrame, what: str
) -> None:
    """:func:`_warn` about ``rows`` of the bars table, naming the first one's file, ticker and date."""
    first = rows.iloc[0]
    _warn(
        md_report,
        messages,
        key,
        len(rows),
        f"bars: {len(rows)} {what} (first: file {first['_file']}, ticker {first['ticker']}, "
        f"date {first['date'].date()})",
        stacklevel=4,  # the reader's caller, as for the other data warnings
    )


def equal_weight_index(close: pd.DataFrame, tradable: pd.DataFrame, universe: pd.DataFrame) -> pd.Series:
    """Equal-weight market level: cumulative product of the day's mean return over the universe's tradable
    stocks (return from each stock's previous tradable close). Starts at 1.0."""
    c = close.where(tradable)
    r = (c / c.ffill().shift(1) - 1).where(universe & tradable)
    mean = r.mean(axis=1).fillna(0.0)
    return (1 + mean).cumprod().rename(EQUAL_WEIGHT)


# ----------------------------------------------------------------------------------------------------------
# qlib provider folder
# ----------------------------------------------------------------------------------------------------------
def read_qlib_calendar(root: str | os.PathLike, freq: str = "day") -> pd.DatetimeIndex:
    path = Path(root) / "calendars" / f"{freq}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"qlib provider {root}: calendar file {path} not found")
    lines = path.read_text().split()
    if not lines:
        raise ValueError(f"qlib provider: calendar file {path} is empty")
    cal = pd.DatetimeIndex(pd.to_datetime(lines, format="%Y-%m-%d"))
    if not cal.is_monotonic_increasing or cal.has_duplicates:
        raise ValueError(f"qlib provider: calendar file {path} is not strictly ascending")
    return cal


def read_qlib_instruments(root: str | os.PathLike, market: str) -> pd.DataFrame:
    """Membership spells of ``instruments/<market>.txt`` as ``instrument, start, end`` rows."""
    path = Path(root) / "instruments" / f"{market}.txt"
    if not path.is_file():
        have = sorted(p.stem for p in (Path(root) / "instruments").glob("*.txt"))
        raise FileNotFoundError(f"qlib provider: market file {path} not found; markets here: {have}")
    df = pd.read_csv(path, sep="\t", header=None, names=["instrument", "start", "end"], dtype=str)
    bad = df["end"].isna() | df["start"].isna()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"qlib provider: {path} line {i + 1}: expected INSTRUMENT<TAB>start<TAB>end")
    df["start"] = pd.to_datetime(df["start"], format="%Y-%m-%d")
    df["end"] = pd.to_datetime(df["end"], format="%Y-%m-%d")
    return df


def _feature_path(root: Path, inst: str, name: str) -> Path | None:
    for d in (inst, inst.lower(), inst.upper()):
        p = root / "features" / d / f"{name}.day.bin"
        if p.is_file():
            return p
    return None


def read_qlib_bin(path: str | os.PathLike, n_days: int) -> np.ndarray:
    """One ``<field>.day.bin`` on a calendar of ``n_days``: ``(n_days,)`` float64, NaN outside the series."""
    a = np.fromfile(path, dtype="<f4")
    if a.size == 0:
        raise ValueError(f"qlib provider: {path} is empty (expected a start index then values)")
    start = int(a[0])
    vals = a[1:].astype(np.float64)
    if start < 0 or start + len(vals) > n_days:
        raise ValueError(
            f"qlib provider: {path} covers calendar index {start}..{start + len(vals) - 1}, "
            f"outside the calendar's 0..{n_days - 1}"
        )
    out = np.full(n_days, np.nan)
    out[start : start + len(vals)] = vals
    return out


def read_qlib(
    root: str | os.PathLike,
    *,
    market: str = "all",
    benchmark: str = EQUAL_WEIGHT,
    fields: tuple[str, ...] = ("open", "high", "low", "close", "volume", "factor", "vwap"),
    period: tuple[str, str] | None = None,
    max_instruments: int | None = None,
) -> MarketData:
    """Read a qlib provider folder.

    Args:
        root: the provider folder (``calendars/``, ``instruments/``, ``features/``).
        market: instruments file stem (``csi300``); its spells define the universe of each day.
        benchmark: an instrument of ``features/`` whose close is the benchmark (``SH000300``), or
            ``equal_weight`` (mean daily return of the universe's tradable stocks).
        fields: fields to read; ``open, high, low, close, volume`` are required, others are optional (vwap is
            read when the folder has it, giving Alpha158's VWAP0).
        period: ``(start, end)`` dates kept (inclusive); None = the whole calendar.
        max_instruments: keep the first n instruments in name order (tests, small configs).

    Returns:
        :class:`MarketData` on the provider's calendar (restricted to ``period``).
    """
    root = Path(root)
    cal = read_qlib_calendar(root)
    spells = read_qlib_instruments(root, market)
    insts = sorted(spells["instrument"].unique())
    report: dict[str, int] = {}
    messages: list[str] = []
    missing = [i for i in insts if _feature_path(root, i, "close") is None]
    if missing:
        _warn(
            report,
            messages,
            "instruments_without_features",
            len(missing),
            f"qlib provider {root}: {len(missing)} of {len(insts)} instruments of market {market!r} have no "
            f"features/<inst>/close.day.bin and are left out (e.g. {missing[:5]})",
        )
    insts = [i for i in insts if i not in set(missing)]
    if max_instruments:
        insts = insts[:max_instruments]
    if not insts:
        raise ValueError(f"qlib provider {root}: no instrument of market {market!r} has feature files")
    n = len(cal)
    progress.info("finance: reading %d instruments x %d days from %s ...", len(insts), n, root)
    wide: dict[str, pd.DataFrame] = {}
    for f in fields:
        paths = [_feature_path(root, i, f) for i in insts]
        have = [p is not None for p in paths]
        if not any(have):
            if f in BAR_FIELDS:
                raise ValueError(f"qlib provider {root}: no instrument has field {f!r} ({f}.day.bin)")
            continue
        if not all(have) and f in BAR_FIELDS:
            bad = [i for i, h in zip(insts, have, strict=True) if not h]
            raise ValueError(
                f"qlib provider {root}: features/{bad[0]}/{f}.day.bin missing ({len(bad)} instruments)"
            )
        arr = np.full((n, len(insts)), np.nan)
        for j, p in enumerate(paths):
            if p is not None:
                arr[:, j] = read_qlib_bin(p, n)
        wide[f] = pd.DataFrame(arr, index=cal, columns=insts)
    univ = np.zeros((n, len(insts)), bool)
    col = {i: j for j, i in enumerate(insts)}
    pos = np.arange(n)
    for inst, a, b in spells.itertuples(index=False):
        j = col.get(inst)
        if j is None:
            continue
        univ[:, j] |= (cal >= a) & (cal <= b)
    universe = pd.DataFrame(univ, index=cal, columns=insts)
    del pos
    if benchmark == EQUAL_WEIGHT:
        bench = None
    else:
        p = _feature_path(root, benchmark, "close")
        if p is None:
            raise FileNotFoundError(
                f"qlib provider {root}: benchmark {benchmark!r} has no features/{benchmark}/close.day.bin "
                f"(name an index instrument of the folder, or use benchmark: equal_weight)"
            )
        bench = pd.Series(read_qlib_bin(p, n), index=cal, name=benchmark)
    return _finish(wide, universe, bench, benchmark, report, messages, period, where=str(root))


def _finish(
    wide: dict[str, pd.DataFrame],
    universe: pd.DataFrame,
    bench: pd.Series | None,
    bench_name: str,
    report: dict[str, int],
    messages: list[str],
    period: tuple[str, str] | None,
    *,
    where: str,
) -> MarketData:
    """Period cut (reported), non-positive prices, tradable mask, benchmark (shared by both readers)."""
    dates = wide["close"].index
    if period is not None:
        a, b = pd.Timestamp(period[0]), pd.Timestamp(period[1])
        keep = (dates >= a) & (dates <= b)
        n_out = int((~keep).sum())
        if not keep.any():
            raise ValueError(f"{where}: no trading day inside period {period[0]}..{period[1]}")
        progress.info(
            "finance: period %s..%s keeps %d of %d calendar days (%d outside the period not used)",
            period[0],
            period[1],
            int(keep.sum()),
            len(dates),
            n_out,
        )
        report["days_outside_period"] = n_out
        wide = {k: v.loc[keep] for k, v in wide.items()}
        universe = universe.loc[keep]
        if bench is not None:
            bench = bench.loc[keep]
        dates = wide["close"].index
    price = [f for f in (*PRICE_FIELDS, "vwap") if f in wide]
    for f in price:
        bad = wide[f] <= 0
        nb = int(bad.to_numpy().sum())
        if nb:
            d, t = np.nonzero(bad.to_numpy())
            _warn(
                report,
                messages,
                "non_positive_prices",
                nb,
                f"{where}: {nb} non-positive {f} value(s) set to NaN (first: ticker {wide[f].columns[t[0]]}, "
                f"date {wide[f].index[d[0]].date()})",
            )
            wide[f] = wide[f].mask(bad)
    vol = wide["volume"]
    has_bar = wide["close"].notna()
    tradable = has_bar & vol.notna() & (vol > 0)
    report["non_tradable_days"] = int((universe & ~tradable).to_numpy().sum())
    bar = has_bar.to_numpy()
    T = len(bar)
    first = np.where(bar.any(0), bar.argmax(0), T)  # (tickers,) first bar
    last = np.where(bar.any(0), T - 1 - bar[::-1].argmax(0), -1)  # (tickers,) last bar
    day = np.arange(T)[:, None]
    in_span = (day >= first[None, :]) & (day <= last[None, :])  # (days, tickers) first..last bar
    report["missing_bars_in_span"] = int((in_span & ~bar).sum())
    report["zero_volume_days"] = int((has_bar & ~tradable).to_numpy().sum())
    report["listed_after_start"] = int(((first > 0) & (first < T)).sum())
    report["delisted_before_end"] = int(((last >= 0) & (last < T - 1)).sum())
    if bench is None:
        bench = equal_weight_index(wide["close"], tradable, universe | tradable)
    else:
        nb = int(bench.isna().sum())
        if nb:
            _warn(
                report,
                messages,
                "benchmark_missing_days",
                nb,
                f"{where}: benchmark {bench_name!r} has no close on {nb} calendar day(s) "
                f"(first {bench.index[bench.isna()][0].date()}); its return there is taken as 0",
            )
            bench = bench.ffill().bfill()
    return MarketData(
        wide=wide,
        universe=universe.astype(bool),
        tradable=tradable,
        bench=bench.astype(np.float64),
        bench_name=bench_name,
        report=report,
        messages=messages,
    )


# ----------------------------------------------------------------------------------------------------------
# CSV / Parquet daily-bar folders
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnMap:
    """How a user's daily-bar files name their columns (each value = the user's column name).

    Args:
        ticker: the ticker column; None = one file per ticker, the ticker is the file name's stem.
        date: the date column: ISO strings, datetimes, or ``YYYYMMDD`` integers/strings (parsed as dates,
            never as epoch numbers).
        open, high, low, close: price columns.
        volume: volume column, in units of ``volume_unit`` shares (e.g. 100 for China's lots "手").
        amount: optional traded value (currency); gives VWAP = amount / (volume x volume_unit) when no vwap.
        vwap: optional VWAP column.
        factor: optional cumulative adjustment factor; adjusted price = raw price x factor.
        prev_close: optional previous close on the day's own (ex-dividend) basis (``pre_close``); gives the
            back-adjustment factor cumprod(close_{t-1} / prev_close_t).
        st: optional boolean "special treatment" column (China's 5 % limit).
        date_format: strptime format of the date column (default: ISO or ``YYYYMMDD``, detected).
        volume_unit: shares per volume unit.
        amount_unit: currency per amount unit (e.g. 1000 for Tushare's thousands of CNY).
    """

    ticker: str | None = "ticker"
    date: str = "date"
    open: str = "open"
    high: str = "high"
    low: str = "low"
    close: str = "close"
    volume: str = "volume"
    amount: str | None = None
    vwap: str | None = None
    factor: str | None = None
    prev_close: str | None = None
    st: str | None = None
    date_format: str | None = None
    volume_unit: float = 1.0
    amount_unit: float = 1.0


def parse_dates(s: pd.Series, fmt: str | None = None, *, where: str = "") -> pd.Series:
    """Dates from ISO strings, datetimes or ``YYYYMMDD`` integers (never read as epoch numbers)."""
    if fmt is not None:
        out = pd.to_datetime(s.astype(str), format=fmt, errors="coerce")
    elif pd.api.types.is_datetime64_any_dtype(s):
        out = pd.to_datetime(s)
        if getattr(out.dt, "tz", None) is not None:
            out = out.dt.tz_localize(None)
    elif pd.api.types.is_numeric_dtype(s):
        v = pd.to_numeric(s, errors="coerce")
        if v.notna().any() and (v.dropna().between(19000101, 21001231)).all():
            out = pd.to_datetime(v.astype("Int64").astype(str), format="%Y%m%d", errors="coerce")
        else:
            raise ValueError(
                f"{where}: numeric date column is not YYYYMMDD (e.g. {s.iloc[0]!r}); set date_format in the "
                "column mapping"
            )
    else:
        st = s.astype(str).str.strip()
        if st.str.fullmatch(r"\d{8}").all():
            out = pd.to_datetime(st, format="%Y%m%d", errors="coerce")
        else:
            out = pd.to_datetime(st, errors="coerce", format="mixed")
    bad = out.isna() & s.notna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{where}: unparseable date {s[bad].iloc[0]!r} (data row {i + 1}, 1-based, header not counted)"
        )
    return out.dt.normalize()


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_csv(path)


def read_bars(
    path: str | os.PathLike,
    *,
    columns: ColumnMap | None = None,
    benchmark: str = EQUAL_WEIGHT,
    period: tuple[str, str] | None = None,
    tickers: list[str] | None = None,
    max_instruments: int | None = None,
) -> MarketData:
    """Read a folder of daily-bar files (or one file) with a column mapping.

    Args:
        path: a folder of ``*.csv`` / ``*.parquet`` files, or one such file.
        columns: the column mapping (default: ``ticker, date, open, high, low, close, volume``).
        benchmark: a ticker of the data whose close is the benchmark (excluded from the stock universe), or
            ``equal_weight``.
        period: ``(start, end)`` kept (inclusive); None = all dates.
        tickers: keep only these tickers (the benchmark ticker is always read).
        max_instruments: keep the first n stock tickers in name order.

    Returns:
        :class:`MarketData` whose calendar is the union of the files' dates (or the benchmark's dates when
        one is named). Prices are back-adjusted when ``factor`` or ``prev_close`` is mapped.

    Raises:
        ValueError: a file lacks a mapped column (the file is named), a date cannot be parsed.
    """
    cm = columns or ColumnMap()
    p = Path(path)
    if p.is_dir():
        files = sorted([*p.glob("*.csv"), *p.glob("*.parquet")])
        if not files:
            raise FileNotFoundError(f"bars: no *.csv or *.parquet files in {p}")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"bars: {p} not found")
    report: dict[str, int] = {}
    messages: list[str] = []
    need = {k: getattr(cm, k) for k in ("date", *BAR_FIELDS)}
    if cm.ticker is not None:
        need["ticker"] = cm.ticker
    optional = {k: getattr(cm, k) for k in ("amount", "vwap", "factor", "prev_close", "st") if getattr(cm, k)}
    frames = []
    progress.info("finance: reading %d bar file(s) from %s ...", len(files), p)
    for f in files:
        df = _read_table(f)
        miss = {k: v for k, v in {**need, **optional}.items() if v not in df.columns}
        # a benchmark (index) file needs only its date and close (and ticker): only its close is used
        bench_only = (
            benchmark != EQUAL_WEIGHT
            and not {"date", "close", "ticker"} & set(miss)
            and (f.stem == benchmark if cm.ticker is None else df[cm.ticker].astype(str).eq(benchmark).all())
        )
        if miss and not bench_only:
            what = ", ".join(f"{v!r} ({k})" for k, v in miss.items())
            raise ValueError(f"bars: file {f} lacks column(s) {what}; it has {list(df.columns)}")
        if len(df) == 0:
            _warn(report, messages, "empty_files", 1, f"bars: file {f} has a header but no rows; skipped")
            continue
        fill = {"factor": 1.0}  # a close-only benchmark file is taken as unadjusted
        out = pd.DataFrame(
            {k: df[v] if k not in miss else fill.get(k, np.nan) for k, v in {**need, **optional}.items()}
        )
        if cm.ticker is None:
            out["ticker"] = f.stem
        out["ticker"] = out["ticker"].astype(str)
        out["date"] = parse_dates(out["date"], cm.date_format, where=f"bars: file {f}, column {cm.date!r}")
        out["_file"] = f.name
        frames.append(out)
    if not frames:
        raise ValueError(f"bars: every file in {p} is empty")
    df = pd.concat(frames, ignore_index=True)
    for k in (*BAR_FIELDS, "amount", "vwap", "factor", "prev_close"):
        if k in df.columns:
            num = pd.to_numeric(df[k], errors="coerce")
            bad = num.isna() & df[k].notna()
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"bars: file {df['_file'].iloc[i]}, ticker {df['ticker'].iloc[i]}, date "
                    f"{df['date'].iloc[i].date()}: column {getattr(cm, k)!r} has non-numeric value "
                    f"{df[k].iloc[i]!r}"
                )
            df[k] = num.astype(np.float64)
    dup = df.duplicated(["ticker", "date"], keep="last")
    if dup.any():
        what = "duplicated (ticker, date) row(s), the last kept"
        _warn_rows(report, messages, "duplicated_dates", df[dup], what)
        df = df[~dup]
    neg = (df[list(PRICE_FIELDS)] < 0).any(axis=1) | (df["volume"] < 0)
    if neg.any():
        _warn_rows(
            report, messages, "negative_values", df[neg], "row(s) with a negative price or volume set to NaN"
        )
        df.loc[neg, [*PRICE_FIELDS, "volume"]] = np.nan
    # a stock row with a missing price or volume: no trade that day, like a negative value (the benchmark's
    # rows need only a close; its missing closes are counted as benchmark_missing_days)
    stock = df["ticker"] != benchmark
    nan = stock & ~neg & df[[*PRICE_FIELDS, "volume"]].isna().any(axis=1)
    if nan.any():
        _warn_rows(
            report,
            messages,
            "missing_values",
            df[nan],
            "row(s) with a missing (NaN) price or volume set to NaN (no trade that day)",
        )
        df.loc[nan, [*PRICE_FIELDS, "volume"]] = np.nan
    df = df.sort_values(["ticker", "date"], kind="mergesort")
    df["volume"] = df["volume"] * cm.volume_unit
    if "vwap" not in df.columns and "amount" in df.columns:
        with np.errstate(invalid="ignore", divide="ignore"):
            df["vwap"] = (df["amount"] * cm.amount_unit / df["volume"]).where(df["volume"] > 0)
    # back-adjustment: adjusted = raw x factor
    if "factor" not in df.columns and "prev_close" in df.columns:
        prev = df.groupby("ticker")["close"].shift(1)
        ratio = (prev / df["prev_close"]).where(df["prev_close"] > 0).fillna(1.0)
        df["factor"] = ratio.groupby(df["ticker"]).cumprod()
    if "factor" in df.columns:
        fac = df["factor"]
        for k in (*PRICE_FIELDS, "vwap"):
            if k in df.columns:
                df[k] = df[k] * fac
    if benchmark != EQUAL_WEIGHT and benchmark not in set(df["ticker"]):
        raise ValueError(
            f"bars: benchmark {benchmark!r} is not a ticker of {p} (name the index's ticker, or use "
            f"benchmark: equal_weight)"
        )
    bench_rows = df[df["ticker"] == benchmark]
    stocks = df[df["ticker"] != benchmark]
    names = sorted(stocks["ticker"].unique())
    if tickers is not None:
        names = [t for t in names if t in set(tickers)]
    if max_instruments:
        names = names[:max_instruments]
    stocks = stocks[stocks["ticker"].isin(names)]
    cal = pd.DatetimeIndex(sorted((bench_rows if len(bench_rows) else stocks)["date"].unique()))
    off = ~stocks["date"].isin(cal)
    if off.any():
        _warn_rows(
            report,
            messages,
            "rows_off_benchmark_calendar",
            stocks[off],
            f"row(s) on dates the benchmark {benchmark!r} does not trade are not used",
        )
        stocks = stocks[~off]
    fields = [k for k in (*BAR_FIELDS, "vwap", "factor") if k in stocks.columns]
    wide = {
        k: stocks.pivot(index="date", columns="ticker", values=k)
        .reindex(index=cal, columns=names)
        .astype(np.float64)
        for k in fields
    }
    if "st" in stocks.columns:
        wide["st"] = (
            stocks.pivot(index="date", columns="ticker", values="st")
            .reindex(index=cal, columns=names)
            .fillna(False)
            .astype(bool)
            .astype(np.float64)
        )
    universe = wide["close"].notna()
    bench = None if benchmark == EQUAL_WEIGHT else bench_rows.set_index("date")["close"].reindex(cal)
    return _finish(wide, universe, bench, benchmark, report, messages, period, where=f"bars {p}")


def read_market(
    *,
    source: Literal["qlib", "bars"],
    path: str | os.PathLike,
    market: str | None = None,
    benchmark: str = EQUAL_WEIGHT,
    columns: ColumnMap | None = None,
    period: tuple[str, str] | None = None,
    max_instruments: int | None = None,
) -> MarketData:
    """Dispatch to :func:`read_qlib` or :func:`read_bars` (the data module's one entry point)."""
    if source == "qlib":
        return read_qlib(
            path, market=market or "all", benchmark=benchmark, period=period, max_instruments=max_instruments
        )
    if source == "bars":
        return read_bars(
            path, columns=columns, benchmark=benchmark, period=period, max_instruments=max_instruments
        )
    raise ValueError(f"source must be 'qlib' or 'bars', got {source!r}")
