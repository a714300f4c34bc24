"""The finance app's contract with the pipelines (``pipelines.apps.MoekitApp``): objective, search space, the
served predictor, the input example, the saved preprocessing, the test-time backtest report and the
``backtest`` command. Imports nothing from ``pipelines``.

Serving reuses training: the predictor cleans a raw panel window with
:func:`~apps.finance.data.validate_panel` and turns it into network inputs with the data module's own fitted
:class:`~apps.finance.data.PanelTransform`.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import pandas as pd
import torch

from apps.finance.data import COLS, PanelTransform, load_panel, validate_panel
from apps.finance.features import FIELDS


@dataclass
class FinancePredictor:
    """A long OHLCV panel window -> one score per ticker for the window's last date.

    Input rows: ``date, ticker, open, high, low, close, volume`` (one row per ticker and day; at least
    ``60 + step_len`` trading days: Alpha158 looks back up to 60 days from each of the last ``step_len``
    days). The window is cleaned like the training panel and goes through the training data module's fitted
    :class:`~apps.finance.data.PanelTransform`; the last ``step_len`` days of the tickers that have a close on
    the last date go through the network. Output: ``ticker, score, rank`` (rank 1 = the highest score, the
    first buy of a TopK strategy).

    Attributes:
        net: the trained network (eval mode, CPU).
        transform: the data module's fitted feature transform.
        step_len: T, days of history per sample.
        lookback: longest Alpha158/Alpha360 window.
    """

    net: torch.nn.Module
    transform: PanelTransform
    step_len: int
    lookback: int = 60

    @property
    def min_days(self) -> int:
        """Days needed so the last ``step_len`` days' features equal those computed on the full history."""
        return self.lookback + self.step_len

    def inputs(self, df: pd.DataFrame) -> tuple[torch.Tensor, np.ndarray]:
        """Network input ``x (N, T, F)`` of a raw panel window and the N tickers it scores."""
        if not isinstance(df, pd.DataFrame):
            raise ValueError(
                f"expected a long panel table with columns {list(COLS)}, got {type(df).__name__}"
            )
        missing = [c for c in COLS if c not in df.columns]
        if missing:
            raise ValueError(f"panel window: missing column(s) {missing}; expected {list(COLS)}")
        for c in FIELDS:
            bad = pd.to_numeric(df[c], errors="coerce").isna() & df[c].notna()
            if bad.any():
                raise ValueError(f"panel window: column {c!r} has non-numeric value {df[c][bad].iloc[0]!r}")
        try:
            long = load_panel(df)  # the training panel's fields (+ vwap when the window has it)
        except (TypeError, pd.errors.ParserError) as e:
            raise ValueError(f"panel window: {e}") from e
        price = [c for c in (*FIELDS, "vwap") if c in long.columns]
        bad = ~np.isfinite(long[price].to_numpy(dtype=np.float64))  # (rows, fields)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ValueError(
                f"panel window: {int(bad.any(axis=1).sum())} row(s) with NaN/inf values (first: ticker "
                f"{long['ticker'].iloc[i]}, date {pd.Timestamp(long['date'].iloc[i]).date()}, column "
                f"{price[j]!r}); send complete bars, suspended days left out"
            )
        dup = long.duplicated(["date", "ticker"])
        if dup.any():
            raise ValueError(f"panel window: {int(dup.sum())} duplicated (date, ticker) rows")
        with warnings.catch_warnings():  # validation counts are for data sets, not for requests
            warnings.simplefilter("ignore")
            wide = validate_panel(long).wide
        n_days = len(wide["close"])
        if n_days < self.min_days:
            raise ValueError(f"panel window: {n_days} trading day(s); need at least {self.min_days}")
        x = self.transform(wide)  # (days, tickers, F)
        want = getattr(self.net, "num_features", x.shape[-1])
        if x.shape[-1] != want:
            hint = " (the model was trained with VWAP: send a 'vwap' column)" if x.shape[-1] < want else ""
            raise ValueError(f"panel window gives {x.shape[-1]} features, the model expects {want}{hint}")
        present = wide["close"].iloc[-1].notna().to_numpy()  # (tickers,)
        x = x[-self.step_len :, present]  # (T, N, F)
        tickers = np.asarray(wide["close"].columns)[present]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2))), tickers  # (N, T, F)

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        x, tickers = self.inputs(df)
        with torch.no_grad():
            score = self.net(x).score.float()  # (N,)
        out = pd.DataFrame({"ticker": tickers.astype(str), "score": score.numpy().astype(np.float64)})
        out["rank"] = out["score"].rank(ascending=False, method="first").astype(np.int64)
        return out


COMMANDS = {"backtest": "apps.finance.backtest:main", "lightgbm": "apps.finance.gbdt:main"}
"""The app's extra commands, a literal: ``moekit --help`` reads it without importing this module."""


