"""The lm app's contract with the pipelines (``pipelines.apps.MoekitApp``): objective, search space, the
served predictor (prompt -> generated text), the input example, the saved tokenizer and the ``generate``,
``merge`` and ``quantize`` commands. Imports nothing from ``pipelines``.

Serving reuses training: the predictor carries the tokenizer the data module fitted (as its JSON) and
generates with :func:`apps.lm.generate.generate`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import pandas as pd
import torch

PREDICT_PARAMS: dict[str, Any] = {
    "max_new_tokens": 64, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "greedy": False, "seed": 0,
}  # fmt: skip
"""Generation options of the served model (MLflow ``params``); ``top_k=0`` and ``top_p=1.0`` mean off."""


@dataclass
class LMPredictor:
    """A ``prompt`` column -> a ``text`` column: the prompt plus its continuation (``apps.lm.generate``).

    Generation options come as MLflow ``params`` (defaults in :data:`PREDICT_PARAMS`). The tokenizer is stored
    as its JSON and rebuilt on first use.
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
        p = check_predict_params(params, max_new_tokens_limit=self.max_new_tokens_limit)
        n = p["max_new_tokens"]
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


def check_predict_params(params: Mapping[str, Any], *, max_new_tokens_limit: int = 2048) -> dict[str, Any]:
    """The generation options of a served request, checked without coercion, merged over the defaults.

    ``max_new_tokens`` (1..limit), ``top_k`` (>= 0, 0 = off) and ``seed`` must be integers (not bools, not
    ``"5"`` or ``5.0``); ``temperature`` (> 0) and ``top_p`` (in (0, 1]) numbers; ``greedy`` a bool. None
    means the default. Numpy scalars (what MLflow's params schema delivers) count as their Python kinds.

    Raises:
        ValueError: an unknown option, or a value of the wrong type or range; the message names it.
    """
    import numbers

    unknown = set(params) - set(PREDICT_PARAMS)
    if unknown:
        raise ValueError(f"unknown generation params {sorted(unknown)}; known: {sorted(PREDICT_PARAMS)}")
    out = dict(PREDICT_PARAMS)
    for k, v in params.items():
        if v is None:
            continue
        if hasattr(v, "item") and not isinstance(v, (str, bytes)):
            v = v.item()  # numpy scalar -> Python scalar, same kind
        if k == "greedy":
            if not isinstance(v, bool):
                raise ValueError(f"param greedy must be a bool, got {v!r} ({type(v).__name__})")
        elif k in ("max_new_tokens", "top_k", "seed"):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"param {k} must be an integer, got {v!r} ({type(v).__name__})")
        elif isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"param {k} must be a number, got {v!r} ({type(v).__name__})")
        out[k] = v
    if not 0 < out["max_new_tokens"] <= max_new_tokens_limit:
        n = out["max_new_tokens"]
        raise ValueError(f"param max_new_tokens must be in 1..{max_new_tokens_limit}, got {n}")
    if out["top_k"] < 0:
        raise ValueError(f"param top_k must be >= 0 (0: off), got {out['top_k']}")
    if not out["temperature"] > 0:
        raise ValueError(f"param temperature must be > 0, got {out['temperature']}")
    if not 0 < out["top_p"] <= 1:
        raise ValueError(f"param top_p must be in (0, 1] (1: off), got {out['top_p']}")
    return out


COMMANDS = {
    "generate": "apps.lm.commands:generate",
    "merge": "apps.lm.commands:merge",
    "quantize": "apps.lm.commands:quantize",
    "import": "apps.lm.commands:import_",
    "export": "apps.lm.commands:export",
}
"""The app's extra commands, a literal: ``moekit --help`` reads it without importing this module."""


@dataclass(frozen=True)
class LMApp:
    """MoE language-model pretraining (:mod:`apps.lm`)."""

    name: str = "lm"
    monitor: str = "val/loss"
    direction: Literal["maximize", "minimize"] = "minimize"
    commands: Mapping[str, str] = field(default_factory=lambda: dict(COMMANDS))
    predict_params: Mapping[str, Any] | None = field(default_factory=lambda: dict(PREDICT_PARAMS))

    def search_space(self, trial) -> dict[str, Any]:  # noqa: ANN001 - optuna.Trial
        """Optimiser and MoE loss weights; architecture sizes stay in the config (active parameters match)."""
        return {
            "model.init_args.lr": trial.suggest_float("lr", 3e-4, 3e-3, log=True),
            "model.init_args.weight_decay": trial.suggest_float("weight_decay", 1e-3, 0.3, log=True),
            "model.init_args.w_balance": trial.suggest_float("w_balance", 1e-3, 1e-1, log=True),
            "model.init_args.w_z": trial.suggest_float("w_z", 1e-5, 1e-2, log=True),
        }

    def check_config(self, config: Mapping[str, Any]) -> None:
        """No lm config key has been renamed."""

    def build_predictor(self, module: L.LightningModule, datamodule: L.LightningDataModule) -> LMPredictor:
        tok = module.tokenizer or getattr(datamodule, "tokenizer", None)
        if tok is None or module.model is None:
            raise RuntimeError("lm: the task has no built model/tokenizer (train or restore it first)")
        return LMPredictor(
            model=copy.deepcopy(module.model).cpu().eval().requires_grad_(False), tokenizer_json=tok.to_json()
        )

    def input_example(self, datamodule: L.LightningDataModule) -> pd.DataFrame:
        return pd.DataFrame({"prompt": ["ROMEO:", "First Citizen:\n"]})

    def save_preprocessing(self, datamodule: L.LightningDataModule, out_dir: Path) -> list[Path]:
        tok = getattr(datamodule, "tokenizer", None)
        if tok is None:
            return []
        path = Path(out_dir) / "lm_tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tok.to_json())
        return [path]

    def test_artifacts(
        self, module: L.LightningModule, datamodule: L.LightningDataModule, out_dir: Path
    ) -> list[Path]:
        return []


APP = LMApp()
