"""Census-Income (KDD) loader, its pinned 70/15/15 split, and multi-task tabular DataModules.

Data: UCI Census-Income (KDD), official test file (99,762 rows), as shipped by drawbridge/keras-mmoe.
Tasks (MMoE paper, task group 1): ``income`` (income over 50K) and ``never_married``. ``education``,
``marital_stat`` (label source) and ``instance_weight`` (sampling weight) are not inputs.
Results on this file are labelled "Census-Income test-file split" and are not comparable with the
published MMoE/PLE numbers (those train on the 199,523-row train file).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from apps.datadir import cache_dir, data_dir, require_file
from apps.recsys.schema import FeatureSchema, FileRows, TabularPreprocessor, read_table, validate_frame

log = logging.getLogger(__name__)

CENSUS_FOLDER = "census_income_kdd"
CENSUS_FILE = "census-income.test.gz"
CENSUS_SHA256 = "5ac4cacd3ca9f1ecb10de1a0a41e4ac68fdc419e3fec190f5c0c6cc03b2ea659"
CENSUS_URL = (
    "https://archive.ics.uci.edu/ml/machine-learning-databases/census-income-mld/census-income.test.gz"
)
CENSUS_TRAIN_URL = (
    "https://archive.ics.uci.edu/ml/machine-learning-databases/census-income-mld/census-income.data.gz"
)
CENSUS_ROWS = 99_762

CENSUS_COLUMNS = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends",
    "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ",
    "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt",
    "num_emp", "fam_under_18", "country_father", "country_mother", "country_self", "citizenship",
    "own_or_self", "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
)  # fmt: skip
CENSUS_NUMERIC = (
    "age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked",
)  # fmt: skip
CENSUS_LOG1P = ("wage_per_hour", "capital_gains", "capital_losses", "stock_dividends")
CENSUS_NOT_INPUTS = ("education", "marital_stat", "instance_weight", "income_50k")
CENSUS_CATEGORICAL = tuple(c for c in CENSUS_COLUMNS if c not in CENSUS_NUMERIC + CENSUS_NOT_INPUTS)
CENSUS_TASKS = ("income", "never_married")
# split sizes of the pinned algorithm on the shipped file (datasets/census_income_kdd.md, Split)
CENSUS_SPLIT_SIZES = (69_835, 14_965, 14_962)


def census_schema(*, numeric_as_categorical: bool = True, min_count: int = 1) -> FeatureSchema:
    """The census feature schema: 31 categorical + 7 numeric inputs, two binary tasks.

    Args:
        numeric_as_categorical: also embed every numeric column's raw value as a category [D].
        min_count: rarer category values map to the out-of-vocabulary bucket.
    """
    return FeatureSchema(
        categorical=CENSUS_CATEGORICAL,
        numeric=CENSUS_NUMERIC,
        log1p=CENSUS_LOG1P,
        labels=CENSUS_TASKS,
        numeric_as_categorical=CENSUS_NUMERIC if numeric_as_categorical else (),
        min_count=min_count,
    )


def read_census_file(path: str | os.PathLike, *, sha256: str | None = CENSUS_SHA256) -> pd.DataFrame:
    """Parse a raw Census-Income (KDD) file (``census-income.{test,data}.gz``) and add the task labels.

    Args:
        path: the gzip CSV (no header, ``", "`` separated).
        sha256: expected checksum; ``None`` for user-supplied files.

    Returns:
        the 42 raw columns plus ``income`` and ``never_married`` (0/1 int).
    """
    p = require_file(path, sha256=sha256, url=CENSUS_URL, what="Census-Income (KDD)")
    df = pd.read_csv(p, header=None, names=list(CENSUS_COLUMNS), skipinitialspace=True, keep_default_na=False)
    if len(df) == 0:
        raise ValueError(f"{p}: empty census file")
    if df.isna().any().any():
        col = df.columns[df.isna().any()].tolist()
        raise ValueError(f"{p}: unexpected missing values in columns {col} (wrong column count?)")
    bad = ~df["income_50k"].isin(["- 50000.", "50000+."])
    if bad.any():
        raise ValueError(
            f"{p}: column income_50k has unexpected value {df['income_50k'][bad].iloc[0]!r} "
            "(expected '- 50000.' or '50000+.'; is this a Census-Income (KDD) file?)"
        )
    df["income"] = (df["income_50k"] == "50000+.").astype(np.int64)
    df["never_married"] = (df["marital_stat"] == "Never married").astype(np.int64)
    return df


def load_census(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Load the shipped census file from ``<data_dir>/census_income_kdd/`` (sha256-checked, 99,762 rows)."""
    df = read_census_file(data_dir(root) / CENSUS_FOLDER / CENSUS_FILE)
    if len(df) != CENSUS_ROWS:
        raise ValueError(f"census file has {len(df)} rows, expected {CENSUS_ROWS}")
    return df


