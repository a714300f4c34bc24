"""Optuna search space of the recsys app (used by ``moekit tune recsys``).

``suggest(trial)`` returns dotted overrides of a recsys LightningCLI config; only arguments shared by every
backbone of :class:`apps.recsys.task.MultiTaskRecTask` are searched, so the same space serves the
Shared-Bottom, MMoE, PLE and HoME configs. The objective is the mean validation AUC over tasks.
"""

from __future__ import annotations

from typing import Any

MONITOR = "val/auc_mean"
DIRECTION = "maximize"

# Optuna categorical choices must be primitives: name the layer widths, map them to lists
EXPERT_HIDDEN = {"64": [64], "128": [128], "128-64": [128, 64], "256-128": [256, 128]}
TOWER_HIDDEN = {"16": [16], "32": [32], "64": [64]}


def suggest(trial) -> dict[str, Any]:
    """Sample one recsys configuration: ``{dotted.config.key: value}``."""
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
