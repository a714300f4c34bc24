"""``moekit lm predict`` on unlabelled text (``data.predict_path``) writes per-window scores and prints the
file's path; served generation requests are checked without coercion (issue 17)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from apps.lm.app import PREDICT_PARAMS, LMPredictor, check_predict_params
from apps.lm.model import LMConfig, TransformerLM
from apps.lm.tokenizers import CharTokenizer
from pipelines.lightning_cli import MoekitCLI

TINY = Path(__file__).resolve().parents[2] / "apps" / "lm" / "configs" / "tiny.yaml"
TEXT = "the quick brown fox jumps over the lazy dog.\n" * 80


def test_predict_scores_unlabelled_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    unlabelled = "the lazy fox jumps over the quick brown dog.\n" * 3  # 135 chars: 4 windows of 32
    (tmp_path / "new.txt").write_text(unlabelled, encoding="utf-8")
    args = [
        "predict", "--config", str(TINY), "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--data.init_args.text_path={tmp_path / 'train.txt'}",
        f"--data.init_args.predict_path={tmp_path / 'new.txt'}",
        f"--run_dir={tmp_path / 'run'}", "--allow_untrained=true",  # the format is tested, not the weights
    ]  # fmt: skip
    cli = MoekitCLI(app="lm", args=args)
    path = tmp_path / "run" / "predictions.parquet"
    assert f"predictions: {path}" in capsys.readouterr().out
    got = pd.read_parquet(path)
    assert len(got) == (len(unlabelled) - 1) // 32 == 4
    tok = cli.datamodule.tokenizer
    assert "".join(got["text"]) == unlabelled[: 4 * 32]  # the windows are the unlabelled text, in order
    # oracle: the model's own mean next-token NLL of the first window
    ids = torch.tensor(tok.encode(unlabelled[:33]))[None]
    with torch.no_grad():
        logits = cli.model.model.eval()(ids[:, :-1]).logits
    nll = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()
    assert got["nll"][0] == pytest.approx(nll, rel=1e-4) and math.isfinite(got["nll"].max())
    np.testing.assert_allclose(got["perplexity"], np.exp(got["nll"]), rtol=1e-5)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"max_new_tokens": "5"}, "max_new_tokens must be an integer, got '5'"),
        ({"max_new_tokens": 5.0}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": 0}, r"max_new_tokens must be in 1\.\.2048"),
        ({"greedy": "true"}, "greedy must be a bool"),
        ({"greedy": 1}, "greedy must be a bool"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"beam": 3}, "unknown generation params"),
    ],
)
def test_served_generation_params_are_checked_without_coercion(params, match):
    with pytest.raises(ValueError, match=match):
        check_predict_params(params)


def test_served_generation_accepts_valid_and_numpy_params():
    p = check_predict_params({"max_new_tokens": np.int64(3), "temperature": np.float32(0.5), "greedy": None})
    assert p == {**PREDICT_PARAMS, "max_new_tokens": 3, "temperature": 0.5}
    tok = CharTokenizer.fit(TEXT)
    model = TransformerLM(config=LMConfig(vocab_size=tok.vocab_size, context_len=16, dim=16, n_layers=1,
                                          n_heads=2, ffn_hidden=16))
    pred = LMPredictor(model=model, tokenizer_json=tok.to_json())
    out = pred.predict(pd.DataFrame({"prompt": ["the "]}), max_new_tokens=np.int64(3), greedy=True)
    assert out["text"][0].startswith("the ") and len(out["text"][0]) == 7
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        pred.predict(pd.DataFrame({"prompt": ["the "]}), max_new_tokens="3")
