"""``moekit tune``: Optuna sweeps over an app config (the command is in :mod:`pipelines.commands`).

* Search space and objective: the app's ``search_space(trial) -> {dotted.key: value}``, ``monitor`` and
  ``direction`` (``apps/<app>/app.py``, see :mod:`pipelines.apps`); the values are applied as command-line
  overrides of the base config (``--model.init_args.lr=...``). The study's objective is named after
  ``monitor`` (``study.set_metric_names``), so optuna-dashboard shows it.
* Sampling: TPE (with the constant liar, so parallel workers do not pile onto one point), reseeded for
  every trial from ``(seed, trial number)``. Trial numbers are unique within a study, so every worker and
  every resumed process draws new configurations; with ``seed`` given a single-process sweep is
  reproducible, without it the seed comes from ``os.urandom``. Pruning: Optuna's MedianPruner, fed once per
  validation by ``optuna_integration.PyTorchLightningPruningCallback`` on the monitored metric.
* Storage: an RDB URL (default ``sqlite:///<repo>/runs/optuna/optuna.db``, git-ignored; PostgreSQL for many
  machines). ``n_trials`` (``--n-trials N``) is the study's *total* number of finished (complete or pruned)
  trials, not an addition: running the same command again after an interruption continues the count and
  stops at N, and several workers running it at once on one storage finish N together. A trial starts only
  while fewer than N earlier trials are finished, running or queued (a trial that lost that race to another
  worker ends FAIL with the user attribute ``moekit.skipped``). Trials left RUNNING by a killed worker are
  failed by the heartbeat (after ``grace_period`` seconds) and retried once.
* Budget: the fixed ``overrides`` (``--set``) and a hash of the base config are stored in the study; a
  rerun with other values is refused (start a new study with ``--study NAME``), so a study never mixes
  trials trained with different budgets.
* Tracking: one MLflow parent run per study and one nested run per trial (Lightning logs into it). A trial
  run ends FINISHED (complete or pruned), FAILED (an exception) or KILLED (interrupted; also, at the next
  start, the runs of trials the heartbeat failed); the parent ends FINISHED, or KILLED when interrupted.
  Each finished trial is logged as one line with its value and the best so far (logger ``moekit.progress``,
  shown by the ``moekit`` CLI at its default level).
* Output: ``<out>/best.yaml`` (default ``runs/tune/<study>/`` under the current directory), the base config
  with the best trial's values merged in (the sweep's fixed ``--set`` budget overrides are noted in its
  header, not applied), runnable with ``moekit <app> fit --config <out>/best.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import socket
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml

from pipelines.apps import get_app
from pipelines.lightning_cli import MoekitCLI, merged_config
from pipelines.tracking import REPO_ROOT, default_tracking_uri, ensure_experiment, git_commit, make_logger

log = logging.getLogger(__name__)
# the sweep's progress (a line per finished trial, the best config's path): shown by the moekit CLI at its
# default level, as the apps' stage lines are (pipelines.cli.PROGRESS_LOGGER)
progress_log = logging.getLogger("moekit.progress")

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# trials that count against the budget when a new one asks to start: finished, or on their way to it
CLAIMED = (*FINISHED, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
SKIPPED_ATTR = "moekit.skipped"


def default_storage() -> str:
    path = REPO_ROOT / "runs" / "optuna" / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _arg_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def overrides_to_args(overrides: Mapping[str, Any]) -> list[str]:
    """``{"model.init_args.lr": 0.1}`` -> ``["--model.init_args.lr=0.1"]``."""
    return [f"--{k}={_arg_value(v)}" for k, v in overrides.items()]


class PerTrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE reseeded for every trial from ``(seed, trial.number)``.

    A sampler seeded once per process repeats itself: every worker and every resumed process started with
    the same seed draws the same sequence. Trial numbers are unique in a study (the storage hands them out),
    so a fresh ``TPESampler`` seeded from the pair never repeats a draw, while a single-process sweep with a
    fixed ``seed`` stays reproducible.

    Args:
        seed: base seed.
        **tpe_kwargs: passed to every ``optuna.samplers.TPESampler``.
    """

    def __init__(self, *, seed: int, **tpe_kwargs: Any) -> None:
        self.seed = seed
        self._tpe_kwargs = tpe_kwargs
        self._inner = self._tpe(trial_number=-1)

    def _tpe(self, *, trial_number: int) -> optuna.samplers.TPESampler:
        trial_seed = int(np.random.SeedSequence([self.seed, trial_number + 1]).generate_state(1)[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=trial_seed, **self._tpe_kwargs)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._inner = self._tpe(trial_number=trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict
    ) -> dict:
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, param_name: str, param_distribution: Any
    ) -> Any:
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


