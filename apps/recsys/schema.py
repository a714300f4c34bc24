"""Declarative feature schema, generic multi-task table reader, and the fitted, versioned preprocessor.

A :class:`FeatureSchema` names categorical columns (embedded; vocabularies fitted on train with an
out-of-vocabulary bucket), numeric columns (optionally ``log1p``, then standardised with train statistics),
binary label columns (one per task) and an optional group column (e.g. a user id, for GAUC).

:class:`TabularPreprocessor` is fitted once on the train split, saved as JSON (``save``/``load``) and used
unchanged at train, test and serving time: ``transform(DataFrame) -> dict[str, Tensor]``. Categorical values
are keys ``normalise_category(value)`` (``str``, surrounding blanks stripped) at fit and transform alike.

Served requests first go through :meth:`TabularPreprocessor.check_request`, which checks instead of coercing:
string columns take strings only, integer columns integral numbers (``|x| <= 2**53``), float columns finite
numbers whose standardised value is a finite float32; the first violation raises a ``ValueError`` naming the
column, row and value.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

log = logging.getLogger(__name__)

PREPROCESSOR_FORMAT_VERSION = 1
OOV_INDEX = 0  # index 0 of every vocabulary is the out-of-vocabulary bucket
MAX_EXACT_INT = 2**53  # integers beyond this are not exact in float64 (nor in a JSON double)
RawKind = Literal["string", "integer", "float", "any"]
FillMissing = Literal["error", "mean", "zero"]
UNSEEN_WARN_SHARE = 0.5  # a column whose rows are mostly unseen categories gets a warning


def normalise_category(values: pd.Series) -> pd.Series:
    """Category keys of raw categorical values, at fit, transform and serving time alike (see
    :func:`_normalise_keys` for the rule); computed once per distinct value."""
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    keys = _normalise_keys(pd.Series(uniques)).to_numpy(dtype=object)
    return pd.Series(keys[codes], index=values.index, dtype=object)


def _normalise_keys(values: pd.Series) -> pd.Series:
    """Category keys of raw categorical values, at fit, transform and serving time alike.

    ``str(value)`` with surrounding blanks stripped (the census files are ``", "``-separated; a served
    ``" Private"`` is the training's ``"Private"``), and numeric-looking values written one way: an integral
    number is its integer (``9``, ``9.0``, ``" 9 "`` and ``"9.0"`` are all the key ``"9"``; a CSV column with
    one blank reads as float and would otherwise key ``9.0``), any other finite number is Python's ``repr`` of
    the float (``"0.50"`` -> ``"0.5"``). Everything else (``"?"``, ``"NA"``, ``"nan"``) stays as written.
    """
    if pd.api.types.is_integer_dtype(values) and not values.isna().any():
        return pd.Series(values.astype(np.int64).astype(str).to_numpy(dtype=object), index=values.index)
    keys = pd.Series(
        [str(v).strip() for v in values.tolist()], index=values.index, dtype=object
    )  # NaN: "nan"
    num = pd.to_numeric(keys, errors="coerce")
    x = num.to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(x)
    if not finite.any():
        return keys
    integral = (
        finite & (np.floor(np.where(finite, x, 0)) == np.where(finite, x, 1)) & (np.abs(x) <= MAX_EXACT_INT)
    )
    out = keys.to_numpy(dtype=object).copy()
    out[integral] = x[integral].astype(np.int64).astype(str)
    other = finite & ~integral
    out[other] = [repr(float(v)) for v in x[other]]
    return pd.Series(out, index=values.index, dtype=object)


def raw_kind(values: pd.Series) -> RawKind:
    """The raw type of a training column: ``string``, ``integer`` or ``float`` (``any`` for other dtypes)."""
    if pd.api.types.is_bool_dtype(values):
        return "any"
    if pd.api.types.is_integer_dtype(values):
        return "integer"
    if pd.api.types.is_float_dtype(values):
        return "float"
    if pd.api.types.is_string_dtype(values) or values.dtype == object:
        return "string"
    return "any"


@dataclass(frozen=True)
class FeatureSchema:
    """Which columns are features, labels and groups.

    Attributes:
        categorical: columns embedded through a fitted vocabulary (values are read as strings).
        numeric: real-valued columns, standardised with train mean/std.
        labels: binary (0/1 or boolean) label columns, one per task, in task order.
        log1p: subset of ``numeric`` transformed with ``sign(x) * log1p(|x|)`` before standardising
            (heavy-tailed counts such as capital gains).
        group: optional group column (user id) used for GAUC; kept as a string key.
        numeric_as_categorical: numeric columns that are ALSO embedded as categories of their raw value
            (e.g. age, weeks worked, capital gains), so the network sees both the scale and each level.
        min_count: categories seen fewer times than this on train map to the OOV bucket.
        sequences: sequence columns -> the categorical column whose vocabulary (and embedding) they share,
            e.g. ``{"hist_items": "item_id"}``. A sequence value is a list/array of raw ids or a string of
            ids separated by ``seq_sep`` (``"12|7|3"``; empty string = empty history), oldest first.
        max_seq_len: keep the last (most recent) ``max_seq_len`` ids of each sequence.
        seq_sep: separator of string-encoded sequences.
        fill_missing: missing (NaN/empty) values in numeric columns: ``"error"`` (default: a ``ValueError``
            naming the column and the 1-based data row), ``"mean"`` (the train mean, i.e. 0 after
            standardising) or ``"zero"`` (raw 0).
    """

    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    log1p: tuple[str, ...] = ()
    group: str | None = None
    numeric_as_categorical: tuple[str, ...] = ()
    min_count: int = 1
    sequences: dict[str, str] = field(default_factory=dict)
    max_seq_len: int = 50
    seq_sep: str = "|"
    fill_missing: FillMissing = "error"

    def __post_init__(self) -> None:
        object.__setattr__(self, "categorical", tuple(self.categorical))
        object.__setattr__(self, "numeric", tuple(self.numeric))
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "log1p", tuple(self.log1p))
        object.__setattr__(self, "numeric_as_categorical", tuple(self.numeric_as_categorical))
        object.__setattr__(self, "sequences", dict(self.sequences or {}))
        if self.fill_missing not in ("error", "mean", "zero"):
            raise ValueError(
                f"FeatureSchema: fill_missing must be 'error', 'mean' or 'zero', got {self.fill_missing!r}"
            )
        for seq, target in self.sequences.items():
            if target not in self.categorical:
                raise ValueError(
                    f"FeatureSchema: sequence column {seq!r} shares the vocabulary of {target!r}, which is "
                    f"not a categorical column ({list(self.categorical)})"
                )
        if self.max_seq_len < 1:
            raise ValueError(f"FeatureSchema: max_seq_len must be >= 1, got {self.max_seq_len}")
        if not self.labels:
            raise ValueError("FeatureSchema: labels must name at least one label column")
        if not self.categorical and not self.numeric:
            raise ValueError("FeatureSchema: no feature columns (categorical and numeric are both empty)")
        for name in ("log1p", "numeric_as_categorical"):
            bad = set(getattr(self, name)) - set(self.numeric)
            if bad:
                raise ValueError(f"FeatureSchema: {name} columns {sorted(bad)} are not in numeric")
        cols = [*self.categorical, *self.numeric, *self.labels, *self.sequences]
        dup = sorted({c for c in cols if cols.count(c) > 1})
        if dup:
            raise ValueError(f"FeatureSchema: columns listed twice: {dup}")

    @property
    def embedded(self) -> tuple[str, ...]:
        """Embedded inputs in ``cat`` tensor order (``<col>#cat`` for numeric-as-categorical columns)."""
        return (*self.categorical, *(f"{c}#cat" for c in self.numeric_as_categorical))

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the schema needs (features, labels, group)."""
        g = (self.group,) if self.group else ()
        return (*self.categorical, *self.numeric, *tuple(self.sequences), *self.labels, *g)

    @property
    def features(self) -> tuple[str, ...]:
        """Raw feature columns a request must carry (categorical, numeric, sequence), without duplicates."""
        return tuple(dict.fromkeys([*self.categorical, *self.numeric, *self.sequences]))

    @property
    def sequence_targets(self) -> list[int]:
        """Per sequence column, the index (in :attr:`embedded` order) of the column whose table it shares."""
        return [self.embedded.index(t) for t in self.sequences.values()]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSchema:
        return cls(**d)


def read_table(path: str | os.PathLike, *, sep: str = ",") -> pd.DataFrame:
    """Read a CSV (optionally gzipped) or Parquet file into a DataFrame of raw values.

    CSVs are read with ``keep_default_na=False`` so literal strings such as ``NA`` stay categories.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown extension, or the file has no rows.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} not found")
    name = p.name.lower()
    if name.endswith(".parquet") or name.endswith(".pq"):
        df = pd.read_parquet(p)
    elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".gz")):
        try:
            df = pd.read_csv(p, sep=sep, keep_default_na=False, skipinitialspace=True, low_memory=False)
        except pd.errors.EmptyDataError as e:
            raise ValueError(f"data file {p} is empty") from e
    else:
        raise ValueError(f"data file {p}: unknown format (expected .csv, .csv.gz, .tsv or .parquet)")
    if len(df) == 0:
        raise ValueError(f"data file {p} has a header but no rows")
    return df


