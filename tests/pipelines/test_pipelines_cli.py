"""The ``moekit`` CLI: help lists the apps of the table (the toy app too, from ``$MOEKIT_APPS``) and their
commands; an app's command runs its function; a renamed config key stops with a message naming the new one; a
fit logs the resolved config, params, git commit, plots and preprocessing into the MLflow store given by
MLFLOW_TRACKING_URI; ``--ckpt_path last`` resumes exactly (identical metrics to an uninterrupted run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.apps import APPS
from pipelines.cli import MoekitCLI, main
from pipelines.lightning_cli import ConfigError


def test_help_lists_apps_and_commands(capsys: pytest.CaptureFixture) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    for word in (
        *APPS,
        "toy",
        "fit",
        "validate",
        "test",
        "predict",
        "tune",
        "register",
        "serve",
        "generate",
        "merge",
        "quantize",
        "backtest",
    ):
        assert word in out
    with pytest.raises(SystemExit) as exit_:
        main(["nope", "fit"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown app or tool 'nope'")


def test_app_command_runs_its_function(monkeypatch: pytest.MonkeyPatch) -> None:
    import apps.finance.backtest

    seen = []
    monkeypatch.setattr(apps.finance.backtest, "main", lambda argv: seen.append(argv))
    main(["finance", "backtest", "--predictions", "p.parquet", "--topk", "3"])
    assert seen == [["--predictions", "p.parquet", "--topk", "3"]]


def test_renamed_config_key_names_the_new_one(
    toy_config: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    # the toy app renamed model.init_args.width -> hidden_dim (its check_config says so before parsing)
    with pytest.raises(SystemExit) as exit_:
        main(["toy", "fit", "--config", str(toy_config), "--model.init_args.width=4"])
    assert exit_.value.code == 2
    assert "write model.init_args.hidden_dim" in capsys.readouterr().err
    old = toy_config.with_name("old.yaml")
    old.write_text(toy_config.read_text().replace("hidden_dim: 8", "width: 8"))
    with pytest.raises(ConfigError, match="write model.init_args.hidden_dim"):
        MoekitCLI(app="toy", args=["--config", str(old)], run=False)


def _runs(uri: str, experiment: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def test_fit_logs_config_params_commit_and_artifacts(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    main(["toy", "fit", "--config", str(toy_config), "--trainer.max_epochs=1"])
    client, runs = _runs(tracking_uri, "moekit-toy")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["cfg.model.init_args.lr"] == "0.05"
    assert run.data.params["cfg.trainer.max_epochs"] == "1"
    assert "mlflow.source.git.commit" in run.data.tags
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "plots", "preprocessing"} <= arts
    cfg = client.download_artifacts(run.info.run_id, "config/config.yaml", str(tmp_path))
    assert "toy_app.ToyTask" in Path(cfg).read_text()
    # checkpoints go to a run-independent folder beside the working directory
    assert (tmp_path / "runs" / "toy" / "toy" / "last.ckpt").is_file()


def test_test_in_the_fit_run_records_changed_params_without_warnings(
    tmp_path: Path, toy_config: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``test --ckpt_path`` reopens the fit's run: MLflow params are immutable, so the test's changed values
    are named in a tag and its config is a separate artifact (before: a 'could not log some params' warning
    and the fit's ``config/config.yaml`` overwritten by the test's)."""
    main(["toy", "fit", "--config", str(toy_config), "--trainer.max_epochs=1"])
    ckpt = tmp_path / "runs" / "toy" / "toy" / "last.ckpt"
    with caplog.at_level("WARNING"):
        main([
            "toy", "test", "--config", str(toy_config), "--ckpt_path", str(ckpt),
            "--data.init_args.batch_size=32",
        ])  # fmt: skip
    assert "could not log some params" not in caplog.text
    client, runs = _runs(tracking_uri, "moekit-toy")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["cfg.data.init_args.batch_size"] == "64"  # the fit's value stays
    assert "cfg.data.init_args.batch_size" in run.data.tags["moekit.test.changed_params"].split(",")
    fit_cfg = Path(client.download_artifacts(run.info.run_id, "config/config.yaml", str(tmp_path / "a")))
    test_cfg = Path(client.download_artifacts(run.info.run_id, "config/test.yaml", str(tmp_path / "b")))
    assert "batch_size: 64" in fit_cfg.read_text() and "batch_size: 32" in test_cfg.read_text()


def _metric_history(uri: str, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_resume_from_last_checkpoint_is_exact(tmp_path: Path, toy_config: Path, tracking_uri: str) -> None:
    # uninterrupted: 4 epochs
    main(["toy", "fit", "--config", str(toy_config), "--trainer.max_epochs=4", f"--run_dir={tmp_path / 'a'}"])
    # interrupted after 2 epochs, then `--ckpt_path last` with the full budget
    main(["toy", "fit", "--config", str(toy_config), "--trainer.max_epochs=2", f"--run_dir={tmp_path / 'b'}"])
    main(
        [
            "toy",
            "fit",
            "--config",
            str(toy_config),
            "--trainer.max_epochs=4",
            f"--run_dir={tmp_path / 'b'}",
            "--ckpt_path",
            "last",
        ]
    )
    _, runs = _runs(tracking_uri, "moekit-toy")
    full, split = runs  # the resumed fit continues its MLflow run (the run id travels in the checkpoint)
    full_auc = _metric_history(tracking_uri, full.info.run_id, "val/auc")
    split_auc = _metric_history(tracking_uri, split.info.run_id, "val/auc")
    assert len(full_auc) == 4
    assert split_auc == full_auc  # bit-identical
    full_loss = _metric_history(tracking_uri, full.info.run_id, "train/loss_epoch")
    split_loss = _metric_history(tracking_uri, split.info.run_id, "train/loss_epoch")
    assert split_loss == full_loss
    a = torch.load(tmp_path / "a" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "b" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_progress_bar_default_follows_terminal(toy_config: Path, tracking_uri: str) -> None:
    # pytest captures stderr, so it is not a terminal: the default is off (the toy config does not set it)
    text = toy_config.read_text().replace("  enable_progress_bar: false\n", "")
    toy_config.write_text(text)
    cli = MoekitCLI(app="toy", args=["--config", str(toy_config), "--trainer.logger=false"], run=False)
    assert cli.trainer.progress_bar_callback is None