def stratified_unit_split(
    df: pd.DataFrame,
    *,
    strata: tuple[str, ...] = CENSUS_TASKS,
    fractions: tuple[float, float] = (0.70, 0.15),
    seed: int = 42,
    unit_columns: tuple[str, ...] = CENSUS_COLUMNS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pinned split (``datasets/census_income_kdd.md``, Split): exact-duplicate rows form units, stratified on
    the joint label.

    Units are numbered in order of first appearance; one ``numpy.random.default_rng(seed)``; strata visited
    in sorted order of the joint label; per stratum its units are permuted and the first
    ``round(f_train·n)`` go to train, the next ``round(f_val·n)`` to validation, the rest to test.

    Returns:
        sorted row-index arrays (train, val, test).
    """
    unit = df.groupby(list(unit_columns), sort=False).ngroup().to_numpy()  # (rows,) unit id per row
    n_units = int(unit.max()) + 1
    first_row = np.full(n_units, -1, dtype=np.int64)
    first_row[unit[::-1]] = np.arange(len(df))[::-1]  # first row of every unit
    ukeys = df[list(strata)].to_numpy()[first_row]  # (U, S) stratum of each unit
    rng = np.random.default_rng(seed)
    assign = np.empty(n_units, dtype=np.int64)
    for key in sorted({tuple(k) for k in ukeys.tolist()}):
        units = np.flatnonzero((ukeys == np.array(key)).all(axis=1))
        units = units[rng.permutation(len(units))]
        n_tr, n_va = round(fractions[0] * len(units)), round(fractions[1] * len(units))
        assign[units[:n_tr]] = 0
        assign[units[n_tr : n_tr + n_va]] = 1
        assign[units[n_tr + n_va :]] = 2
    row_split = assign[unit]
    return tuple(np.flatnonzero(row_split == s) for s in range(3))  # type: ignore[return-value]


def census_split_indices(df: pd.DataFrame, *, seed: int = 42, persist: bool = True) -> tuple[np.ndarray, ...]:
    """Row indices of the census train/val/test split, persisted under the cache for reuse.

    With the default seed the split is checked against its documented sizes (69,835 / 14,965 / 14,962).
    """
    path = cache_dir("recsys") / f"census_split_seed{seed}.npz"
    if persist and path.is_file():
        z = np.load(path)
        return z["train"], z["val"], z["test"]
    tr, va, te = stratified_unit_split(df, seed=seed)
    if seed == 42 and (len(tr), len(va), len(te)) != CENSUS_SPLIT_SIZES:
        raise RuntimeError(
            f"census split sizes {(len(tr), len(va), len(te))} differ from the pinned {CENSUS_SPLIT_SIZES} "
            "(numpy Generator stream changed?)"
        )
    if persist:
        np.savez(path, train=tr, val=va, test=te)
    return tr, va, te


def carve_validation(
    df: pd.DataFrame, source: str, *, fraction: float, time_column: str | None, seed: int
) -> tuple[tuple[pd.DataFrame, str], tuple[pd.DataFrame, str]]:
    """Split train rows into (train, validation): the latest ``fraction`` by ``time_column`` (ties stay
    together on the validation side), or a seeded random ``fraction``.

    Raises:
        ValueError: the time column is missing or not sortable, or a side would be empty.
    """
    n = len(df)
    n_val = int(round(fraction * n))
    if n_val < 1 or n_val >= n:
        raise ValueError(
            f"{source}: val_fraction={fraction} of {n} rows leaves an empty train or validation side"
        )
    if time_column:
        if time_column not in df.columns:
            raise ValueError(
                f"{source}: val_time_column {time_column!r} is not a column ({list(df.columns)[:30]})"
            )
        t = df[time_column]
        if t.isna().any():
            raise ValueError(f"{source}: val_time_column {time_column!r} has missing values")
        cut = t.sort_values(kind="stable").iloc[n - n_val]
        is_val = (t >= cut).to_numpy()
        if is_val.all():
            raise ValueError(f"{source}: every row has {time_column} >= {cut!r}; nothing left for train")
    else:
        is_val = np.zeros(n, dtype=bool)
        is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    tr = df[~is_val].reset_index(drop=True)
    va = df[is_val].reset_index(drop=True)
    # the rows' 1-based places in the file, for error messages (see apps.recsys.schema.data_row)
    held = df.attrs.get("data_rows")
    rows = held.rows if isinstance(held, FileRows) and len(held) == n else np.arange(1, n + 1)
    tr.attrs["data_rows"], va.attrs["data_rows"] = FileRows(rows[~is_val]), FileRows(rows[is_val])
    how = f"latest {fraction:g} by {time_column}" if time_column else f"random {fraction:g}, seed {seed}"
    log.info("%s: held out %d of %d train rows for validation (%s)", source, len(va), n, how)
    return (tr, f"{source} [train part]"), (va, f"{source} [validation part: {how}]")


class TensorBatches(Dataset):
    """A dict of equal-length tensors indexed by a whole batch of row ids at once (fast on CPU)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lens = {k: len(v) for k, v in tensors.items()}
        if len(set(lens.values())) != 1:
            raise ValueError(f"tensors of different lengths: {lens}")
        self.tensors = tensors
        self.n = next(iter(lens.values()))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: list[int]) -> dict[str, torch.Tensor]:
        i = torch.as_tensor(idx)
        return {k: v[i] for k, v in self.tensors.items()}


