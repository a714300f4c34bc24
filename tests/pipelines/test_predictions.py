"""``moekit <app> predict`` writes ``<run folder>/predictions.parquet`` (pipelines.predictions, issue 14):
every batch's ``predict_step`` output becomes rows of one table, written atomically, its path printed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.cli import main
from pipelines.lightning_cli import MoekitCLI
from pipelines.predictions import PredictionsWriter, predictions_frame


def test_predictions_frame_kinds() -> None:
    """Tensors (B,) and (B, C), column mappings and frames; several dataloaders get dataloader_idx."""
    f = predictions_frame([torch.tensor([0.1, 0.2]), torch.tensor([0.3])])
    assert list(f.columns) == ["prediction"]
    np.testing.assert_allclose(f["prediction"], [0.1, 0.2, 0.3], rtol=1e-6)
    f = predictions_frame([torch.arange(6.0).reshape(3, 2)])
    assert list(f.columns) == ["prediction_0", "prediction_1"]
    np.testing.assert_array_equal(f["prediction_1"], [1, 3, 5])
    f = predictions_frame(
        [[{"a": torch.tensor([1, 2]), "t": ["x", "y"]}], [pd.DataFrame({"a": [3], "t": ["z"]})]]
    )
    assert f.to_dict("list") == {"dataloader_idx": [0, 0, 1], "a": [1, 2, 3], "t": ["x", "y", "z"]}
    with pytest.raises(ValueError, match="1-D"):
        predictions_frame([{"a": torch.zeros(2, 2)}])


def test_writer_writes_atomically_and_prints(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    class _Trainer:
        is_global_zero = True

    writer = PredictionsWriter(tmp_path / "run")
    writer.write_on_epoch_end(_Trainer(), None, [{"p": torch.tensor([0.5, 0.25])}], [])
    path = tmp_path / "run" / "predictions.parquet"
    assert pd.read_parquet(path)["p"].tolist() == [0.5, 0.25]
    assert f"predictions: {path} (2 rows)" in capsys.readouterr().out
    assert [p.name for p in path.parent.iterdir()] == ["predictions.parquet"]  # no temporary left


def test_toy_predict_writes_the_models_predictions(
    tmp_path: Path, toy_config: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    """``moekit toy predict``: one row per predicted example, equal to the in-process predictions."""
    run_dir = tmp_path / "run"
    main(["toy", "predict", "--config", str(toy_config), f"--run_dir={run_dir}", "--allow_untrained=true"])
    path = run_dir / "predictions.parquet"
    assert f"predictions: {path}" in capsys.readouterr().out
    got = pd.read_parquet(path)
    cli = MoekitCLI(app="toy", args=["--config", str(toy_config), f"--run_dir={tmp_path / 'x'}"], run=False)
    want = torch.cat(cli.trainer.predict(cli.model, datamodule=cli.datamodule)).numpy()
    assert list(got.columns) == ["prediction"]
    assert len(got) == len(want) == len(cli.datamodule.raw["test"])
    np.testing.assert_allclose(got["prediction"], want, rtol=1e-6)