class _Interrupted(KeyboardInterrupt):
    """Carries an interrupt (``KeyboardInterrupt``, or the ``SystemExit`` Lightning turns Ctrl+C and SIGTERM
    into) through ``study.optimize``, which fails the trial on a ``KeyboardInterrupt`` but lets a
    ``SystemExit`` escape with the trial still RUNNING."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(repr(original))
        self.original = original


class _BudgetReached(RuntimeError):
    """The trial found the study's budget taken by other workers (caught by ``optimize``: the trial FAILs)."""


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
            parent = self._first_parent(study.study_name, run)
            if parent != run.info.run_id:
                self.client.delete_run(run.info.run_id)
            study.set_user_attr("mlflow_parent_run_id", parent)
        else:
            self.client.update_run(parent, status="RUNNING")  # resumed
        self.parent_run_id = parent

    def _first_parent(self, study_name: str, run: Any) -> str:
        """Workers that start a new study together each create a parent run; all of them keep the first one
        created (the others are deleted), so the study has one parent. Candidates: RUNNING parent runs of the
        study started within a minute of ``run``."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`moekit.study` = '{study_name}' and tags.`moekit.role` = 'study' "
            f"and attributes.status = 'RUNNING' and attributes.start_time >= {run.info.start_time - 60_000}",
        )
        first = min((r.info.start_time, r.info.run_id) for r in [run, *found])
        return first[1]

    def trial_run(self, trial: optuna.Trial) -> str:
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "moekit.study": trial.study.study_name,
            "optuna.trial_number": str(trial.number),
        }
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial.number}", tags=tags)
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        return run.info.run_id

    def finish_trial(self, run_id: str, *, state: str, value: float | None, trial_number: int) -> None:
        """End a trial's run; ``state`` is COMPLETE, PRUNED, FAIL or KILLED."""
        self.client.set_tag(run_id, "optuna.state", state)
        if value is not None and math.isfinite(value):
            self.client.log_metric(run_id, "trial_value", value)
            self.client.log_metric(self.parent_run_id, "trial_value", value, step=trial_number)
        status = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "KILLED": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(run_id, status)

    def close_orphans(self, study: optuna.Study) -> None:
        """Mark KILLED the runs of failed trials still RUNNING in MLflow (their worker was killed outright and
        the heartbeat failed the trial)."""
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id is None:
                continue
            try:
                status = self.client.get_run(run_id).info.status
            except Exception:  # noqa: BLE001 - the tracking store was reset: nothing to close
                continue
            if status == "RUNNING":
                self.client.set_tag(run_id, "optuna.state", "FAIL")
                self.client.set_terminated(run_id, "KILLED")

    def finish_study(self, status: str) -> None:
        self.client.set_terminated(self.parent_run_id, status)


