"""``moekit <app> validate/test/predict`` and the checkpoint they score: without ``--ckpt_path`` they refuse
to score untrained weights unless told to, and a checkpoint of another model than the config names is used
with a warning that says so (new-user trials: ``finance predict --config C`` and ``recsys test --config C``
printed metrics of random weights with exit status 0; a checkpoint silently replaced the config's model)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.cli import main
from pipelines.lightning_cli import _class_paths


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("moekit-toy")
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_evaluation_without_checkpoint_is_refused(
    sub: str, tmp_path: Path, toy_config: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as e:
        main(["toy", sub, "--config", str(toy_config), f"--run_dir={tmp_path / 'run'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"moekit toy {sub}: no --ckpt_path, so the model would have its initial (untrained)" in err[0]
    assert f"{tmp_path / 'run'}/last.ckpt" in err[0] and "--allow_untrained true" in err[0]
    assert _runs(tracking_uri) == []  # refused before any MLflow run was opened


def test_checkpoint_of_another_model_is_used_with_a_warning(
    tmp_path: Path, toy_config: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = f"--run_dir={tmp_path / 'fit'}"
    main(["toy", "fit", "--config", str(toy_config), run, "--trainer.max_epochs=1"])
    other = tmp_path / "other.yaml"  # the same data, but the config names another model class
    boring = "  class_path: lightning.pytorch.demos.boring_classes.BoringModel\n"
    toy_model = "  class_path: toy_app.ToyTask\n  init_args: {hidden_dim: 8, lr: 0.05}\n"
    other.write_text(toy_config.read_text().replace(toy_model, boring))
    assert "BoringModel" in other.read_text()
    with caplog.at_level(logging.WARNING, logger="pipelines.lightning_cli"):
        main(["toy", "test", "--config", str(other), f"--run_dir={tmp_path / 'fit'}", "--ckpt_path",
              str(tmp_path / "fit" / "last.ckpt")])  # fmt: skip
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "holds another model than the config names; it is used" in msg
    assert "model.class_path: lightning.pytorch.demos.boring_classes.BoringModel -> toy_app.ToyTask" in msg


def test_class_paths_of_a_nested_config() -> None:
    cfg = {"class_path": "a.Task", "init_args": {"backbone": {"class_path": "b.HoME", "init_args": {"n": 2}},
                                                 "lr": 0.1, "heads": [{"class_path": "c.Head"}]}}  # fmt: skip
    assert _class_paths(cfg) == {"class_path": "a.Task", "init_args.backbone.class_path": "b.HoME"}
