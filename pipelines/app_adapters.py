"""Adapters of the real apps (recsys, finance, lm): see :mod:`pipelines.adapters`.

Each app is imported lazily inside the methods, so importing this module stays cheap.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from pipelines.adapters import AppAdapter, _frozen_copy


# -- recsys --------------------------------------------------------------------------------------------------
@dataclass
class RecsysPredictor:
    """Raw feature columns -> one probability column per task (e.g. ``income``, ``never_married``).

    Attributes:
        net: the trained ``MultiTaskNet`` (eval mode, CPU).
        preprocessor: the fitted ``TabularPreprocessor`` used at training time.
        task_names: task order of the network's logits.
    """

    net: torch.nn.Module
    preprocessor: Any
    task_names: list[str]

    @property
    def feature_columns(self) -> list[str]:
        s = self.preprocessor.schema
        return [*s.categorical, *s.numeric]

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"expected a table of raw feature columns, got {type(df).__name__}")
        tensors = self.preprocessor.transform(df, source="request", with_labels=False)
        with torch.no_grad():
            probs = torch.sigmoid(self.net(tensors["cat"], tensors["num"]).logits.float())  # (N, M)
        return pd.DataFrame(
            {t: probs[:, k].numpy().astype(np.float64) for k, t in enumerate(self.task_names)}
        )


class RecsysAdapter(AppAdapter):
    def preprocessing(self, datamodule: L.LightningDataModule) -> Any:
        return getattr(datamodule, "preprocessor", None)

    def build_predictor(self, model: L.LightningModule, datamodule: L.LightningDataModule) -> RecsysPredictor:
        if datamodule.preprocessor is None:
            raise RuntimeError("recsys: the datamodule has no fitted preprocessor (call setup() first)")
        return RecsysPredictor(
            net=_frozen_copy(model.net),
            preprocessor=copy.deepcopy(datamodule.preprocessor),
            task_names=list(model.task_names),
        )

    def raw_frame(self, datamodule: L.LightningDataModule, split: str = "test") -> pd.DataFrame:
        frames = datamodule.load_frames()
        return frames[split if split in frames else "val"][0]

    def input_example(self, datamodule: L.LightningDataModule) -> pd.DataFrame:
        # raw dtypes of the training file (census codes and counts are integers): the preprocessor keys
        # its vocabularies on str(raw value), so a served 35.0 must not silently become another category
        s = datamodule.preprocessor.schema
        cols = list(dict.fromkeys([*s.categorical, *s.numeric]))
        return self.raw_frame(datamodule)[cols].head(5).reset_index(drop=True)


# -- finance -------------------------------------------------------------------------------------------------
@dataclass
class FinancePredictor:
    """A long OHLCV panel window -> one score per ticker for the window's last date.

    Input rows: ``date, ticker, open, high, low, close, volume`` (one row per ticker and day; at least
    ``60 + step_len`` trading days: Alpha158 looks back up to 60 days from each of the last ``step_len``
    days). The features are computed as in training (Alpha158/Alpha360), normalised with the
    RobustZScoreNorm fitted on the training window, NaN -> 0, and the last ``step_len`` days go through the
    network. Output: ``ticker, score, rank`` (rank 1 = the
    highest score, the first buy of a TopK strategy), for the tickers that have a close on the last date.
    """

    net: torch.nn.Module
    norm: Any
    kind: str
    step_len: int
    lookback: int = 60  # longest Alpha158/Alpha360 window

    @property
    def min_days(self) -> int:
        """Days needed so the last ``step_len`` days' features equal those computed on the full history."""
        return self.lookback + self.step_len

    def predict(self, df: pd.DataFrame) -> pd.DataFrame:
        from apps.finance.data import COLS, load_panel
        from apps.finance.features import FIELDS, alpha158, alpha360, stack_features
        from apps.finance.processors import fillna

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
            panel = load_panel(df)
        except (TypeError, pd.errors.ParserError) as e:
            raise ValueError(f"panel window: {e}") from e
        dup = panel.duplicated(["date", "ticker"])
        if dup.any():
            raise ValueError(f"panel window: {int(dup.sum())} duplicated (date, ticker) rows")
        wide = {f: panel.pivot(index="date", columns="ticker", values=f).sort_index() for f in FIELDS}
        n_days = len(wide["close"])
        if n_days < self.min_days:
            raise ValueError(f"panel window: {n_days} trading day(s); need at least {self.min_days}")
        feats = alpha158(wide) if self.kind == "alpha158" else alpha360(wide)
        x = stack_features(feats)  # (days, tickers, F)
        present = wide["close"].iloc[-1].notna().to_numpy()  # (tickers,)
        x = fillna(self.norm.transform(x))[-self.step_len :, present]  # (T, N, F)
        tickers = np.asarray(wide["close"].columns)[present]
        with torch.no_grad():
            score = self.net(
                torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2)))
            ).score.float()  # (N,)
        out = pd.DataFrame({"ticker": tickers.astype(str), "score": score.numpy().astype(np.float64)})
        out["rank"] = out["score"].rank(ascending=False, method="first").astype(np.int64)
        return out


