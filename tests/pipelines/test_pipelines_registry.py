"""Model Registry round trip: a trained toy model registered as a pyfunc (raw columns in, probabilities out)
predicts exactly what the in-process LightningModule predicts on the datamodule's preprocessed tensors, both
when registered at the end of fit and when rebuilt from a checkpoint by ``moekit register``."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.cli import main
from pipelines.commands import register_checkpoint
from pipelines.lightning_cli import MoekitCLI
from pipelines.registry import register_trained


def _fit(toy_config: Path, tmp_path: Path) -> MoekitCLI:
    cli = MoekitCLI(
        app="toy", args=["--config", str(toy_config), f"--run_dir={tmp_path / 'ckpt'}"], run=False
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def _in_process(cli: MoekitCLI) -> np.ndarray:
    preds = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    return torch.cat(preds).numpy()


def test_registry_round_trip_matches_in_process_model(
    tmp_path: Path, toy_config: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    cli = _fit(toy_config, tmp_path)
    expected = _in_process(cli)  # (N,) from the LightningModule on preprocessed test tensors
    raw = cli.datamodule.raw["test"].drop(columns=["y"])  # raw, unstandardised columns

    version = register_trained(
        app="toy", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="toy-model"
    )
    assert version == "1"
    loaded = mlflow.pyfunc.load_model("models:/toy-model/1")
    got = loaded.predict(raw)["p"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # a model that skipped preprocessing would be far off: guard that the check can fail
    assert np.abs(expected - 0.5).max() > 0.1

    # stored as safetensors + JSON: no pickle anywhere in the model's artifacts (issue 14)
    local = Path(mlflow.artifacts.download_artifacts("models:/toy-model/1", dst_path=str(tmp_path / "dl")))
    stored = {p.name for p in (local / "artifacts" / "predictor").iterdir()}
    assert stored == {"predictor.json", "predictor.safetensors"}
    assert not [p for p in local.rglob("*") if p.suffix in (".pt", ".pkl", ".pickle", ".ckpt")]

    sig = loaded.metadata.get_input_schema()
    assert sig.input_names() == ["x0", "x1", "x2", "x3"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="x3"):
        loaded.predict(raw.drop(columns=["x3"]))

    # rebuilt from the last checkpoint by `moekit register` (an extra config option is passed through):
    # version 2, same predictions
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert ckpt.is_file()
    main([
        "register", "toy", "--config", str(toy_config), "--ckpt", str(ckpt), "--name", "toy-model",
        "--trainer.limit_val_batches", "2",
    ])  # fmt: skip
    assert "registered models:/toy-model/2" in capsys.readouterr().out
    got2 = mlflow.pyfunc.load_model("models:/toy-model/2").predict(raw)["p"].to_numpy()
    np.testing.assert_allclose(got2, expected, rtol=1e-5, atol=1e-6)
    assert register_checkpoint(app="toy", configs=[str(toy_config)], ckpt=str(ckpt), name="toy-model") == "3"


def test_register_links_the_version_to_its_training_run(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    """`moekit register` logs the model into the run that wrote the checkpoint (no separate run), and the
    version carries a description, tags and that run's test metrics."""
    run_dir = tmp_path / "ckpt"
    main(["toy", "fit", "--config", str(toy_config), f"--run_dir={run_dir}"])
    ckpt = run_dir / "last.ckpt"
    main(["toy", "test", "--config", str(toy_config), f"--run_dir={run_dir}", "--ckpt_path", str(ckpt)])
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("moekit-toy")
    (train,) = client.search_runs([exp.experiment_id])
    test_auc = train.data.metrics["test/auc"]

    main(["register", "toy", "--config", str(toy_config), "--ckpt", str(ckpt), "--name", "toy-model"])
    (run,) = client.search_runs([exp.experiment_id])  # still one run: nothing called "register"
    assert run.info.run_id == train.info.run_id
    assert run.info.status == "FINISHED"
    mv = client.get_model_version("toy-model", "1")
    assert mv.run_id == train.info.run_id
    assert mv.tags["moekit.source_run_id"] == train.info.run_id
    assert mv.tags["moekit.app"] == "toy"
    assert Path(mv.tags["moekit.checkpoint"]) == ckpt.resolve()
    assert float(mv.tags["test/auc"]) == pytest.approx(test_auc, rel=1e-5)
    assert train.info.run_id in mv.description and f"test/auc={test_auc:.4f}" in mv.description
    assert Path(run.data.tags["moekit.checkpoint.last"]) == ckpt.resolve()  # the run names its checkpoint


def test_registered_model_requirements_install_from_a_public_index(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    """Pinned public versions (no `+cpu` local suffix), the packages the bundled code imports, no moekit;
    the predictor's code travels in the model (code_paths)."""
    from packaging.requirements import Requirement

    cli = _fit(toy_config, tmp_path)
    register_trained(app="toy", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="m")
    local = Path(mlflow.artifacts.download_artifacts("models:/m/1", dst_path=str(tmp_path / "model")))
    reqs = [Requirement(line) for line in (local / "requirements.txt").read_text().split() if line.strip()]
    names = {r.name.lower() for r in reqs}
    assert {"torch", "pandas", "numpy", "mlflow", "lightning", "torchmetrics"} <= names
    assert "moekit" not in names
    for r in reqs:
        (spec,) = r.specifier
        assert spec.operator == "==" and "+" not in spec.version, r
    assert (local / "code" / "toy_app.py").is_file()


def test_register_a_checkpoint_from_another_store_warns_and_uses_a_new_run(
    tmp_path: Path,
    toy_config: Path,
    tracking_uri: str,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The checkpoint names a run of another store (a copied run folder): `moekit register` says so in one
    warning line and registers into a new run of the current store, as `moekit <app> test` does."""
    run_dir = tmp_path / "ckpt"
    main(["toy", "fit", "--config", str(toy_config), f"--run_dir={run_dir}", "--trainer.max_epochs=1"])
    (train,) = MlflowClient(tracking_uri).search_runs(
        [MlflowClient(tracking_uri).get_experiment_by_name("moekit-toy").experiment_id]
    )
    other = f"sqlite:///{tmp_path / 'other.db'}"
    capsys.readouterr()
    main([
        "register", "toy", "--config", str(toy_config), "--ckpt", str(run_dir / "last.ckpt"),
        "--name", "toy-moved", "--tracking-uri", other,
    ])  # fmt: skip
    assert "registered models:/toy-moved/1" in capsys.readouterr().out
    warned = [r.getMessage() for r in caplog.records if train.info.run_id in r.getMessage()]
    assert len(warned) == 1 and "is not in" in warned[0] and "new run" in warned[0], caplog.text
    assert "\n" not in warned[0]
    client = MlflowClient(other)
    mv = client.get_model_version("toy-moved", "1")
    assert mv.run_id != train.info.run_id
    assert mv.tags["moekit.source_run_id"] == mv.run_id
    assert client.get_run(mv.run_id).info.status == "FINISHED"


def test_mlflow_error_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "models:/no-such-model/1", "--tracking-uri", uri])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: moekit serve ") and "no-such-model" in err[0], err