@dataclass(frozen=True)
class FinanceApp:
    """Daily cross-sectional stock scoring: MIGA and baselines on any market's daily bars (apps.finance)."""

    name: str = "finance"
    monitor: str = "val/RankIC"
    direction: Literal["maximize", "minimize"] = "maximize"
    commands: Mapping[str, str] = field(default_factory=lambda: dict(COMMANDS))
    predict_params: Mapping[str, Any] | None = None

    def search_space(self, trial) -> dict[str, Any]:  # noqa: ANN001 - optuna.Trial
        """One MIGA configuration (configs whose model is :class:`apps.finance.model.MIGA`)."""
        experts = trial.suggest_categorical("experts_per_group", [2, 4, 8])
        net = "model.init_args.model.init_args"
        return {
            "model.init_args.lr": trial.suggest_float("lr", 1e-4, 3e-3, log=True),
            "model.init_args.weight_decay": trial.suggest_float("weight_decay", 1e-8, 1e-3, log=True),
            "model.init_args.loss": trial.suggest_categorical("loss", ["mse", "ic", "rank"]),
            "model.init_args.w_balance": trial.suggest_float("w_balance", 1e-3, 1e-1, log=True),
            f"{net}.hidden_dim": trial.suggest_categorical("hidden_dim", [32, 64, 128]),
            f"{net}.num_groups": trial.suggest_categorical("num_groups", [1, 2, 4]),
            f"{net}.experts_per_group": experts,
            f"{net}.top_k": trial.suggest_int("top_k", 1, experts),
            f"{net}.dropout": trial.suggest_float("dropout", 0.0, 0.3),
        }

    def check_config(self, config: Mapping[str, Any]) -> None:
        """No finance key has been renamed."""

    def build_predictor(
        self, module: L.LightningModule, datamodule: L.LightningDataModule
    ) -> FinancePredictor:
        if getattr(datamodule.transform, "norm", None) is None:
            raise RuntimeError("finance: the datamodule's transform is not fitted (call setup() first)")
        return FinancePredictor(
            net=copy.deepcopy(module.model).cpu().eval().requires_grad_(False),
            transform=copy.deepcopy(datamodule.transform),
            step_len=datamodule.step_len,
        )

    def input_example(self, datamodule: L.LightningDataModule, n_tickers: int = 5) -> pd.DataFrame:
        n_days = 60 + datamodule.step_len + 5
        wide = datamodule.panel.wide
        close = wide["close"]
        tickers = [t for t in close.columns if close[t].iloc[-n_days:].notna().all()][:n_tickers]
        frames = []
        for t in tickers:
            f = pd.DataFrame({k: wide[k][t].iloc[-n_days:] for k in (*FIELDS, "vwap") if k in wide})
            f.insert(0, "ticker", t)
            f.insert(0, "date", f.index.strftime("%Y-%m-%d"))
            frames.append(f.reset_index(drop=True))
        return pd.concat(frames, ignore_index=True)

    def save_preprocessing(self, datamodule: L.LightningDataModule, out_dir: Path) -> list[Path]:
        import pickle

        transform = getattr(datamodule, "transform", None)
        if transform is None or transform.norm is None:
            return []
        path = Path(out_dir) / "finance_preprocessing.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(transform))
        return [path]

    def test_artifacts(
        self, module: L.LightningModule, datamodule: L.LightningDataModule, out_dir: Path
    ) -> list[Path]:
        """Backtest the test-period predictions (TopK-Dropout, costs and the market's rules, excess over the
        data's benchmark; ^GSPC for the S&P panel): curve, daily IC,
        expert usage (PNG), daily report (CSV) and summary (JSON). topk 50 / n_drop 5 (qlib's defaults),
        scaled down for small universes (tiny configs)."""
        from apps.finance.backtest import backtest_predictions, format_summary
        from apps.finance.metrics import daily_ic
        from apps.finance.plots import plot_daily_ic, plot_excess, plot_expert_usage
        from apps.finance.task import write_predictions

        out_dir.mkdir(parents=True, exist_ok=True)
        preds = write_predictions(module, datamodule, str(out_dir / "predictions.parquet"))
        test = preds[preds["segment"] == "test"]
        n = test["ticker"].nunique()
        topk = 50 if n >= 250 else max(1, n // 5)
        n_drop = max(1, topk // 10)
        if hasattr(datamodule, "backtest"):  # any market: its benchmark, calendar and rules preset
            res = datamodule.backtest(preds, segment="test", topk=topk, n_drop=n_drop)
        else:
            res = backtest_predictions(
                preds, data_dir=datamodule.data_dir, segment="test", topk=topk, n_drop=n_drop
            )
        ic = daily_ic(test)
        res.report.to_csv(out_dir / "backtest_report.csv")
        (out_dir / "backtest_summary.json").write_text(json.dumps(res.summary, indent=1, default=str))
        plot_excess(res.report, out_dir / "backtest_excess.png", title=format_summary(res.summary))
        plot_daily_ic(ic, out_dir / "daily_ic.png")
        names = ["backtest_report.csv", "backtest_summary.json", "backtest_excess.png", "daily_ic.png"]
        if any(c.startswith("w_e") for c in test.columns):
            plot_expert_usage(test, out_dir / "expert_usage.png")
            names.append("expert_usage.png")
        return [out_dir / f for f in names]


APP = FinanceApp()
