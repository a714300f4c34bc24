"""LightGBM baseline (Ke et al., NeurIPS 2017; qlib's ``contrib/model/gbdt.py`` settings for Alpha158).

Trained on the tabular view of the DataModule (one row per stock-day) with the CSZScore/CSRank learn label and
early stopping on the valid segment's L2 loss, as qlib's ``LGBModel`` does.

CLI: ``moekit finance lightgbm --config <the fit YAML>`` trains on the config's data section, writes
valid+test predictions (``date, ticker, score, label, segment``) and prints the test IC summary, the backtest
with the data's rules and the predictions' path.
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
    y: np.ndarray | None = None,
) -> lgb.Booster:
    """Fit LightGBM on ``dm``'s train days with early stopping on valid (``dm``: a set-up DataModule; ``y``: a
    ``(days, tickers)`` learn label to use instead of ``dm.y``)."""
    xt, yt, _, _ = dm.flat(dm.split.train, train=True, y=y)
    xv, yv, _, _ = dm.flat(dm.split.valid, train=True, y=y)
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


def run(
    fit_config: str,
    *,
    out: str = "predictions/lightgbm.parquet",
    seed: int = 0,
    num_threads: int = 2,
    num_boost_round: int = 500,
    early_stopping: int = 50,
    topk: int = 50,
    n_drop: int = 5,
    data_dir: str | None = None,
) -> str:
    """Train LightGBM (qlib's Alpha158 parameters) on a fit config's data and backtest its test predictions.

    Args:
        fit_config: a ``moekit finance fit`` YAML (also accepted as ``--config``); its ``data`` section (a
            ``MarketDataModule``) is used.
        out: predictions Parquet written (valid + test days).
        seed: LightGBM seed.
        num_threads: LightGBM threads.
        num_boost_round: maximum boosting rounds.
        early_stopping: rounds without valid improvement before stopping.
        topk: stocks held by the TopK-Dropout backtest.
        n_drop: replacements per day.
        data_dir: root of the data sets (default ``apps.datadir.data_dir()``).

    Returns:
        The predictions path.
    """
    import os
    from pathlib import Path

    import pandas as pd

    from apps.finance.backtest import data_module_from_config, format_summary
    from apps.finance.metrics import daily_ic, ic_summary

    dm = data_module_from_config(fit_config)
    if data_dir is not None:
        dm.data_dir = data_dir
    dm.setup()
    booster = fit_lightgbm(
        dm, seed=seed, num_threads=num_threads, num_boost_round=num_boost_round, early_stopping=early_stopping
    )
    parts = []
    for seg, days in (("valid", dm.split.valid), ("test", dm.split.test)):
        f = predict_lightgbm(booster, dm, days).assign(segment=seg)
        parts.append(f)
    f = pd.concat(parts, ignore_index=True)
    f.insert(0, "date", dm.panel.dates[f["day"].to_numpy()])
    f.insert(1, "ticker", np.asarray(dm.panel.tickers)[f["ticker_id"].to_numpy()])
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    f.to_parquet(tmp)
    os.replace(tmp, path)
    test = f[f["segment"] == "test"]
    print(
        {k: round(v, 4) for k, v in ic_summary(daily_ic(test)).items()},
        f"best_iteration={booster.best_iteration}",
    )
    if hasattr(dm, "backtest"):
        print(format_summary(dm.backtest(test, segment=None, topk=topk, n_drop=n_drop).summary))
    print(f"predictions: {path}")
    return str(path)


def main(argv: list[str] | None = None) -> None:
    """``moekit finance lightgbm``: :func:`run` as a command."""
    from jsonargparse import CLI

    from apps.finance.backtest import fit_config_args

    CLI(run, args=fit_config_args(argv), as_positional=False, prog="moekit finance lightgbm")
