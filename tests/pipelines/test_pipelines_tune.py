"""Optuna sweeps through ``pipelines.tune``: a 3-trial study completes, a deliberately bad trial is pruned by
the median pruner, the study resumes (a second call continues the trial count), trials are nested MLflow runs,
and the best trial's YAML is a runnable config."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.tune import merged_config, run_study


def _space(trial: optuna.Trial) -> dict:
    # trial 2 negates the logits (val AUC ~ 1 - AUC), so the median pruner must stop it after its first epoch
    return {
        "model.init_args.lr": trial.suggest_float("lr", 0.02, 0.1, log=True),
        "model.init_args.invert": trial.number == 2,
    }


def test_tune_sweep_prunes_resumes_and_writes_best(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    kw = dict(
        app="toy",
        configs=[toy_config],
        storage=storage,
        study_name="toy-study",
        out_dir=tmp_path / "tune",
        tracking_uri=tracking_uri,
        search_space=_space,
        pruner_startup_trials=2,
        pruner_warmup_steps=0,
    )
    study = run_study(n_trials=2, **kw)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2

    # "interrupted" after 2 trials: the same command with the target of 3 runs exactly one more (number 2)
    study = run_study(n_trials=3, **kw)
    states = {t.number: t.state for t in study.trials}
    assert sorted(states) == [0, 1, 2]
    assert states[2] == optuna.trial.TrialState.PRUNED
    pruned = study.trials[2]
    assert list(pruned.intermediate_values) == [0]  # stopped after its first validation
    assert pruned.intermediate_values[0] < 0.5 < min(study.trials[0].value, study.trials[1].value)

    # a third call with the target already met runs nothing
    assert len(run_study(n_trials=3, **kw).trials) == 3

    # MLflow: one parent run, three nested trial runs that hold the Lightning metrics
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("moekit-toy-tune")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("moekit.role") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["optuna.state"] for r in children) == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert all("val/auc" in r.data.metrics for r in children)

    # best.yaml: the base config with the best trial's lr, and it parses/instantiates through the CLI
    best_path = tmp_path / "tune" / "best.yaml"
    best = yaml.safe_load(best_path.read_text())
    assert best["model"]["init_args"]["lr"] == study.best_trial.params["lr"]
    assert best["model"]["init_args"]["invert"] is False
    from pipelines.lightning_cli import MoekitCLI

    cli = MoekitCLI(app="toy", args=["--config", str(best_path), "--trainer.logger=false"], run=False)
    assert cli.model.lr == study.best_trial.params["lr"]


def test_merged_config_sets_dotted_keys(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("model:\n  class_path: X\n  init_args: {a: 1, b: 2}\ntrainer: {max_epochs: 5}\n")
    b = tmp_path / "b.yaml"
    b.write_text("trainer: {max_epochs: 7}\n")
    cfg = merged_config([a, b], {"model.init_args.b": 3, "data.init_args.c": [1, 2]})
    assert cfg == {
        "model": {"class_path": "X", "init_args": {"a": 1, "b": 3}},
        "trainer": {"max_epochs": 7},
        "data": {"init_args": {"c": [1, 2]}},
    }


def test_tune_command_keeps_its_spellings(
    tmp_path: Path, toy_config: Path, tracking_uri: str, capsys: pytest.CaptureFixture
) -> None:
    """``moekit tune`` through jsonargparse with the historical options: repeatable --config and --set,
    dashed names, --study, --enqueue."""
    from pipelines.cli import main

    main([
        "tune", "toy", "--config", str(toy_config), "--n-trials", "1", "--set", "trainer.max_epochs=1",
        "--set", "data.init_args.n_samples=256", "--study", "cli-study", "--out", str(tmp_path / "out"),
        "--storage", f"sqlite:///{tmp_path / 'o.db'}", "--tracking-uri", tracking_uri,
        "--enqueue", '{"hidden_dim": 4, "lr": 0.01}', "--sampler-startup-trials", "3",
    ])  # fmt: skip
    assert "| 0 | COMPLETE |" in capsys.readouterr().out
    study = optuna.load_study(study_name="cli-study", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert study.trials[0].params == {"hidden_dim": 4, "lr": 0.01}
    header = (tmp_path / "out" / "best.yaml").read_text().splitlines()[1]
    assert '"trainer.max_epochs": 1' in header and '"data.init_args.n_samples": 256' in header


def test_legacy_spelling_of_tool_options() -> None:
    from pipelines.commands import legacy_spelling, register, tune

    argv = ["toy", "--config", "a.yaml", "--config=b.yaml", "--n-trials", "3", "--set", "x=1", "--help"]
    assert legacy_spelling(argv, tune) == [
        "toy", "--configs+", "a.yaml", "--configs+=b.yaml", "--n_trials", "3", "--overrides+", "x=1", "--help"
    ]
    argv = ["toy", "--ckpt", "c", "--trainer.max_epochs", "3", "--model.init_args.lr=0.1", "--name", "--x"]
    assert legacy_spelling(argv, register, "cli_args") == [
        "toy", "--ckpt", "c", "--cli_args+=--trainer.max_epochs=3", "--cli_args+=--model.init_args.lr=0.1",
        "--name", "--x",  # a value is passed on verbatim, even one that looks like an option
    ]
