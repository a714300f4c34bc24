"""A tiny synthetic binary-classification app used to test the pipelines machinery (CLI, tuning, registry,
serving) in seconds, independently of the real apps. It lives with the tests and joins the app table through
``MOEKIT_APPS=toy=toy_app`` (see ``conftest.py``): adding an app is a module with an ``APP`` and one table
entry, nothing in ``pipelines/``.

Not a method file: no paper. The data are ``x ~ N(mu, sigma)`` with 4 raw columns ``x0..x3`` and a label
``y = 1[w . x + noise > 0]``; the fitted preprocessing is a per-column standardiser (fitted on train only),
so registry tests can check that serving applies the same transform as training.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import BinaryAUROC

FEATURES = ("x0", "x1", "x2", "x3")


@dataclass
class ToyStandardizer:
    """Per-column standardiser fitted on the train split (the toy's "fitted preprocessing").

    Attributes:
        columns: raw feature column names, in model order.
        mean: per-column train mean, shape (F,).
        std: per-column train standard deviation, shape (F,).
    """

    columns: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, df: pd.DataFrame, columns: tuple[str, ...] = FEATURES) -> ToyStandardizer:
        x = df[list(columns)].to_numpy(np.float64)
        return cls(columns=tuple(columns), mean=x.mean(0), std=x.std(0) + 1e-8)

    def transform(self, df: pd.DataFrame) -> torch.Tensor:
        """Raw frame (N rows, columns ``self.columns``) -> standardised float32 tensor (N, F)."""
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise ValueError(f"missing feature column(s) {missing}; expected {list(self.columns)}")
        x = df[list(self.columns)].to_numpy(np.float64)
        return torch.as_tensor((x - self.mean) / self.std, dtype=torch.float32)


def make_toy_frame(n: int, *, seed: int) -> pd.DataFrame:
    """Synthetic raw data: shifted/scaled Gaussian features and a noisy linear label."""
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=[3.0, -1.0, 10.0, 0.0], scale=[1.0, 2.0, 5.0, 0.5], size=(n, 4))
    w = np.array([1.0, -0.5, 0.2, 2.0])
    z = (x - [3.0, -1.0, 10.0, 0.0]) @ w + rng.normal(scale=0.7, size=n)
    df = pd.DataFrame(x, columns=list(FEATURES))
    df["y"] = (z > 0).astype(np.int64)
    return df


class ToyDataModule(L.LightningDataModule):
    """Synthetic tabular data with a fitted standardiser.

    Args:
        n_samples: rows generated (split 60/20/20 train/val/test).
        batch_size: mini-batch size.
        seed: data seed (independent of the training seed).
    """

    def __init__(self, *, n_samples: int = 512, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.seed = seed
        self.preprocessing: ToyStandardizer | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.preprocessing is not None:
            return
        df = make_toy_frame(self.n_samples, seed=self.seed)
        n_tr, n_va = int(0.6 * len(df)), int(0.2 * len(df))
        parts = {"train": df[:n_tr], "val": df[n_tr : n_tr + n_va], "test": df[n_tr + n_va :]}
        self.preprocessing = ToyStandardizer.fit(parts["train"])
        self.datasets = {
            k: TensorDataset(
                self.preprocessing.transform(v), torch.tensor(v["y"].to_numpy(), dtype=torch.float32)
            )
            for k, v in parts.items()
        }
        self.raw = parts

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["test"], batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["test"], batch_size=self.batch_size)


class ToyTask(L.LightningModule):
    """A one-hidden-layer MLP classifier that logs ``val/auc`` and ``test/auc``.

    Args:
        hidden_dim: hidden width.
        lr: Adam learning rate.
        invert: negate the logits at evaluation time only (a deliberately broken model whose val AUC is
            ``1 - AUC``, so tests can make a trial that Optuna's median pruner must prune, deterministically).
    """

    def __init__(self, *, hidden_dim: int = 8, lr: float = 0.05, invert: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(len(FEATURES), hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))
        self.lr = lr
        self.sign = -1.0 if invert else 1.0
        self.val_auc = BinaryAUROC()
        self.test_auc = BinaryAUROC()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, F) standardised features -> logits (N,)."""
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.sign * self(x)
        self.val_auc.update(logits, y.long())
        self.log("val/loss", nn.functional.binary_cross_entropy_with_logits(logits, y), on_epoch=True)
        self.log("val/auc", self.val_auc, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self.sign * self(x)
        self.test_auc.update(logits, y.long())
        self.log("test/loss", nn.functional.binary_cross_entropy_with_logits(logits, y), on_epoch=True)
        self.log("test/auc", self.test_auc, on_epoch=True)

    def predict_step(self, batch, batch_idx):
        return torch.sigmoid(self.sign * self(batch[0]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _require_columns(df: pd.DataFrame, columns: tuple[str, ...]) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a table (DataFrame / dataframe_split / inputs records), got {type(df)}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"input: missing column(s) {missing}; expected {list(columns)}")


def _require_numeric(df: pd.DataFrame, columns: tuple[str, ...]) -> None:
    for c in columns:
        if not pd.api.types.is_numeric_dtype(df[c]):
            try:
                df[c] = pd.to_numeric(df[c])
            except (ValueError, TypeError) as e:
                raise ValueError(f"column {c!r} must be numeric, got values like {df[c].iloc[0]!r}") from e
        if df[c].isna().any():
            raise ValueError(f"column {c!r} has {int(df[c].isna().sum())} missing/NaN value(s)")


@dataclass
class ToyPredictor:
    """Raw columns ``x0..x3`` -> probability ``p`` through the data module's fitted standardiser."""

    net: nn.Module
    preprocessing: ToyStandardizer

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        _require_columns(df, self.preprocessing.columns)
        df = df.copy()
        _require_numeric(df, self.preprocessing.columns)
        with torch.no_grad():
            p = torch.sigmoid(self.net(self.preprocessing.transform(df)).squeeze(-1))  # (N,)
        return pd.DataFrame({"p": p.numpy().astype(np.float64)})


@dataclass(frozen=True)
class ToyApp:
    """The toy app's contract (``pipelines.apps.MoekitApp``)."""

    name: str = "toy"
    monitor: str = "val/auc"
    direction: Literal["maximize", "minimize"] = "maximize"
    commands: Mapping[str, str] = field(default_factory=dict)
    predict_params: Mapping[str, Any] | None = None

    def search_space(self, trial) -> dict[str, Any]:  # noqa: ANN001 - optuna.Trial
        return {
            "model.init_args.hidden_dim": trial.suggest_categorical("hidden_dim", [4, 8, 16]),
            "model.init_args.lr": trial.suggest_float("lr", 1e-3, 1e-1, log=True),
        }

    def check_config(self, config: Mapping[str, Any]) -> None:
        """``model.init_args.width`` was renamed ``hidden_dim`` (exercises the renamed-key path)."""
        init = (config.get("model") or {}).get("init_args") or {}
        if "width" in init:
            raise ValueError("model.init_args.width was renamed: write model.init_args.hidden_dim")

    def build_predictor(self, module: L.LightningModule, datamodule: L.LightningDataModule) -> ToyPredictor:
        return ToyPredictor(
            net=copy.deepcopy(module.net).cpu().eval().requires_grad_(False),
            preprocessing=copy.deepcopy(datamodule.preprocessing),
        )

    def input_example(self, datamodule: L.LightningDataModule) -> pd.DataFrame:
        return datamodule.raw["test"][list(FEATURES)].head(5).reset_index(drop=True)

    def save_preprocessing(self, datamodule: L.LightningDataModule, out_dir: Path) -> list[Path]:
        path = Path(out_dir) / "toy_preprocessing.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(datamodule.preprocessing))
        return [path]

    def test_artifacts(
        self, module: L.LightningModule, datamodule: L.LightningDataModule, out_dir: Path
    ) -> list[Path]:
        return []


APP = ToyApp()