class MultiTaskDataModule(L.LightningDataModule):
    """Generic multi-task tabular data from CSV/Parquet files described by a :class:`FeatureSchema`.

    Bring your own log without code: give the files and the schema in YAML (worked example in
    ``docs/recsys.md``, ``apps/recsys/examples/``). ``moekit recsys fit --data.help MultiTaskDataModule``
    lists these arguments.

    Args:
        train_path: train file (CSV, CSV.gz, TSV or Parquet) with feature and label columns.
        val_path: validation file; leave empty and set val_fraction to carve validation rows out of train.
        test_path: test file (optional; ``moekit recsys test`` needs it).
        predict_path: unlabelled file scored by ``moekit recsys predict`` (label columns not needed);
            default: the test file, else the validation split.
        categorical: sparse (categorical) feature columns, embedded through a vocabulary fitted on train.
        numeric: dense (real-valued) feature columns, standardised with train mean and std.
        labels: binary 0/1 label columns, one per task, in task order.
        log1p: numeric columns transformed with sign(x)*log1p(|x|) before standardising (heavy tails).
        group: group column (e.g. user id) for GAUC, the per-user AUC weighted by impressions.
        numeric_as_categorical: numeric columns also embedded as categories of their raw value.
        sequences: sequence columns -> the categorical column whose vocabulary and embedding they share,
            e.g. ``{hist_items: item_id}``; values are ``|``-separated ids (``"12|7|3"``, oldest first).
        max_seq_len: keep the last (most recent) ids of each sequence, at most this many.
        seq_sep: separator of the ids in a sequence cell.
        fill_missing: missing numeric values: ``error`` (default; names the column and 1-based data row),
            ``mean`` (train mean) or ``zero``.
        min_count: categories seen fewer times than this on train map to the out-of-vocabulary index.
        val_fraction: with no val_path, the share of train rows held out for validation.
        val_time_column: with val_fraction, hold out the latest rows by this column (e.g. a timestamp)
            instead of a random sample.
        seed: seed of the random validation carve-out.
        preprocessor_path: load this fitted preprocessor (JSON) instead of fitting one on train.
        batch_size: train batch size.
        eval_batch_size: validation/test/predict batch size.
        sep: CSV separator.
    """

    def __init__(
        self,
        *,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        predict_path: str | None = None,
        categorical: list[str] | None = None,
        numeric: list[str] | None = None,
        labels: list[str] | None = None,
        log1p: list[str] | None = None,
        group: str | None = None,
        numeric_as_categorical: list[str] | None = None,
        sequences: dict[str, str] | None = None,
        max_seq_len: int = 50,
        seq_sep: str = "|",
        fill_missing: Literal["error", "mean", "zero"] = "error",
        min_count: int = 1,
        val_fraction: float | None = None,
        val_time_column: str | None = None,
        seed: int = 0,
        preprocessor_path: str | None = None,
        batch_size: int = 2048,
        eval_batch_size: int = 16384,
        sep: str = ",",
    ) -> None:
        super().__init__()
        # predict_path is not a hyper-parameter: `predict --ckpt_path` reopens the fit's MLflow run, which
        # refuses a changed parameter value
        self.save_hyperparameters(ignore=["predict_path"])
        self.predict_path = predict_path
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.preprocessor: TabularPreprocessor | None = None
        self._checkpoint_preprocessor: TabularPreprocessor | None = None
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self._schema_args = dict(
            categorical=tuple(categorical or ()), numeric=tuple(numeric or ()), labels=tuple(labels or ()),
            log1p=tuple(log1p or ()), group=group, min_count=min_count,
            numeric_as_categorical=tuple(numeric_as_categorical or ()), sequences=dict(sequences or {}),
            max_seq_len=max_seq_len, seq_sep=seq_sep, fill_missing=fill_missing,
        )  # fmt: skip
        if val_fraction is not None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if val_time_column and val_fraction is None:
            raise ValueError(
                "val_time_column needs val_fraction (the share of latest train rows to hold out)"
            )
        if val_fraction is not None and val_path:
            raise ValueError("give either val_path or val_fraction, not both")

    # subclasses override these two
    def schema(self) -> FeatureSchema:
        return FeatureSchema(**self._schema_args)

    def load_frames(self) -> dict[str, tuple[pd.DataFrame, str]]:
        """Raw frames per split name, with their source names for error messages."""
        hp = self.hparams
        out = {}
        for name, path in (("train", hp.train_path), ("val", hp.val_path), ("test", hp.test_path)):
            if path:
                out[name] = (read_table(path, sep=hp.sep), str(path))
        if "train" not in out and not hp.preprocessor_path:
            raise ValueError("MultiTaskDataModule: train_path is required unless preprocessor_path is given")
        if hp.val_fraction is not None and "train" in out:
            out["train"], out["val"] = carve_validation(
                *out["train"], fraction=hp.val_fraction, time_column=hp.val_time_column, seed=hp.seed
            )
        if "train" in out and "val" not in out:
            raise ValueError(
                "MultiTaskDataModule: no validation data: set data.init_args.val_path to a file, or "
                "data.init_args.val_fraction (e.g. 0.1, optionally with val_time_column) to hold out train "
                "rows"
            )
        return out

    def load_predict_frame(self) -> tuple[pd.DataFrame, str] | None:
        """The unlabelled rows ``moekit recsys predict`` scores (``predict_path``), if configured."""
        path = getattr(self, "predict_path", None)
        return (read_table(path, sep=self.hparams.sep), str(path)) if path else None

    def load_fitted_state(self, checkpoint: dict, source: str = "checkpoint") -> None:
        """Preprocess with the vocabularies and statistics a checkpoint was trained with (its ``preprocessor``
        entry, written by :class:`~apps.recsys.task.MultiTaskRecTask`) instead of fitting them on
        ``train_path`` again. ``moekit recsys test/validate/predict --ckpt_path`` call this before
        :meth:`setup`: category ids then mean what the model's embeddings learned, and numeric columns are
        standardised with the training statistics, whatever ``train_path`` or ``val_fraction`` hold now (a
        refit on a changed train file shifted every later category id, and the predictions with it, without
        an error). A checkpoint without that entry changes nothing.

        Raises:
            ValueError: the configured columns (schema) differ from the checkpoint's, naming both.
        """
        state = checkpoint.get("preprocessor") if isinstance(checkpoint, dict) else None
        if state is None:
            return
        if self.splits:
            raise RuntimeError("load_fitted_state must be called before setup()")
        self._checkpoint_preprocessor = TabularPreprocessor.from_state_dict(state)
        self._checkpoint_source = source

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            if stage == "predict" and "predict" not in self.splits and self.preprocessor is not None:
                pred = self.load_predict_frame()
                if pred is not None:
                    self.splits["predict"] = self.preprocessor.transform(
                        pred[0], source=pred[1], with_labels=False, report_unseen=True
                    )
            return
        frames = self.load_frames()
        schema = self.schema()
        if self.hparams.preprocessor_path:
            self.preprocessor = TabularPreprocessor.load(self.hparams.preprocessor_path)
            if self.preprocessor.schema != schema and (schema.categorical or schema.numeric):
                raise ValueError(
                    f"preprocessor {self.hparams.preprocessor_path} was fitted with a different schema "
                    f"({self.preprocessor.schema}) than configured ({schema})"
                )
        elif self._checkpoint_preprocessor is not None:
            self.preprocessor = self._checkpoint_preprocessor
            if self.preprocessor.schema != schema:
                saved = self.preprocessor.schema
                diff = "; ".join(
                    f"{f.name}: {getattr(saved, f.name)!r} there, {getattr(schema, f.name)!r} here"
                    for f in dataclasses.fields(schema)
                    if getattr(saved, f.name) != getattr(schema, f.name)
                )
                raise ValueError(
                    f"{self._checkpoint_source} was trained on other data settings than the config's "
                    f"({diff}); use the fit's settings with this checkpoint"
                )
            log.info("preprocessing with the vocabularies and statistics of %s", self._checkpoint_source)
        else:
            train_df, src = frames["train"]
            self.preprocessor = TabularPreprocessor.fit(train_df, schema, source=src)
        for name, (df, src) in frames.items():
            validate_frame(df, self.preprocessor.schema, source=src)
            self.splits[name] = self.preprocessor.transform(
                df, source=src, with_labels=True, report_unseen=name != "train"
            )
        if stage == "predict":
            pred = self.load_predict_frame()
            if pred is not None:
                self.splits["predict"] = self.preprocessor.transform(
                    pred[0], source=pred[1], with_labels=False, report_unseen=True
                )
        log.info("splits: %s", {k: len(v["cat"]) for k, v in self.splits.items()})

    # ------------------------------------------------------------------ facts the model needs
    @property
    def cardinalities(self) -> list[int]:
        return self._fitted().cardinalities

    @property
    def num_numeric(self) -> int:
        return self._fitted().num_numeric

    @property
    def task_names(self) -> list[str]:
        return self._fitted().task_names

    def _fitted(self) -> TabularPreprocessor:
        if self.preprocessor is None:
            raise RuntimeError("call setup() before reading the fitted preprocessor")
        return self.preprocessor

    # ------------------------------------------------------------------ loaders
    def _loader(self, name: str, *, train: bool) -> DataLoader:
        if name not in self.splits:
            raise RuntimeError(f"no {name} split configured")
        ds = TensorBatches(self.splits[name])
        sampler = RandomSampler(ds) if train else SequentialSampler(ds)
        bs = self.batch_size if train else self.eval_batch_size
        return DataLoader(ds, sampler=BatchSampler(sampler, batch_size=bs, drop_last=False), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        for name in ("predict", "test", "val"):
            if name in self.splits:
                return self._loader(name, train=False)
        raise RuntimeError("no split to predict on: set predict_path (or test_path)")

    @property
    def sequence_targets(self) -> list[int]:
        return self._fitted().schema.sequence_targets

    @property
    def feature_names(self) -> list[str]:
        """Embedded columns in ``cat`` order (per-feature embedding sizes are keyed by these names)."""
        return list(self._fitted().schema.embedded)

    def label_positive_rates(self) -> list[float]:
        """Per task, the share of positive labels in the train split (positive re-weighting)."""
        y = self.splits["train"]["labels"].double()
        return y.mean(0).tolist()


class CensusDataModule(MultiTaskDataModule):
    """Census-Income (KDD) with tasks ``income`` and ``never_married`` on the pinned 70/15/15 split.

    Args:
        data_dir: folder holding ``census_income_kdd/`` (default: ``apps.datadir.data_dir()``).
        train_file: optional user-supplied official train file (``census-income.data.gz``, 199,523 rows;
            download from the UCI URL in ``CENSUS_TRAIN_URL``). When given it is the train split, and the
            shipped file is split 50/50 (stratified, same unit rule) into validation and test, as in the
            MMoE paper.
        seed: split seed (42 is the pinned project split).
        max_train_rows: keep only the first N train rows (after shuffling with ``seed``): fast tests.
        numeric_as_categorical: also embed each numeric column's raw value as a category.
        min_count: category values seen fewer times on train map to the OOV bucket.
        batch_size, eval_batch_size: batch sizes.
    """

    def __init__(
        self,
        *,
        data_dir: str | None = None,
        train_file: str | None = None,
        seed: int = 42,
        max_train_rows: int | None = None,
        numeric_as_categorical: bool = True,
        min_count: int = 5,
        batch_size: int = 2048,
        eval_batch_size: int = 16384,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size)
        self.save_hyperparameters()

    def schema(self) -> FeatureSchema:
        return census_schema(
            numeric_as_categorical=self.hparams.numeric_as_categorical, min_count=self.hparams.min_count
        )

    def load_frames(self) -> dict[str, tuple[pd.DataFrame, str]]:
        hp = self.hparams
        df = load_census(hp.data_dir)
        src = str(data_dir(hp.data_dir) / CENSUS_FOLDER / CENSUS_FILE)
        if hp.train_file:
            train = read_census_file(Path(hp.train_file).expanduser(), sha256=None)
            _, va, te = stratified_unit_split(df, fractions=(0.0, 0.5), seed=hp.seed)
            frames = {"train": (train, str(hp.train_file))}
        else:
            tr, va, te = census_split_indices(df, seed=hp.seed)
            train = df.iloc[tr].reset_index(drop=True)
            frames = {"train": (train, src + " [train split]")}
        if hp.max_train_rows:
            rng = np.random.default_rng(hp.seed)
            keep = np.sort(rng.permutation(len(train))[: hp.max_train_rows])
            frames["train"] = (train.iloc[keep].reset_index(drop=True), frames["train"][1])
        frames["val"] = (df.iloc[va].reset_index(drop=True), src + " [val split]")
        frames["test"] = (df.iloc[te].reset_index(drop=True), src + " [test split]")
        return frames
