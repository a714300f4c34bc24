"""``moekit tune``: Optuna sweeps over an app config (the command is in :mod:`pipelines.commands`).

* Search space and objective: the app's ``search_space(trial) -> {dotted.key: value}``, ``monitor`` and
  ``direction`` (``apps/<app>/app.py``, see :mod:`pipelines.apps`); the values are applied as command-line
  overrides of the base config (``--model.init_args.lr=...``).
* Sampling: TPE (seeded). Pruning: Optuna's MedianPruner, fed once per validation by
  ``optuna_integration.PyTorchLightningPruningCallback`` on the monitored metric.
* Storage: an RDB URL (default ``sqlite:///<repo>/runs/optuna/optuna.db``, git-ignored; PostgreSQL for many
  machines). ``--n-trials N`` is the study's *target* number of finished (complete or pruned) trials, so
  running the same command again after an interruption continues the count and stops at N; several workers
  can run it at once on one storage. Trials left RUNNING by a killed worker are failed by the heartbeat
  and retried once.
* Tracking: one MLflow parent run per study and one nested run per trial (Lightning logs into it).
* Output: ``<out>/best.yaml``, the base config with the best trial's values merged in (the sweep's fixed
  ``--set`` budget overrides are noted in its header, not applied), runnable with
  ``moekit <app> fit --config <out>/best.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from pipelines.apps import get_app
from pipelines.lightning_cli import MoekitCLI, merged_config
from pipelines.tracking import REPO_ROOT, default_tracking_uri, ensure_experiment, git_commit, make_logger

log = logging.getLogger(__name__)

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def default_storage() -> str:
    path = REPO_ROOT / "runs" / "optuna" / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _arg_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def overrides_to_args(overrides: Mapping[str, Any]) -> list[str]:
    """``{"model.init_args.lr": 0.1}`` -> ``["--model.init_args.lr=0.1"]``."""
    return [f"--{k}={_arg_value(v)}" for k, v in overrides.items()]


class _MlflowStudy:
    """The study's MLflow parent run and one nested run per trial."""

    def __init__(self, *, study: optuna.Study, app: str, tracking_uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.experiment_id = ensure_experiment(experiment, tracking_uri)
        parent = study.user_attrs.get("mlflow_parent_run_id")
        if parent is not None:
            try:
                self.client.get_run(parent)
            except Exception:  # noqa: BLE001 - the tracking store was reset: start a new parent
                parent = None
        if parent is None:
            tags = {"moekit.app": app, "moekit.study": study.study_name, "moekit.role": "study"}
            if commit := git_commit():
                tags["mlflow.source.git.commit"] = commit
            run = self.client.create_run(self.experiment_id, run_name=f"study-{study.study_name}", tags=tags)
            parent = run.info.run_id
            study.set_user_attr("mlflow_parent_run_id", parent)
        self.parent_run_id = parent

    def trial_run(self, trial: optuna.Trial, params: Mapping[str, Any]) -> str:
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "moekit.study": trial.study.study_name,
            "optuna.trial_number": str(trial.number),
        }
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags=tags)
        return run.info.run_id

    def finish_trial(self, run_id: str, *, state: str, value: float | None, trial_number: int) -> None:
        self.client.set_tag(run_id, "optuna.state", state)
        if value is not None and math.isfinite(value):
            self.client.log_metric(run_id, "trial_value", value)
            self.client.log_metric(self.parent_run_id, "trial_value", value, step=trial_number)
        self.client.set_terminated(run_id, "FINISHED" if state in ("COMPLETE", "PRUNED") else "FAILED")