def validate_frame(df: pd.DataFrame, schema: FeatureSchema, *, source: str, need_labels: bool = True) -> None:
    """Check that ``df`` has what ``schema`` needs; errors name the column and ``source`` (file name).

    Raises:
        ValueError: empty frame, missing column, non-numeric or NaN numeric values, non-binary labels.
    """
    if len(df) == 0:
        raise ValueError(f"{source}: no rows")
    needed = [*schema.features, *(schema.labels if need_labels else ())]
    if schema.group:
        needed.append(schema.group)
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; found {list(df.columns)[:50]}")
    for c in schema.numeric:
        col = pd.to_numeric(df[c], errors="coerce")
        bad = col.isna() & ~_blank(df[c])
        if bad.any():
            raise ValueError(
                f"{source}: numeric column {c!r} has non-numeric value {df[c][bad].iloc[0]!r} "
                f"({data_row(df, bad)}, 1-based, header not counted)"
            )
        if schema.fill_missing == "error" and col.isna().any():
            raise ValueError(
                f"{source}: numeric column {c!r} has {int(col.isna().sum())} missing value(s), the first "
                f"in {data_row(df, col.isna())} (1-based, header not counted); fill them, or set "
                "fill_missing: mean | zero"
            )
    if need_labels:
        for c in schema.labels:
            _labels_as_float(df[c], column=c, source=source, frame=df)


