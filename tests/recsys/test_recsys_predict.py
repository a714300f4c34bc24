"""``moekit recsys predict`` on the tiny config writes per-task probabilities, one row per predicted example,
to ``<run folder>/predictions.parquet`` and prints its path; the predict step reads no labels (issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from apps.recsys.data import CENSUS_FILE, CENSUS_FOLDER
from pipelines.cli import main
from pipelines.lightning_cli import MoekitCLI

TINY = Path(__file__).resolve().parents[2] / "apps" / "recsys" / "configs" / "tiny.yaml"


@pytest.mark.needs_data(f"{CENSUS_FOLDER}/{CENSUS_FILE}")
def test_recsys_predict_writes_per_task_probabilities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    common = ["--config", str(TINY), "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]
    main(["recsys", "predict", *common, f"--run_dir={tmp_path / 'run'}", "--allow_untrained=true"])
    path = tmp_path / "run" / "predictions.parquet"
    assert f"predictions: {path}" in capsys.readouterr().out
    got = pd.read_parquet(path)

    cli = MoekitCLI(app="recsys", args=[*common, f"--run_dir={tmp_path / 'x'}"], run=False)
    labelled = cli.trainer.predict(cli.model, datamodule=cli.datamodule)  # builds the net from the data
    # unlabelled rows: the same batches without their labels give the same probabilities
    batches = [{k: b[k] for k in ("cat", "num")} for b in cli.datamodule.predict_dataloader()]
    out = cli.trainer.predict(cli.model, dataloaders=DataLoader(batches, batch_size=None))
    for a, b in zip(labelled, out, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a)
    tasks = list(out[0])
    assert tasks == ["income", "never_married"]
    assert list(got.columns) == tasks
    assert len(got) == sum(len(b["cat"]) for b in batches) > 1000
    for t in tasks:
        want = torch.cat([o[t] for o in out]).numpy()
        np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-6)
        assert ((got[t] > 0) & (got[t] < 1)).all()
