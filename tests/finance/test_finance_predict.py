"""``moekit finance predict`` on the tiny config writes one score per (date, ticker) of the predicted
segment to ``<run folder>/predictions.parquet`` and prints its path; the predict step reads no label
(issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.cli import main
from pipelines.lightning_cli import MoekitCLI

TINY = Path(__file__).resolve().parents[2] / "apps" / "finance" / "configs" / "tiny.yaml"


@pytest.mark.needs_data("sp500_5yr/individual_stocks_5yr")
def test_finance_predict_writes_a_score_per_date_and_ticker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(TINY), "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    main(["finance", "predict", *common, f"--run_dir={tmp_path / 'run'}", "--allow_untrained=true"])
    path = tmp_path / "run" / "predictions.parquet"
    assert f"predictions: {path}" in capsys.readouterr().out
    got = pd.read_parquet(path)
    assert list(got.columns) == ["date", "ticker", "day", "ticker_id", "score"]

    cli = MoekitCLI(app="finance", args=[*common, f"--run_dir={tmp_path / 'x'}"], run=False)
    dm = cli.datamodule
    dm.setup("predict")
    # one row per ticker present on each predicted (test) day, in day order
    days, tickers = np.nonzero(dm.present[dm.split.test])
    assert len(got) == len(days) > 1000
    np.testing.assert_array_equal(got["day"], dm.split.test[days])
    np.testing.assert_array_equal(got["ticker_id"], tickers)
    assert (got["date"].to_numpy() == dm.panel.dates[got["day"].to_numpy()]).all()
    assert (got["ticker"].to_numpy() == np.asarray(dm.panel.tickers)[tickers]).all()
    assert got.groupby(["date", "ticker"]).size().max() == 1
    # unlabelled: a day without its labels scores the same (the seed makes the CLI's model this one)
    batch = {k: v for k, v in dm.test_dataloader().dataset[0].items() if k not in ("y", "y_raw")}
    want = cli.model.predict_step(batch, 0)
    first = got[got["day"] == int(batch["day"])]
    np.testing.assert_allclose(first["score"], want["score"], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(torch.as_tensor(got["score"].to_numpy())).all()