class FileRows:
    """The 1-based file rows of a frame's rows, kept in ``DataFrame.attrs["data_rows"]`` by
    :func:`apps.recsys.data.carve_validation`, so that an error in a part carved from a file names the row
    of the file. pandas deep-copies ``attrs`` on every operation and compares them on ``concat``: this holder
    copies as itself and equals only itself, so neither costs a pass over the rows."""

    __slots__ = ("rows",)

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = np.asarray(rows)

    def __deepcopy__(self, memo: dict) -> FileRows:
        return self

    def __eq__(self, other: object) -> bool:
        return self is other

    __hash__ = object.__hash__

    def __len__(self) -> int:
        return len(self.rows)


def _blank(values: pd.Series) -> pd.Series:
    """Missing cells: NaN/None, and in a text column also empty or all-blank strings (a CSV's empty field)."""
    blank = values.isna()
    if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
        blank = blank | (values.astype(str).str.strip() == "")
    return blank


def data_row(obj: pd.DataFrame | pd.Series, mask: pd.Series | np.ndarray | int) -> str:
    """``"data row R"``: the file row (1-based, header not counted) of the first True of ``mask`` (or of
    position ``mask``). A part carved from a file (``carve_validation``) carries its rows' places in
    ``attrs["data_rows"]``; other frames are whole files, where the place is the position + 1."""
    pos = mask if isinstance(mask, int) else int(np.flatnonzero(np.asarray(mask))[0])
    rows = obj.attrs.get("data_rows")
    if isinstance(rows, FileRows) and len(rows) == len(obj):
        return f"data row {int(rows.rows[pos])}"
    return f"data row {pos + 1}"


