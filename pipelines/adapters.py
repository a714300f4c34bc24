"""Per-app glue between the generic pipelines and each app: what to monitor, how to export the fitted
preprocessing, and how to turn a trained LightningModule plus its DataModule into a *predictor* that takes raw
inputs (a pandas DataFrame) and returns predictions. Predictors are plain picklable objects; the registry
stores one inside an MLflow pyfunc model (see :mod:`pipelines.pyfunc_model`).

Predictors raise ``ValueError`` with a message naming the problem (missing column, wrong type, NaN, unknown
ticker...); the pyfunc turns that into an MLflow ``INVALID_PARAMETER_VALUE`` error, which the scoring server
answers with HTTP 400.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch


def _frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(module).cpu().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _require_columns(df: pd.DataFrame, columns: list[str] | tuple[str, ...], what: str = "input") -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(
            f"{what}: expected a table (DataFrame / dataframe_split / inputs records), got {type(df)}"
        )
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; expected {list(columns)}")


def _require_numeric(df: pd.DataFrame, columns: list[str] | tuple[str, ...]) -> None:
    for c in columns:
        if not pd.api.types.is_numeric_dtype(df[c]):
            try:
                df[c] = pd.to_numeric(df[c])
            except (ValueError, TypeError) as e:
                raise ValueError(f"column {c!r} must be numeric, got values like {df[c].iloc[0]!r}") from e
        if df[c].isna().any():
            raise ValueError(f"column {c!r} has {int(df[c].isna().sum())} missing/NaN value(s)")


@dataclass
class AppAdapter:
    """Base adapter.

    Attributes:
        app: app name.
        monitor: validation metric the tuner optimises and prunes on.
        direction: ``maximize`` or ``minimize``.
    """

    app: str
    monitor: str
    direction: Literal["maximize", "minimize"]

    def preprocessing(self, datamodule: L.LightningDataModule) -> Any:
        """The fitted preprocessing object of a set-up datamodule (None when the app has none)."""
        import inspect

        for name in ("preprocessing", "preprocessor", "processors", "tokenizer"):
            obj = getattr(datamodule, name, None)
            if obj is not None and not inspect.ismethod(obj):
                return obj
        return None

    def save_preprocessing(self, datamodule: L.LightningDataModule, out_dir: Path) -> list[Path]:
        """Write the fitted preprocessing to ``out_dir``; return the files written."""
        obj = self.preprocessing(datamodule)
        if obj is None:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        if hasattr(obj, "save") and callable(obj.save) and hasattr(obj, "state_dict"):
            target = out_dir / f"{self.app}_preprocessing.json"
            obj.save(target)
            return sorted(p for p in out_dir.rglob("*") if p.is_file())
        path = out_dir / f"{self.app}_preprocessing.pkl"
        with open(path, "wb") as f:
            pickle.dump(obj, f)
        return [path]

    def test_artifacts(
        self, trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule, out_dir: Path
    ) -> list[Path]:
        """App-specific files (plots, tables) to log at the end of ``test``; none by default."""
        return []

    def build_predictor(self, model: L.LightningModule, datamodule: L.LightningDataModule) -> Any:
        """A picklable object with ``predict(DataFrame) -> DataFrame`` on raw inputs (see module doc)."""
        raise NotImplementedError(f"no predictor for app {self.app!r} yet")

    def input_example(self, datamodule: L.LightningDataModule) -> pd.DataFrame:
        """A few raw input rows (used for the model signature and as MLflow's input example)."""
        raise NotImplementedError(f"no input example for app {self.app!r} yet")


# -- toy -----------------------------------------------------------------------------------------------------
FEATURES_TOY = ("x0", "x1", "x2", "x3")


@dataclass
class ToyPredictor:
    """Raw columns ``x0..x3`` -> probability ``p`` (the toy app's serving function)."""

    net: torch.nn.Module
    preprocessing: Any
    columns: tuple[str, ...] = field(default=("x0", "x1", "x2", "x3"))

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        _require_columns(df, self.columns)
        df = df.copy()
        _require_numeric(df, self.columns)
        with torch.no_grad():
            p = torch.sigmoid(self.net(self.preprocessing.transform(df)).squeeze(-1))  # (N,)
        return pd.DataFrame({"p": p.numpy().astype(np.float64)})


class ToyAdapter(AppAdapter):
    def build_predictor(self, model, datamodule) -> ToyPredictor:
        return ToyPredictor(
            net=_frozen_copy(model.net), preprocessing=copy.deepcopy(datamodule.preprocessing)
        )

    def input_example(self, datamodule) -> pd.DataFrame:
        return datamodule.raw["test"][list(FEATURES_TOY)].head(5).reset_index(drop=True)


ADAPTERS: dict[str, AppAdapter] = {
    "toy": ToyAdapter(app="toy", monitor="val/auc", direction="maximize"),
}


def get_adapter(app: str) -> AppAdapter:
    """The adapter of ``app``; raises ValueError naming the known apps."""
    _register_app_adapters()
    if app not in ADAPTERS:
        raise ValueError(f"app={app!r}: no adapter; known apps: {sorted(ADAPTERS)}")
    return ADAPTERS[app]


def _register_app_adapters() -> None:
    """Import the real apps' adapters lazily (the apps import heavy modules)."""
    if "recsys" in ADAPTERS:
        return
    from pipelines import app_adapters

    ADAPTERS.update(app_adapters.ADAPTERS)
