"""Adapters of the real apps (recsys, finance, lm): see :mod:`pipelines.adapters`."""

from __future__ import annotations

from pipelines.adapters import AppAdapter

ADAPTERS: dict[str, AppAdapter] = {
    "recsys": AppAdapter(app="recsys", monitor="val/auc_mean", direction="maximize"),
    "finance": AppAdapter(app="finance", monitor="val/rank_ic", direction="maximize"),
    "lm": AppAdapter(app="lm", monitor="val/loss", direction="minimize"),
}
