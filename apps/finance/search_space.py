"""Optuna search space of the finance app (used by ``moekit tune finance``).

``suggest(trial)`` returns dotted overrides of a finance LightningCLI config whose model is
:class:`apps.finance.model.MIGA` (wrapped by :class:`apps.finance.task.FinanceTask`). The objective is the
validation RankIC (mean daily Spearman correlation of scores and next returns).
"""

from __future__ import annotations

from typing import Any

MONITOR = "val/RankIC"
DIRECTION = "maximize"


def suggest(trial) -> dict[str, Any]:
    """Sample one MIGA configuration: ``{dotted.config.key: value}``."""
    experts = trial.suggest_categorical("experts_per_group", [2, 4, 8])
    return {
        "model.init_args.lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
        "model.init_args.weight_decay": trial.suggest_float("weight_decay", 1e-8, 1e-3, log=True),
        "model.init_args.loss": trial.suggest_categorical("loss", ["mse", "ic", "rank"]),
        "model.init_args.w_balance": trial.suggest_float("w_balance", 1e-3, 1e-1, log=True),
        "model.init_args.model.init_args.hidden_dim": trial.suggest_categorical("hidden_dim", [32, 64, 128]),
        "model.init_args.model.init_args.num_groups": trial.suggest_categorical("num_groups", [1, 2, 4]),
        "model.init_args.model.init_args.experts_per_group": experts,
        "model.init_args.model.init_args.top_k": trial.suggest_int("top_k", 1, experts),
        "model.init_args.model.init_args.dropout": trial.suggest_float("dropout", 0.0, 0.3),
    }
