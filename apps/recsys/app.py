"""The recsys app's contract with the pipelines (``pipelines.apps.MoekitApp``): objective, search space, the
served predictor, the input example and the saved preprocessing. Imports nothing from ``pipelines``.

Serving reuses training: the predictor holds the data module's fitted
:class:`~apps.recsys.schema.TabularPreprocessor` and turns raw rows into network inputs with the same
``transform`` the data module applied to every split. Requests are checked first, not coerced
(``TabularPreprocessor.check_request``): a value of the wrong type, a non-integral value in an integer column,
a value out of range or a null raises a ``ValueError`` naming column, row and value (HTTP 400 when served).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch

from apps.recsys.schema import TabularPreprocessor
from apps.recsys.task import MOVED_TO_BACKBONE, moved_argument_error, old_backbone_error

# Optuna categorical choices must be primitives: name the layer widths, map them to lists
EXPERT_HIDDEN = {"64": [64], "128": [128], "128-64": [128, 64], "256-128": [256, 128]}
TOWER_HIDDEN = {"16": [16], "32": [32], "64": [64]}
OLD_BACKBONE_NAMES = ("shared_bottom", "mmoe", "ple", "home")


@dataclass
class RecsysPredictor:
    """Raw feature columns -> one probability column per task (e.g. ``income``, ``never_married``).

    Attributes:
        net: the trained ``MultiTaskNet`` (eval mode, CPU).
        preprocessor: the fitted ``TabularPreprocessor`` of the training data module.
        task_names: task order of the network's logits.
        joiner: for data modules whose model rows are built from several tables (KuaiRand: interaction
            rows + user features + video features + watch history), the fitted joiner that turns a raw
            request row into a model row (:class:`apps.recsys.kuairand.KuaiRandJoiner`); None for plain
            tables.
    """

    net: torch.nn.Module
    preprocessor: TabularPreprocessor
    task_names: list[str]
    joiner: Any = None

    @property
    def feature_columns(self) -> list[str]:
        if self.joiner is not None:
            return list(self.joiner.request_columns)
        return list(self.preprocessor.schema.features)

    def inputs(self, df: pd.DataFrame) -> dict[str, torch.Tensor]:
        """Network inputs ``cat (B, C)``, ``num (B, F)`` (and ``seq``, ``seq_mask``) of raw rows: the join
        (when the data module has one), the request check, then the data module's own transform."""
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"expected a table of raw feature columns, got {type(df).__name__}")
        if self.joiner is not None:
            df = self.joiner.join(df, source="request")
        checked = self.preprocessor.check_request(df, source="request")
        return self.preprocessor.transform(checked, source="request", with_labels=False, report_unseen=True)

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        x = self.inputs(df)
        with torch.no_grad():
            out = self.net(x["cat"], x["num"], x.get("seq"), x.get("seq_mask"))
            probs = torch.sigmoid(out.logits.float())  # (B, M)
        return pd.DataFrame(
            {t: probs[:, k].numpy().astype(np.float64) for k, t in enumerate(self.task_names)}
        )


COMMANDS: dict[str, str] = {}
"""The app's extra commands, a literal: ``moekit --help`` reads it without importing this module."""


@dataclass(frozen=True)
class RecsysApp:
    """Multi-task recommendation: Shared-Bottom, MMoE, PLE, HoME (:mod:`apps.recsys.task`)."""

    name: str = "recsys"
    monitor: str = "val/auc_mean"
    direction: Literal["maximize", "minimize"] = "maximize"
    commands: Mapping[str, str] = field(default_factory=lambda: dict(COMMANDS))
    predict_params: Mapping[str, Any] | None = None

    def search_space(self, trial) -> dict[str, Any]:  # noqa: ANN001 - optuna.Trial
        """Arguments every backbone has, so one space serves the Shared-Bottom, MMoE, PLE and HoME configs."""
        return {
            "model.init_args.lr": trial.suggest_float("lr", 3e-4, 1e-2, log=True),
            "model.init_args.weight_decay": trial.suggest_float("weight_decay", 1e-8, 1e-4, log=True),
            "model.init_args.embed_dim": trial.suggest_categorical("embed_dim", [4, 8, 16]),
            "model.init_args.backbone.init_args.expert_hidden": EXPERT_HIDDEN[
                trial.suggest_categorical("expert_hidden", list(EXPERT_HIDDEN))
            ],
            "model.init_args.tower_hidden": TOWER_HIDDEN[
                trial.suggest_categorical("tower_hidden", list(TOWER_HIDDEN))
            ],
            "model.init_args.tower_dropout": trial.suggest_float("tower_dropout", 0.0, 0.3),
            "data.init_args.batch_size": trial.suggest_categorical("batch_size", [512, 1024, 2048]),
        }

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Old ``backbone: <name>`` strings and network arguments beside it name the injected form."""
        model = config.get("model")
        if not isinstance(model, Mapping):
            return
        if not str(model.get("class_path", "MultiTaskRecTask")).endswith("MultiTaskRecTask"):
            return
        args = {**model, **(model.get("init_args") or {})}
        if args.get("backbone") in OLD_BACKBONE_NAMES:
            raise ValueError(old_backbone_error(args["backbone"]))
        moved = [k for k in MOVED_TO_BACKBONE if k in args]
        if moved:
            raise ValueError(moved_argument_error(moved))

    def build_predictor(
        self, module: L.LightningModule, datamodule: L.LightningDataModule
    ) -> RecsysPredictor:
        if getattr(datamodule, "preprocessor", None) is None:
            raise RuntimeError("recsys: the datamodule has no fitted preprocessor (call setup() first)")
        joiner = getattr(datamodule, "joiner", None)
        return RecsysPredictor(
            net=copy.deepcopy(module.net).cpu().eval().requires_grad_(False),
            preprocessor=copy.deepcopy(datamodule.preprocessor),
            task_names=list(module.task_names),
            joiner=copy.deepcopy(joiner) if joiner is not None else None,
        )

    def input_example(self, datamodule: L.LightningDataModule) -> pd.DataFrame:
        # raw dtypes of the training file: the signature says string for text columns and long for the census
        # codes and counts (integers), double for real columns. The server parses JSON without casting to
        # these types (pipelines.serve.create_app), so MLflow's check answers 38.9 in a long column with 400
        # instead of scoring 38; check_request does the rest (nulls, numbers in string columns, ranges).
        joiner = getattr(datamodule, "joiner", None)
        if joiner is not None:  # raw rows of the interaction table
            return joiner.input_example()
        s = datamodule.preprocessor.schema
        cols = list(s.features)
        frames = datamodule.load_frames()
        raw = frames["test" if "test" in frames else "val"][0]
        example = raw[cols].head(5).reset_index(drop=True)
        example.attrs = {}  # no file-row bookkeeping of a carved part in the logged example
        return example

    def save_preprocessing(self, datamodule: L.LightningDataModule, out_dir: Path) -> list[Path]:
        pre = getattr(datamodule, "preprocessor", None)
        if pre is None:
            return []
        return [pre.save(Path(out_dir) / "recsys_preprocessing.json")]

    def test_artifacts(
        self, module: L.LightningModule, datamodule: L.LightningDataModule, out_dir: Path
    ) -> list[Path]:
        return []


APP = RecsysApp()
