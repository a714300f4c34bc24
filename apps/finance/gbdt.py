"""LightGBM baseline (Ke et al., NeurIPS 2017; qlib's ``contrib/model/gbdt.py`` settings for Alpha158).

Trained on the tabular view of the DataModule (one row per stock-day) with the CSZScore/CSRank learn label and
early stopping on the valid segment's L2 loss, as qlib's ``LGBModel`` does.
"""

from __future__ import annotations

import lightgbm as lgb
import numpy as np

# qlib examples/benchmarks/LightGBM/workflow_config_lightgbm_Alpha158.yaml (num_threads set per machine)
QLIB_PARAMS = {
    "objective": "regression",
    "learning_rate": 0.2,
    "colsample_bytree": 0.8879,
    "subsample": 0.8789,
    "lambda_l1": 205.6999,
    "lambda_l2": 580.9768,
    "max_depth": 8,
    "num_leaves": 210,
    "verbosity": -1,
    "subsample_freq": 1,
}


def fit_lightgbm(
    dm,
    *,
    seed: int = 0,
    num_threads: int = 2,
    num_boost_round: int = 500,  # noqa: ANN001
    early_stopping: int = 50,
    params: dict | None = None,
) -> lgb.Booster:
    """Fit LightGBM on ``dm``'s train days with early stopping on valid (``dm``: a set-up SP500DataModule)."""
    xt, yt, _, _ = dm.flat(dm.split.train, train=True)
    xv, yv, _, _ = dm.flat(dm.split.valid, train=True)
    p = {**QLIB_PARAMS, **(params or {}), "seed": seed, "num_threads": num_threads}
    dtrain, dvalid = lgb.Dataset(xt, yt), lgb.Dataset(xv, yv)
    return lgb.train(
        p,
        dtrain,
        num_boost_round,
        valid_sets=[dvalid],
        callbacks=[lgb.early_stopping(early_stopping, verbose=False)],
    )


def predict_lightgbm(booster: lgb.Booster, dm, days: np.ndarray):  # noqa: ANN001, ANN201
    """Long predictions table (``day, ticker_id, score, label``) for the given day indices."""
    import pandas as pd

    x, _, y_raw, idx = dm.flat(days, train=False)
    return pd.DataFrame(
        {"day": idx[:, 0], "ticker_id": idx[:, 1], "score": booster.predict(x), "label": y_raw}
    )
