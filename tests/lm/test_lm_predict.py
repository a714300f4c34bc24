"""The LM's predict step scores held-out text: per window the mean next-token NLL, its perplexity, the number
of tokens and the decoded window; written by the predictions writer to ``predictions.parquet`` (issue 14).
Text continuation stays ``moekit lm generate``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.lightning_cli import MoekitCLI

TINY = Path(__file__).resolve().parents[2] / "apps" / "lm" / "configs" / "tiny.yaml"


def test_lm_predict_scores_each_window(
    shakespeare_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    args = [
        "--config", str(TINY), "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        f"--data.init_args.data_dir={shakespeare_path.parent.parent}", f"--run_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    cli = MoekitCLI(app="lm", args=args, run=False)
    (test,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    loader = cli.datamodule.test_dataloader()
    cli.trainer.predict(cli.model, dataloaders=loader)
    path = tmp_path / "run" / "predictions.parquet"
    assert f"predictions: {path}" in capsys.readouterr().out
    got = pd.read_parquet(path)
    assert list(got.columns) == ["nll", "perplexity", "tokens", "text"]
    windows = loader.dataset
    assert len(got) == len(windows)
    assert (got["tokens"] == 32).all()  # the tiny config's context_len
    # oracle: the test loss is the mean next-token cross-entropy over these same equal-length windows
    assert got["nll"].mean() == pytest.approx(test["test/loss"], rel=1e-4)
    np.testing.assert_allclose(got["perplexity"], np.exp(got["nll"]), rtol=1e-5)
    x0, _ = windows[0]
    assert got["text"][0] == cli.model.tokenizer.decode(x0.tolist())
    assert math.isfinite(got["nll"].max())