def _labels_as_float(
    s: pd.Series, *, column: str, source: str, frame: pd.DataFrame | None = None
) -> np.ndarray:
    """A 0/1 (or boolean) label column as float32; one error line naming the column, the count and the first
    bad value's data row otherwise."""
    if s.dtype == bool:
        return s.to_numpy(dtype=np.float32)
    frame = s.to_frame() if frame is None else frame
    v = pd.to_numeric(s, errors="coerce")
    if v.isna().any():
        blank = _blank(s)
        text = v.isna() & ~blank
        if text.any():
            raise ValueError(
                f"{source}: label column {column!r} has {int(text.sum())} non-numeric value(s), the first "
                f"{s[text].iloc[0]!r} in {data_row(frame, text)} (1-based, header not counted); labels are "
                "0/1 or true/false"
            )
        raise ValueError(
            f"{source}: label column {column!r} has {int(blank.sum())} missing value(s), the first in "
            f"{data_row(frame, blank)} (1-based, header not counted)"
        )
    bad = ~v.isin([0, 1])
    if bad.any():
        vals = sorted(set(v[bad].tolist()))[:5]
        raise ValueError(
            f"{source}: label column {column!r} is not binary (0/1): {int(bad.sum())} row(s) hold {vals}, "
            f"the first in {data_row(frame, bad)} (1-based, header not counted)"
        )
    return v.to_numpy(dtype=np.float32)