def _config_hash(configs: Sequence[str]) -> str:
    """sha256 (12 hex digits) of the merged base config, independent of YAML layout and comments."""
    text = json.dumps(merged_config(configs, {}), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_budget(study: optuna.Study, *, overrides: Mapping[str, Any], config_hash: str) -> None:
    """Store the sweep's fixed overrides and config hash in a new study; refuse a rerun that changes them."""
    stored = study.user_attrs
    current = {"fixed_overrides": json.dumps(dict(overrides), sort_keys=True), "config_hash": config_hash}
    what = {"fixed_overrides": "fixed overrides (--set)", "config_hash": "base config (sha256)"}
    for key, value in current.items():
        if key in stored and stored[key] != value:
            raise ValueError(
                f"study {study.study_name!r} was made with {what[key]} {stored[key]}, this run has {value}: "
                "their trials would not be comparable. Rerun with the study's values, or start a new study "
                "with --study NAME (study_name=...)."
            )
    for key, value in current.items():
        if key not in stored:
            study.set_user_attr(key, value)


def _claimed_before(study: optuna.Study, number: int) -> int:
    """Trials numbered below ``number`` that are finished, running or queued."""
    return sum(t.number < number for t in study.get_trials(deepcopy=False, states=CLAIMED))


def _count(study: optuna.Study, states: Sequence[optuna.trial.TrialState]) -> int:
    return len(study.get_trials(deepcopy=False, states=tuple(states)))


class _SigtermAsInterrupt:
    """While a sweep runs in the main thread, SIGTERM raises ``KeyboardInterrupt`` (instead of killing the
    process outright), so that the trial and the MLflow runs are closed as interrupted."""

    def __enter__(self) -> None:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


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
    seed: int | None = None,
    search_space: Callable[[optuna.Trial], dict[str, Any]] | None = None,
    monitor: str | None = None,
    direction: str | None = None,
    pruner_startup_trials: int = 5,
    pruner_warmup_steps: int = 1,
    sampler_startup_trials: int = 10,
    enqueue: Sequence[Mapping[str, Any]] = (),
    heartbeat_interval: int = 30,
    grace_period: int = 120,
) -> optuna.Study:
    """Run (or resume, or join) a study until it holds ``n_trials`` finished trials, or ``timeout`` passes.

    Args:
        app: app name (``recsys``, ``finance``, ``lm``; ``toy`` for tests).
        configs: base LightningCLI YAML file(s).
        n_trials: the study's TOTAL number of finished (complete + pruned) trials, over all runs and all
            workers; not a number to add.
        storage: Optuna RDB URL (default :func:`default_storage`).
        study_name: default ``<app>-<stem of the first config>``.
        timeout: stop starting new trials after this many seconds.
        overrides: fixed dotted overrides applied to every trial (e.g. a shorter ``trainer.max_epochs``);
            stored in the study: a rerun with other values (or another base config) is refused.
        out_dir: where trial checkpoints and ``best.yaml`` go (default ``runs/tune/<study>`` under the current
            directory, as ``fit`` writes ``runs/<app>/<config>``).
        tracking_uri, experiment: MLflow store and experiment (default: moekit's, ``moekit-<app>-tune``).
        seed: base seed of the per-trial TPE seeds (see :class:`PerTrialSeededTPE`); None: from
            ``os.urandom``.
        search_space: replaces the app's ``search_space`` (tests).
        monitor, direction: replace the app's objective metric and direction.
        pruner_startup_trials, pruner_warmup_steps: MedianPruner settings.
        sampler_startup_trials: random trials before TPE starts modelling.
        enqueue: parameter sets (Optuna param names -> values) to run first, e.g. the base config's own values
            as a same-budget baseline; only added when the study has no trials yet.
        heartbeat_interval, grace_period: seconds between a running trial's heartbeats, and without one
            before another worker fails (and retries) the trial.

    Returns:
        The Optuna study.

    Raises:
        ValueError: ``n_trials < 1``, a bad direction, or an existing study made with another direction,
            other fixed overrides or another base config.
    """
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
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
    # like fit's checkpoints (<default_root_dir>/runs/...), under the current directory
    out = Path(out_dir) if out_dir else Path.cwd() / "runs" / "tune" / study_name
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or default_tracking_uri()
    fixed = dict(overrides or {})
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = RDBStorage(
            storage or default_storage(),
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    study = optuna.create_study(
        study_name=study_name,
        storage=rdb,
        load_if_exists=True,
        direction=direction,
        sampler=PerTrialSeededTPE(seed=seed, n_startup_trials=sampler_startup_trials, constant_liar=True),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=pruner_startup_trials, n_warmup_steps=pruner_warmup_steps
        ),
    )
    if study.direction.name.lower() != direction:
        raise ValueError(
            f"study {study_name!r} exists with direction {study.direction.name.lower()}, not {direction}"
        )
    _check_budget(study, overrides=fixed, config_hash=_config_hash(configs))
    if enqueue and not study.get_trials(deepcopy=False):
        for params in enqueue:
            study.enqueue_trial(dict(params))
    study.set_user_attr("app", app)
    study.set_user_attr("configs", configs)
    study.set_user_attr("monitor", monitor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([monitor])
        optuna.storages.fail_stale_trials(study)
    tracker = _MlflowStudy(
        study=study, app=app, tracking_uri=tracking_uri, experiment=experiment or f"moekit-{app}-tune"
    )
    tracker.close_orphans(study)

    def objective(trial: optuna.Trial) -> float:
        # another worker may have taken the last slot between this worker's check and its ask
        if _claimed_before(study, trial.number) >= n_trials:
            trial.set_user_attr(
                SKIPPED_ATTR, f"the study's {n_trials} trial(s) were finished, running or queued"
            )
            study.stop()
            raise _BudgetReached(f"trial {trial.number} not run: the study's {n_trials} trial(s) are taken")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        params = dict(suggest(trial))
        trial.set_user_attr("overrides", json.dumps(params))
        run_id = tracker.trial_run(trial)
        logger = make_logger(app=app, tracking_uri=tracking_uri, experiment=tracker.experiment, run_id=run_id)
        pruning = PyTorchLightningPruningCallback(trial, monitor=monitor)
        args = [a for c in configs for a in ("--config", c)]
        args += overrides_to_args(fixed) + overrides_to_args(params)
        args += ["--trainer.enable_progress_bar=false", f"--run_dir={out / f'trial_{trial.number}'}"]
        state, value = "FAIL", None
        try:
            cli = MoekitCLI(app=app, args=args, run=False, logger=logger, extra_callbacks=[pruning])
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
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
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except (KeyboardInterrupt, SystemExit) as e:
            state = "KILLED"
            raise _Interrupted(e) from e
        finally:
            tracker.finish_trial(run_id, state=state, value=value, trial_number=trial.number)

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # one line per finished trial with the best so far; stop once the budget is finished or taken
        finished = _count(study, FINISHED)
        if trial.state in FINISHED:
            if trial.state == optuna.trial.TrialState.PRUNED:
                value = f" at step {max(trial.intermediate_values, default=0)}"
            else:
                value = f" {monitor}={trial.value:.6g}"
            try:
                best = f"best {study.best_value:.6g} (trial {study.best_trial.number})"
            except ValueError:
                best = "no complete trial yet"
            progress_log.info(
                "trial %d %s%s; %s; %d/%d finished",
                trial.number, trial.state.name, value, best, finished, n_trials,
            )  # fmt: skip
        if _count(study, (*FINISHED, optuna.trial.TrialState.RUNNING)) >= n_trials:
            study.stop()

    done = _count(study, FINISHED)
    running = _count(study, (optuna.trial.TrialState.RUNNING,))
    # an upper bound on this process's attempts; `progress` stops it earlier when workers share the study
    remaining = max(0, n_trials - done - running)
    log.info(
        "study %s: %d finished and %d running trial(s) of %d, running up to %d more",
        study_name, done, running, n_trials, remaining,
    )  # fmt: skip
    if remaining:
        try:
            with _SigtermAsInterrupt():
                study.optimize(
                    objective,
                    n_trials=remaining,
                    timeout=timeout,
                    catch=(RuntimeError, ValueError),
                    callbacks=[progress],
                    gc_after_trial=True,
                )
        except _Interrupted as e:
            tracker.finish_study("KILLED")
            raise e.original from None
        except KeyboardInterrupt:
            tracker.finish_study("KILLED")
            raise
        except BaseException:
            tracker.finish_study("FAILED")
            raise
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        # the tuned values on the base config; the sweep-time budget overrides (--set) are only noted
        cfg = merged_config(configs, json.loads(best.user_attrs["overrides"]))
        # its own run folder: by the config's stem every study's best.yaml would share runs/<app>/best, and
        # `--ckpt_path last` could resume another study's model
        if not cfg.get("run_dir") and not (cfg.get("trainer") or {}).get("default_root_dir"):
            cfg["run_dir"] = str(Path("runs") / app / f"{study_name}-best")
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
        progress_log.info(
            "best trial %d: %s = %.6g; config written to %s", best.number, monitor, best.value, path
        )
    tracker.finish_study("FINISHED")
    return study


def summary_table(study: optuna.Study) -> str:
    """Markdown table of the study's trials (number, state, value, params)."""
    lines = ["| trial | state | value | params |", "|---|---|---|---|"]
    for t in study.get_trials(deepcopy=False):
        v = "" if t.value is None else f"{t.value:.4f}"
        lines.append(f"| {t.number} | {t.state.name} | {v} | {json.dumps(t.params)} |")
    return "\n".join(lines)