class FinanceAdapter(AppAdapter):
    def preprocessing(self, datamodule: L.LightningDataModule) -> Any:
        return getattr(datamodule, "norm", None)

    def build_predictor(
        self, model: L.LightningModule, datamodule: L.LightningDataModule
    ) -> FinancePredictor:
        return FinancePredictor(
            net=_frozen_copy(model.model),
            norm=copy.deepcopy(datamodule.norm),
            kind=datamodule.kind,
            step_len=datamodule.step_len,
        )

    def test_artifacts(self, trainer, model, datamodule, out_dir) -> list:
        """Backtest the test-period predictions (TopK-Dropout, costs, excess over ^GSPC): curve, daily IC,
        expert usage (PNG), daily report (CSV) and summary (JSON). topk 50 / n_drop 5 (qlib's defaults),
        scaled down for small universes (tiny configs)."""
        import json

        from apps.finance.backtest import backtest_predictions, format_summary
        from apps.finance.metrics import daily_ic
        from apps.finance.plots import plot_daily_ic, plot_excess, plot_expert_usage
        from apps.finance.task import write_predictions

        out_dir.mkdir(parents=True, exist_ok=True)
        preds = write_predictions(model, datamodule, str(out_dir / "predictions.parquet"))
        test = preds[preds["segment"] == "test"]
        n = test["ticker"].nunique()
        topk = 50 if n >= 250 else max(1, n // 5)
        n_drop = max(1, topk // 10)
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

    def input_example(self, datamodule: L.LightningDataModule, n_tickers: int = 5) -> pd.DataFrame:
        n_days = 60 + datamodule.step_len + 5
        wide = datamodule.panel.wide
        close = wide["close"]
        tickers = [t for t in close.columns if close[t].iloc[-n_days:].notna().all()][:n_tickers]
        frames = []
        for t in tickers:
            f = pd.DataFrame(
                {k: wide[k][t].iloc[-n_days:] for k in ("open", "high", "low", "close", "volume")}
            )
            f.insert(0, "ticker", t)
            f.insert(0, "date", f.index.strftime("%Y-%m-%d"))
            frames.append(f.reset_index(drop=True))
        return pd.concat(frames, ignore_index=True)


# -- lm ------------------------------------------------------------------------------------------------------
LM_PARAMS = {"max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False, "seed": 0}


@dataclass
class LMPredictor:
    """A ``prompt`` column -> a ``text`` column: the prompt plus its continuation (``apps.lm.generate``).

    Generation options come as MLflow ``params`` (defaults in :data:`LM_PARAMS`; ``top_k=0`` and
    ``top_p=1.0`` mean off). The tokenizer is stored as its JSON and rebuilt on first use.
    """

    model: torch.nn.Module
    tokenizer_json: str
    max_prompt_chars: int = 10_000
    max_new_tokens_limit: int = 2048

    def predict(self, df: pd.DataFrame, **params: Any) -> pd.DataFrame:
        from apps.lm.generate import generate
        from apps.lm.tokenizers import tokenizer_from_json

        if not isinstance(df, pd.DataFrame) or "prompt" not in df.columns:
            raise ValueError("expected a table with a 'prompt' column (one prompt per row)")
        unknown = set(params) - set(LM_PARAMS)
        if unknown:
            raise ValueError(f"unknown generation params {sorted(unknown)}; known: {sorted(LM_PARAMS)}")
        p = {**LM_PARAMS, **{k: v for k, v in params.items() if v is not None}}
        n = int(p["max_new_tokens"])
        if not 0 < n <= self.max_new_tokens_limit:
            raise ValueError(f"max_new_tokens must be in 1..{self.max_new_tokens_limit}, got {n}")
        if not hasattr(self, "_tok"):
            self._tok = tokenizer_from_json(self.tokenizer_json)
        texts = []
        for i, prompt in enumerate(df["prompt"].tolist()):
            if not isinstance(prompt, str) or not prompt:
                raise ValueError(f"row {i}: prompt must be a non-empty string, got {prompt!r}")
            if len(prompt) > self.max_prompt_chars:
                raise ValueError(f"row {i}: prompt longer than {self.max_prompt_chars} characters")
            texts.append(generate(
                self.model, self._tok, prompt, max_new_tokens=n, temperature=float(p["temperature"]),
                top_k=int(p["top_k"]) or None, top_p=float(p["top_p"]) if p["top_p"] < 1.0 else None,
                greedy=bool(p["greedy"]), seed=int(p["seed"]),
            ))  # fmt: skip
        return pd.DataFrame({"text": texts})

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_tok"}


class LMAdapter(AppAdapter):
    params = LM_PARAMS

    def preprocessing(self, datamodule: L.LightningDataModule) -> Any:
        return getattr(datamodule, "tokenizer", None)

    def save_preprocessing(self, datamodule: L.LightningDataModule, out_dir) -> list:
        tok = self.preprocessing(datamodule)
        if tok is None:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "lm_tokenizer.json"
        path.write_text(tok.to_json())
        return [path]

    def build_predictor(self, model: L.LightningModule, datamodule: L.LightningDataModule) -> LMPredictor:
        tok = model.tokenizer or getattr(datamodule, "tokenizer", None)
        if tok is None or model.model is None:
            raise RuntimeError("lm: the task has no built model/tokenizer (train or restore it first)")
        return LMPredictor(model=_frozen_copy(model.model), tokenizer_json=tok.to_json())

    def input_example(self, datamodule: L.LightningDataModule) -> pd.DataFrame:
        return pd.DataFrame({"prompt": ["ROMEO:", "First Citizen:\n"]})


ADAPTERS: dict[str, AppAdapter] = {
    "recsys": RecsysAdapter(app="recsys", monitor="val/auc_mean", direction="maximize"),
    "finance": FinanceAdapter(app="finance", monitor="val/RankIC", direction="maximize"),
    "lm": LMAdapter(app="lm", monitor="val/loss", direction="minimize"),
}