def run_study(
    *,
    app: str,
    configs: Sequence[str | Path],
    n_trials: int,
    storage: str | None = None,
    study_name: str | None = None,
    timeout: float | None = None,
    overrides: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    seed: int = 0,
    search_space: Callable[[optuna.Trial], dict[str, Any]] | None = None,
    monitor: str | None = None,
    direction: str | None = None,
    pruner_startup_trials: int = 5,
    pruner_warmup_steps: int = 1,
    sampler_startup_trials: int = 10,
    enqueue: Sequence[Mapping[str, Any]] = (),
) -> optuna.Study:
    """Run (or resume) a study until it holds ``n_trials`` finished trials (or ``timeout`` seconds pass).

    Args:
        app: app name (``recsys``, ``finance``, ``lm``; ``toy`` for tests).
        configs: base LightningCLI YAML file(s).
        n_trials: target number of finished (complete + pruned) trials in the study.
        storage: Optuna RDB URL (default :func:`default_storage`).
        study_name: default ``<app>-<stem of the first config>``.
        timeout: stop starting new trials after this many seconds.
        overrides: fixed dotted overrides applied to every trial (e.g. a shorter ``trainer.max_epochs``).
        out_dir: where trial checkpoints and ``best.yaml`` go (default ``<repo>/runs/tune/<study>``).
        tracking_uri, experiment: MLflow store and experiment (default: moekit's, ``moekit-<app>-tune``).
        seed: TPE sampler seed.
        search_space: replaces the app's ``search_space`` (tests).
        monitor, direction: replace the app's objective metric and direction.
        pruner_startup_trials, pruner_warmup_steps: MedianPruner settings.
        sampler_startup_trials: random trials before TPE starts modelling.
        enqueue: parameter sets (Optuna param names -> values) to run first, e.g. the base config's own values
            as a same-budget baseline; only added when the study has no trials yet.

    Returns:
        The Optuna study.
    """
    from optuna.storages import RDBStorage, RetryFailedTrialCallback
    from optuna_integration import PyTorchLightningPruningCallback

    if n_trials < 1:
        raise ValueError(f"n_trials={n_trials}: must be at least 1")
    configs = [str(c) for c in configs]
    contract = get_app(app)
    suggest = search_space or contract.search_space
    monitor = monitor or contract.monitor
    direction = direction or contract.direction
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction={direction!r}: expected 'maximize' or 'minimize'")
    study_name = study_name or f"{app}-{Path(configs[0]).stem}"
    out = Path(out_dir) if out_dir else REPO_ROOT / "runs" / "tune" / study_name
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or default_tracking_uri()
    fixed = dict(overrides or {})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = RDBStorage(
            storage or default_storage(),
            heartbeat_interval=30,
            grace_period=120,
            heartbeat_stale_trial_callback=RetryFailedTrialCallback(max_retry=1),
        )
    study = optuna.create_study(
        study_name=study_name,
        storage=rdb,
        load_if_exists=True,
        direction=direction,
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=sampler_startup_trials),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=pruner_startup_trials, n_warmup_steps=pruner_warmup_steps
        ),
    )
    if study.direction.name.lower() != direction:
        raise ValueError(
            f"study {study_name!r} exists with direction {study.direction.name.lower()}, not {direction}"
        )
    if enqueue and not study.get_trials(deepcopy=False):
        for params in enqueue:
            study.enqueue_trial(dict(params))
    study.set_user_attr("app", app)
    study.set_user_attr("configs", configs)
    study.set_user_attr("monitor", monitor)
    tracker = _MlflowStudy(
        study=study, app=app, tracking_uri=tracking_uri, experiment=experiment or f"moekit-{app}-tune"
    )

    def objective(trial: optuna.Trial) -> float:
        params = dict(suggest(trial))
        trial.set_user_attr("overrides", json.dumps(params))
        run_id = tracker.trial_run(trial, params)
        logger = make_logger(app=app, tracking_uri=tracking_uri, experiment=tracker.experiment, run_id=run_id)
        pruning = PyTorchLightningPruningCallback(trial, monitor=monitor)
        args = [a for c in configs for a in ("--config", c)]
        args += overrides_to_args(fixed) + overrides_to_args(params)
        args += ["--trainer.enable_progress_bar=false", f"--run_dir={out / f'trial_{trial.number}'}"]
        state, value = "FAIL", None
        try:
            cli = MoekitCLI(app=app, args=args, run=False, logger=logger, extra_callbacks=[pruning])
            try:
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            except optuna.TrialPruned:
                state = "PRUNED"
                raise
            pruning.check_pruned()
            reported = list(trial.storage.get_trial(trial._trial_id).intermediate_values.values())
            if reported:
                value = max(reported) if direction == "maximize" else min(reported)
            else:
                metric = cli.trainer.callback_metrics.get(monitor)
                if metric is None:
                    raise RuntimeError(
                        f"monitored metric {monitor!r} was never logged; logged: "
                        f"{sorted(cli.trainer.callback_metrics)}"
                    )
                value = float(metric)
            state = "COMPLETE"
            return value
        finally:
            tracker.finish_trial(run_id, state=state, value=value, trial_number=trial.number)

    done = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    remaining = max(0, n_trials - done)
    log.info("study %s: %d finished trial(s), running up to %d more", study_name, done, remaining)
    if remaining:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=timeout,
            catch=(RuntimeError, ValueError),
            gc_after_trial=True,
        )
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        # the tuned values on the base config; the sweep-time budget overrides (--set) are only noted
        cfg = merged_config(configs, json.loads(best.user_attrs["overrides"]))
        header = (
            f"# best trial {best.number} of study {study_name!r}: {monitor} = {best.value:.6g}\n"
            f"# sweep-time fixed overrides (not applied here): {json.dumps(fixed)}\n"
            f"# run it: moekit {app} fit --config {out / 'best.yaml'}\n"
        )
        path = out / "best.yaml"
        path.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
        tracker.client.log_artifact(tracker.parent_run_id, str(path), "best")
        tracker.client.log_metric(tracker.parent_run_id, "best_value", best.value)
        tracker.client.set_tag(tracker.parent_run_id, "best_trial", str(best.number))
        log.info("best trial %d: %s = %.6g; config written to %s", best.number, monitor, best.value, path)
    return study


def summary_table(study: optuna.Study) -> str:
    """Markdown table of the study's trials (number, state, value, params)."""
    lines = ["| trial | state | value | params |", "|---|---|---|---|"]
    for t in study.get_trials(deepcopy=False):
        v = "" if t.value is None else f"{t.value:.4f}"
        lines.append(f"| {t.number} | {t.state.name} | {v} | {json.dumps(t.params)} |")
    return "\n".join(lines)
