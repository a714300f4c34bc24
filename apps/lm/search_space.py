"""Optuna search space of the lm app (used by ``moekit tune lm``).

``suggest(trial)`` returns dotted overrides of an lm LightningCLI config (optimiser and MoE loss weights;
architecture sizes stay in the config so active parameters remain matched). The objective is the validation
cross-entropy ``val/loss`` (minimised).
"""

from __future__ import annotations

from typing import Any

MONITOR = "val/loss"
DIRECTION = "minimize"


def suggest(trial) -> dict[str, Any]:
    """Sample one lm training configuration: ``{dotted.config.key: value}``."""
    return {
        "model.init_args.lr": trial.suggest_float("lr", 3e-4, 3e-3, log=True),
        "model.init_args.weight_decay": trial.suggest_float("weight_decay", 1e-3, 0.3, log=True),
        "model.init_args.w_balance": trial.suggest_float("w_balance", 1e-3, 1e-1, log=True),
        "model.init_args.w_z": trial.suggest_float("w_z", 1e-5, 1e-2, log=True),
    }