@dataclass
class TabularPreprocessor:
    """Fitted transform from raw DataFrames to model tensors (train statistics only).

    Attributes:
        schema: the feature schema.
        vocabularies: per categorical column, the list of known values; value ``vocab[i]`` maps to index
            ``i + 1`` and anything else to ``OOV_INDEX`` (0).
        means, stds: per numeric column, train mean and std (after ``log1p`` where configured).
        kinds: raw type of each feature column on train (``string``, ``integer``, ``float``), checked on
            served requests (:meth:`check_request`); empty for preprocessors fitted before it existed.
        version: format version, checked on load.
    """

    schema: FeatureSchema
    vocabularies: dict[str, list[str]] = field(default_factory=dict)
    means: dict[str, float] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    version: int = PREPROCESSOR_FORMAT_VERSION
    _lookup: dict[str, dict[str, int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def fit(
        cls, df: pd.DataFrame, schema: FeatureSchema, *, source: str = "train data"
    ) -> TabularPreprocessor:
        """Fit vocabularies and numeric statistics on ``df`` (the train split)."""
        validate_frame(df, schema, source=source)
        vocabs: dict[str, list[str]] = {}
        for c in schema.embedded:
            counts = cls._cat_strings(df, c).value_counts()
            kept = counts[counts >= schema.min_count].index.tolist()
            vocabs[c] = sorted(kept)
        means, stds = {}, {}
        for c in schema.numeric:
            x = cls._numeric_raw(df[c], log=c in schema.log1p)
            if schema.fill_missing == "zero":
                x = np.nan_to_num(x, nan=0.0)
            means[c] = float(np.nanmean(x)) if np.isfinite(x).any() else 0.0
            sd = float(np.nanstd(x)) if np.isfinite(x).any() else 1.0
            stds[c] = sd if sd > 0 and math.isfinite(sd) else 1.0
        kinds = {c: raw_kind(df[c]) for c in dict.fromkeys([*schema.categorical, *schema.numeric])}
        kinds.update({c: "sequence" for c in schema.sequences})
        return cls(schema=schema, vocabularies=vocabs, means=means, stds=stds, kinds=kinds)

    @staticmethod
    def _cat_strings(df: pd.DataFrame, name: str) -> pd.Series:
        if name.endswith("#cat"):
            return pd.to_numeric(df[name[:-4]]).map(lambda x: f"{x:g}")
        return normalise_category(df[name])

    @staticmethod
    def _numeric_raw(s: pd.Series, *, log: bool) -> np.ndarray:
        x = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        return np.sign(x) * np.log1p(np.abs(x)) if log else x

    @property
    def cardinalities(self) -> list[int]:
        """Embedding-table size per categorical column (vocabulary + OOV bucket)."""
        return [len(self.vocabularies[c]) + 1 for c in self.schema.embedded]

    @property
    def num_numeric(self) -> int:
        return len(self.schema.numeric)

    @property
    def task_names(self) -> list[str]:
        return list(self.schema.labels)

    def _index(self, c: str) -> dict[str, int]:
        if c not in self._lookup:
            self._lookup[c] = {v: i + 1 for i, v in enumerate(self.vocabularies[c])}
        return self._lookup[c]

    def transform(
        self,
        df: pd.DataFrame,
        *,
        source: str = "input data",
        with_labels: bool | None = None,
        report_unseen: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Turn raw rows into tensors.

        Args:
            df: raw rows with the schema's columns (extra columns are ignored).
            source: name used in error messages (e.g. the file path).
            with_labels: require and return labels; default: only if all label columns are present.
            report_unseen: log, per categorical/sequence column, how many values were not in the training
                vocabulary (they map to the OOV index 0), and warn when most of a column's rows are unseen
                (validation, test, predict and serving do; fitting does not).

        Returns:
            ``cat`` ``(B, C)`` int64 vocabulary indices (0 = OOV), ``num`` ``(B, F)`` float32 standardised
            values (missing values filled per ``fill_missing``), ``seq`` ``(B, S, L)`` int64 indices into the
            shared vocabularies and ``seq_mask`` ``(B, S, L)`` bool (True = a real history item; only when the
            schema has sequence columns), ``labels`` ``(B, M)`` float32 (when labels are used), ``group``
            ``(B,)`` int64 dense group ids (when the schema has a group column; ids are local to this call).
        """
        s = self.schema
        if with_labels is None:
            with_labels = all(c in df.columns for c in s.labels)
        validate_frame(df, s, source=source, need_labels=with_labels)
        n = len(df)
        cat = np.zeros((n, len(s.embedded)), dtype=np.int64)
        unseen: dict[str, tuple[int, int]] = {}
        for j, c in enumerate(s.embedded):
            keys = self._cat_strings(df, c)
            codes, uniques = pd.factorize(keys, use_na_sentinel=False)
            idx = pd.Series(uniques).map(self._index(c)).to_numpy(dtype=np.float64, na_value=np.nan)[codes]
            unseen[c] = (int(np.isnan(idx).sum()), n)
            cat[:, j] = np.nan_to_num(idx, nan=OOV_INDEX).astype(np.int64)
        num = np.zeros((n, len(s.numeric)), dtype=np.float32)
        for j, c in enumerate(s.numeric):
            x = self._numeric_raw(df[c], log=c in s.log1p)
            if s.fill_missing != "error":
                x = np.where(np.isnan(x), self.means[c] if s.fill_missing == "mean" else 0.0, x)
            num[:, j] = (x - self.means[c]) / self.stds[c]
        out = {"cat": torch.from_numpy(cat), "num": torch.from_numpy(num)}
        if s.sequences:
            seqs, masks = [], []
            for col, target in s.sequences.items():
                ids, mask, n_unseen, n_items = self._sequence(df[col], target, source=source, column=col)
                seqs.append(ids)
                masks.append(mask)
                unseen[col] = (n_unseen, n_items)
            out["seq"] = torch.from_numpy(np.stack(seqs, axis=1))  # (B, S, L)
            out["seq_mask"] = torch.from_numpy(np.stack(masks, axis=1))  # (B, S, L)
        if report_unseen:
            self._report_unseen(unseen, source=source)
        if with_labels:
            lab = np.stack(
                [_labels_as_float(df[c], column=c, source=source, frame=df) for c in s.labels], axis=1
            )
            out["labels"] = torch.from_numpy(lab)  # (B, M)
        if s.group:
            codes, _ = pd.factorize(df[s.group].astype(str))
            out["group"] = torch.from_numpy(codes.astype(np.int64))
        return out

    def _sequence(
        self, values: pd.Series, target: str, *, source: str, column: str
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """``(B, L)`` vocabulary indices of ``target`` and ``(B, L)`` mask of one sequence column (last L ids,
        left-aligned), plus the count of unseen ids and of all ids."""
        s, length = self.schema, self.schema.max_seq_len
        rows = []
        for i, x in enumerate(values.tolist()):
            if x is None or (isinstance(x, float) and math.isnan(x)):
                a: np.ndarray = np.empty(0, dtype=object)
            elif isinstance(x, str):
                x = x.strip()
                a = np.asarray([t for t in x.split(s.seq_sep)] if x else [], dtype=object)
            elif isinstance(x, list | tuple | np.ndarray):
                a = np.asarray(x)
                if a.ndim != 1:
                    raise ValueError(
                        f"{source}: sequence column {column!r} {data_row(values, i)}: not a flat list"
                    )
            else:
                raise ValueError(
                    f"{source}: sequence column {column!r} {data_row(values, i)}: expected a list of ids or "
                    f"a {s.seq_sep!r}-separated string, got {x!r}"
                )
            rows.append(a[-length:])
        lens = np.fromiter((len(a) for a in rows), dtype=np.int64, count=len(rows))  # (B,)
        total = int(lens.sum())
        ids = np.zeros((len(rows), length), dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=bool)
        if total:
            flat = np.concatenate([a.astype(object) if a.dtype.kind in "OUS" else a for a in rows if len(a)])
            codes, uniques = pd.factorize(flat)
            keys = normalise_category(pd.Series(uniques))
            idx = keys.map(self._index(target)).to_numpy(dtype=np.float64, na_value=np.nan)
            n_unseen = int(np.isnan(idx)[codes].sum())
            idx = np.nan_to_num(idx, nan=OOV_INDEX).astype(np.int64)[codes]  # (total,)
            row = np.repeat(np.arange(len(rows)), lens)
            pos = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
            ids[row, pos] = idx
            mask[row, pos] = True
        else:
            n_unseen = 0
        return ids, mask, n_unseen, total

    def _report_unseen(self, unseen: dict[str, tuple[int, int]], *, source: str) -> None:
        parts = [f"{c}: {k}/{n}" for c, (k, n) in unseen.items() if k]
        log.info("%s: unseen categories per column (mapped to OOV): %s", source, ", ".join(parts) or "none")
        for c, (k, n) in unseen.items():
            if n and k / n > UNSEEN_WARN_SHARE:
                log.warning(
                    "%s: column %r: %d of %d values (%.0f%%) were not seen in training and map to the "
                    "out-of-vocabulary index; is this the same kind of data?",
                    source,
                    c,
                    k,
                    n,
                    100 * k / n,
                )

    def unseen_counts(self, df: pd.DataFrame) -> dict[str, int]:
        """Per categorical column, how many of ``df``'s values are not in the training vocabulary."""
        return {
            c: int(self._cat_strings(df, c).map(self._index(c)).isna().sum()) for c in self.schema.embedded
        }

    def check_request(self, df: pd.DataFrame, *, source: str = "request") -> pd.DataFrame:
        """Check served raw rows against the training types; return them ready for :meth:`transform`.

        String columns take ``str`` values only (no numbers; a null only where the training column had missing
        values, which key as ``"nan"``, and then it scores as they did); integer
        columns take integral numbers with ``|x| <= 2**53`` (returned as int64, so ``35.0`` is the category
        ``"35"`` as in training; a categorical integer column also takes strings, keyed as in training);
        float columns take finite numbers. Every numeric value must standardise to
        a finite float32. Booleans are not numbers here.

        Raises:
            ValueError: a missing column, or the first bad value, naming column, row (position) and value.
        """
        s = self.schema
        missing = [c for c in s.features if c not in df.columns]
        if missing:
            raise ValueError(f"{source}: missing column(s) {missing}; found {list(df.columns)[:50]}")
        kinds = getattr(self, "kinds", None) or {}  # predictors pickled before `kinds` existed
        out = df.copy()
        for c in dict.fromkeys([*s.categorical, *s.numeric]):
            kind = kinds.get(c, "float" if c in s.numeric else "any")
            values = df[c].tolist()
            if kind == "string":
                # a null scores as the training's missing value where the training column had some (a
                # Parquet null keys as "nan"); elsewhere it is a 400
                missing_known = "nan" in self.vocabularies.get(c, ())
                nulls = []
                for i, v in enumerate(values):
                    if not isinstance(v, str):
                        if missing_known and (v is None or (isinstance(v, float) and math.isnan(v))):
                            nulls.append(i)
                            continue
                        raise ValueError(f"{source}: column {c!r} row {i}: expected a string, got {v!r}")
                if nulls:
                    null_rows = set(nulls)
                    keyed = ["nan" if i in null_rows else v for i, v in enumerate(values)]
                    out[c] = pd.Series(keyed, index=df.index, dtype=object)
            elif kind in ("integer", "float"):
                keyed = c in s.categorical  # integer codes embedded by str(value): a string is a key too
                for i, v in enumerate(values):
                    if keyed and isinstance(v, str):
                        continue
                    if c in s.numeric and s.fill_missing != "error" and v is None:
                        continue  # filled by transform
                    if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Real):
                        raise ValueError(f"{source}: column {c!r} row {i}: expected a number, got {v!r}")
                    if c in s.numeric and s.fill_missing != "error" and math.isnan(v):
                        continue  # filled by transform
                    if kind == "float" and c not in s.numeric and math.isnan(v):
                        continue  # a float categorical column: NaN is the category "nan", as in training
                    if not math.isfinite(v):
                        raise ValueError(f"{source}: column {c!r} row {i}: value {v!r} is not finite")
                    if kind == "integer":
                        if v != int(v):
                            raise ValueError(
                                f"{source}: column {c!r} row {i}: expected an integer, got {v!r}"
                            )
                        if abs(v) > MAX_EXACT_INT:
                            raise ValueError(
                                f"{source}: column {c!r} row {i}: value {v!r} is out of range "
                                f"(|x| <= 2**53 for an integer column)"
                            )
                if keyed and any(isinstance(v, str) for v in values):
                    cast = [v if isinstance(v, str) else int(v) for v in values]
                    out[c] = pd.Series(cast, index=df.index, dtype=object)
                else:
                    dtype = np.int64 if kind == "integer" else np.float64
                    out[c] = pd.Series(np.asarray(values, dtype=dtype), index=df.index)
            if c in s.numeric:
                with np.errstate(over="ignore", invalid="ignore"):
                    x = self._numeric_raw(out[c], log=c in s.log1p)
                    z = ((x - self.means[c]) / self.stds[c]).astype(np.float32)
                bad = ~np.isfinite(z) & ~(np.isnan(x) if s.fill_missing != "error" else False)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise ValueError(
                        f"{source}: column {c!r} row {i}: value {values[i]!r} is out of range "
                        f"(its standardised value overflows float32)"
                    )
        return out

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """JSON-serialisable state (schema, vocabularies, statistics, version)."""
        return {
            "format": "moekit.recsys.TabularPreprocessor",
            "version": self.version,
            "schema": self.schema.to_dict(),
            "vocabularies": self.vocabularies,
            "means": self.means,
            "stds": self.stds,
            "kinds": self.kinds,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> TabularPreprocessor:
        if state.get("format") != "moekit.recsys.TabularPreprocessor":
            raise ValueError(f"not a TabularPreprocessor state (format={state.get('format')!r})")
        if state.get("version") != PREPROCESSOR_FORMAT_VERSION:
            raise ValueError(
                f"TabularPreprocessor version {state.get('version')} is not supported "
                f"(this code reads version {PREPROCESSOR_FORMAT_VERSION})"
            )
        return cls(
            schema=FeatureSchema.from_dict(state["schema"]),
            vocabularies={k: list(v) for k, v in state["vocabularies"].items()},
            means={k: float(v) for k, v in state["means"].items()},
            stds={k: float(v) for k, v in state["stds"].items()},
            kinds=dict(state.get("kinds", {})),
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted state as JSON to ``path``."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.state_dict(), indent=1, sort_keys=True))
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> TabularPreprocessor:
        """Read a preprocessor written by :meth:`save`."""
        return cls.from_state_dict(json.loads(Path(path).read_text()))
