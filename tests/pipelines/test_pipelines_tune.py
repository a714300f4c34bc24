"""Optuna sweeps through ``pipelines.tune``: a 3-trial study completes, a deliberately bad trial is pruned by
the median pruner, the study resumes (a second call continues the trial count), trials are nested MLflow runs
that end FINISHED, and the best trial's YAML is a runnable config; parallel workers and a resumed worker draw
only distinct configurations and finish exactly ``n_trials``; a rerun with other budget overrides is
refused; an interrupted trial and its sweep end FAIL/KILLED."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
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


HERE = Path(__file__).resolve().parent
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def test_tune_sweep_prunes_resumes_and_writes_best(
    tmp_path: Path,
    toy_config: Path,
    tracking_uri: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the progress lines go to moekit's progress logger; caplog sees them whether it propagates (fresh) or
    # not (after an in-process `moekit` command gave it its own handler: pytest then attaches its handler to
    # the logger itself, so forcing propagation here counted every line twice)
    caplog.set_level(logging.INFO, logger="moekit.progress")
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
    assert [r.info.status for r in runs] == ["FINISHED"] * 4  # the parent too, not RUNNING forever
    assert study.metric_names == ["val/auc"]  # the objective is named (optuna-dashboard)
    # progress: one line per finished trial, with its value and the best so far
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trial ")]
    assert len(lines) == 3 and lines[1].startswith("trial 1 COMPLETE val/auc=")
    assert lines[2].startswith("trial 2 PRUNED at step 0") and lines[2].endswith("3/3 finished")
    assert f"best {study.best_value:.6g} (trial {study.best_trial.number})" in lines[2]

    # best.yaml: the base config with the best trial's lr, and it parses/instantiates through the CLI
    best_path = tmp_path / "tune" / "best.yaml"
    best = yaml.safe_load(best_path.read_text())
    assert best["model"]["init_args"]["lr"] == study.best_trial.params["lr"]
    assert best["model"]["init_args"]["invert"] is False
    from pipelines.lightning_cli import MoekitCLI

    cli = MoekitCLI(app="toy", args=["--config", str(best_path), "--trainer.logger=false"], run=False)
    assert cli.model.lr == study.best_trial.params["lr"]
    # its own run folder (by the file's stem every study's best.yaml would share runs/toy/best)
    assert best["run_dir"] == "runs/toy/toy-study-best" and cli.run_dir() == Path("runs/toy/toy-study-best")


def _worker(config: Path, storage: str, study: str, n_trials: int, out: Path, seed: int) -> subprocess.Popen:
    cmd = [sys.executable, str(HERE / "tune_worker.py"), str(config), storage, study, str(n_trials), str(out)]
    return subprocess.Popen([*cmd, str(seed)])


def _configs(study: optuna.Study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.get_trials(states=FINISHED)]


def test_parallel_workers_and_a_resumed_worker_draw_distinct_configs_and_finish_n_trials(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    """Two workers started together with the same seed, then a resumed worker with a larger target: every
    configuration is new and the study holds exactly the requested number of finished trials. (Before: the
    sampler was seeded with the same value in each process, so the workers ran identical pairs, and each ran
    ``n_trials`` on its own: 8 trials for 4.)"""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}?timeout=60"
    out = tmp_path / "tune"
    # both stores exist before the workers start (two processes migrating one new sqlite file at once collide)
    from pipelines.tracking import ensure_experiment

    ensure_experiment("moekit-toy-tune", tracking_uri)
    optuna.storages.RDBStorage(storage)
    workers = [_worker(toy_config, storage, "par", 4, out, seed=0) for _ in range(2)]
    assert [w.wait(timeout=600) for w in workers] == [0, 0]
    study = optuna.load_study(study_name="par", storage=storage)
    assert len(study.get_trials(states=FINISHED)) == 4
    assert len(set(_configs(study))) == 4
    assert len({t.user_attrs["worker"] for t in study.get_trials(states=FINISHED)}) == 2  # both took part

    # resumed: the same command with a larger total (4 -> 6) runs exactly two more, new configurations
    from pipelines.tune import run_study

    study = run_study(
        app="toy", configs=[toy_config], n_trials=6, storage=storage, study_name="par", out_dir=out,
        overrides={"trainer.max_epochs": 1}, seed=0, tracking_uri=tracking_uri,
    )  # fmt: skip
    assert len(study.get_trials(states=FINISHED)) == 6
    assert len(set(_configs(study))) == 6
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("moekit-toy-tune").experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    trial_runs = [r for r in runs if "optuna.trial_number" in r.data.tags]
    assert len(trial_runs) == 6
    # one parent run, although both workers created the study at once
    parents = [r.info.run_id for r in runs if r.data.tags.get("moekit.role") == "study"]
    assert len(parents) == 1 and {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == set(parents)


def test_rerun_with_other_budget_overrides_or_config_is_refused(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    from pipelines.tune import run_study

    kw = dict(
        app="toy", configs=[toy_config], storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="budget",
        out_dir=tmp_path / "tune", tracking_uri=tracking_uri, seed=0,
    )  # fmt: skip
    run_study(n_trials=1, overrides={"trainer.max_epochs": 1}, **kw)
    with pytest.raises(ValueError, match="--study NAME") as err:
        run_study(n_trials=2, overrides={"trainer.max_epochs": 2}, **kw)
    assert '{"trainer.max_epochs": 1}' in str(err.value) and '{"trainer.max_epochs": 2}' in str(err.value)
    toy_config.write_text(toy_config.read_text().replace("hidden_dim: 8", "hidden_dim: 16"))
    with pytest.raises(ValueError, match="base config"):
        run_study(n_trials=2, overrides={"trainer.max_epochs": 1}, **kw)
    study = optuna.load_study(study_name="budget", storage=kw["storage"])
    assert len(study.trials) == 1  # nothing ran with the other budget


def test_interrupted_trial_ends_failed_and_its_runs_killed(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    """Ctrl+C inside a trial (Lightning turns it into ``SystemExit(1)``): the trial is FAIL, not RUNNING, and
    the trial's and the sweep's MLflow runs end KILLED."""
    from pipelines.tune import run_study

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    interrupt = [{"class_path": "tune_worker.InterruptAtFirstBatch"}]
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        run_study(
            app="toy", configs=[toy_config], n_trials=2, storage=storage, study_name="ctrl-c",
            out_dir=tmp_path / "tune", tracking_uri=tracking_uri, seed=0,
            overrides={"trainer.max_epochs": 1, "trainer.callbacks": interrupt},
        )  # fmt: skip
    study = optuna.load_study(study_name="ctrl-c", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("moekit-toy-tune").experiment_id])
    status = {r.data.tags.get("moekit.role", "trial"): r.info.status for r in runs}
    assert status == {"study": "KILLED", "trial": "KILLED"}


def test_trial_of_a_killed_worker_is_failed_retried_and_its_run_closed(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    """SIGKILL (nothing can be cleaned up) in the middle of a trial: the next sweep on the study fails the
    trial once its heartbeat is stale, retries it, and ends its MLflow run KILLED, not RUNNING forever."""
    import os
    import signal
    import time

    from pipelines.tracking import ensure_experiment

    storage = f"sqlite:///{tmp_path / 'optuna.db'}?timeout=60"
    ensure_experiment("moekit-toy-tune", tracking_uri)
    optuna.storages.RDBStorage(storage)
    cmd = [sys.executable, str(HERE / "tune_worker.py"), str(toy_config), storage, "kill", "2", str(tmp_path)]
    worker = subprocess.Popen([*cmd, "0", "2"])
    deadline = time.time() + 300
    victim = None
    while victim is None and time.time() < deadline and worker.poll() is None:
        try:
            trials = optuna.load_study(study_name="kill", storage=storage).get_trials(deepcopy=False)
        except KeyError:  # the study is not created yet
            trials = []
        victim = next(
            (t for t in trials if "mlflow_run_id" in t.user_attrs and t.state.name == "RUNNING"), None
        )
        time.sleep(0.05)
    assert victim is not None, "the worker never had a trial running"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    time.sleep(3)  # past the 2 s grace period

    resumed = subprocess.run([*cmd, "0", "2"], timeout=300)
    assert resumed.returncode == 0
    study = optuna.load_study(study_name="kill", storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    assert states[victim.number] == "FAIL" and "RUNNING" not in states.values()
    assert len(study.get_trials(states=FINISHED)) == 2
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retry) == 1 and retry[0].params == study.trials[victim.number].params
    client = MlflowClient(tracking_uri)
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    runs = client.search_runs([client.get_experiment_by_name("moekit-toy-tune").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 3 + [
        "KILLED"
    ]  # parent, 2 trials; the victim


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
        "toy",
        "--configs+",
        "a.yaml",
        "--configs+=b.yaml",
        "--n_trials",
        "3",
        "--overrides+",
        "x=1",
        "--help",
    ]
    argv = ["toy", "--ckpt", "c", "--trainer.max_epochs", "3", "--model.init_args.lr=0.1", "--name", "--x"]
    assert legacy_spelling(argv, register, "cli_args") == [
        "toy",
        "--ckpt",
        "c",
        "--cli_args+=--trainer.max_epochs=3",
        "--cli_args+=--model.init_args.lr=0.1",
        "--name",
        "--x",  # a value is passed on verbatim, even one that looks like an option
    ]


def test_tune_command_writes_under_cwd_and_prints_a_line_per_trial(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    """``moekit tune`` at the default log level: best.yaml under ``./runs/tune/<study>/`` (like fit's
    ``./runs/``), one progress line per finished trial, and no Lightning or Optuna INFO chatter."""
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOEKIT_LOG_LEVEL", "MLFLOW_LOGGING"))}
    cmd = [
        sys.executable, "-c", "import sys; from pipelines.cli import main; main(sys.argv[1:])",
        "tune", "toy", "--config", str(toy_config), "--n-trials", "2", "--set", "trainer.max_epochs=1",
        "--set", "data.init_args.n_samples=256", "--storage", f"sqlite:///{tmp_path / 'o.db'}",
        "--tracking-uri", tracking_uri,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=work,
    )
    assert proc.returncode == 0, proc.stderr
    assert (work / "runs" / "tune" / "toy-toy" / "best.yaml").is_file()
    assert (work / "runs" / "tune" / "toy-toy" / "trial_0").is_dir()
    pattern = r"trial (\d) COMPLETE val/auc=[0-9.]+; best [0-9.]+ \(trial \d\); (\d)/2 finished"
    lines = [m.groups() for m in map(re.compile(pattern).fullmatch, proc.stderr.splitlines()) if m]
    assert lines == [("0", "1"), ("1", "2")], proc.stderr
    for chatter in ("Seed set", "GPU available", "litlogger", "INFO", "[I "):
        assert chatter not in proc.stderr + proc.stdout, proc.stderr
