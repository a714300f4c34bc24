"""MLflow tracking for moekit runs: where runs go, the default logger, and the callbacks that log the
resolved config, params, git commit, fitted preprocessing, plots and metric tables.

Where runs go (first that applies): an explicit ``tracking.uri`` in the config, ``$MLFLOW_TRACKING_URI``,
else the embedded sqlite store ``<repo>/mlflow/mlflow.db`` with artifacts beside it in
``<repo>/mlflow/artifacts`` (both git-ignored). MLflow 3.17 refuses the old file store, so a URI is
always given.

Run lifecycle (:class:`MoekitMLFlowLogger`, :class:`MlflowRunLifecycle`):

* every run gets a unique name, ``<app>-<config stem>-<yyyymmdd-hhmmss>-<4 hex>`` (:func:`unique_run_name`),
  drawn from ``os.urandom``: MLflow's own generated names come from ``random``, which LightningCLI seeds
  first, so every ``seed_everything: 0`` run used to get the same name;
* each checkpoint carries its run id (``checkpoint[RUN_ID_KEY]``); a command given ``--ckpt_path`` (a resumed
  ``fit``, a ``test`` of a trained model) logs into that run (:func:`checkpoint_run_id`), set RUNNING again;
* a fit stopped by a signal (SIGTERM, Ctrl+C: Lightning raises ``SystemExit``/``KeyboardInterrupt`` in the
  loop) ends KILLED; any other exception ends FAILED with an ``error`` tag (``<type>: <message>``), also when
  it comes before training (data setup, sanity check); a run left open when the process exits (an exception
  outside the trainer) is marked FAILED at exit. A process killed with SIGKILL cannot mark anything: its run
  stays RUNNING until a resume reopens it. A ``validate``/``test``/``predict`` that fails on the FINISHED fit
  run it reopened leaves it FINISHED, with the failure in the tag ``moekit.last_error`` (``<stage>: <type>:
  <message>``): a wrong file at predict time does not undo a good training run;
* the training run records its checkpoint folder (tag ``moekit.checkpoint_dir``) and, at the end of ``fit``,
  the ``last``/``best`` checkpoint paths (tags ``moekit.checkpoint.last``, ``moekit.checkpoint.best``).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import secrets
import subprocess
import tempfile
import warnings
import weakref
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from pipelines.apps import get_app

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE_DIR = REPO_ROOT / "mlflow"
RUN_ID_KEY = "moekit_mlflow_run_id"
"""Checkpoint key holding the MLflow run id of the run that wrote it."""
ROUTING_PREFIX = "routing/"
"""Every app logs its routing statistics (``moe_core.stats``) under this prefix; the routing plot uses it."""


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the embedded sqlite store under ``<repo>/mlflow``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{DEFAULT_STORE_DIR / 'mlflow.db'}"


def artifact_location_for(tracking_uri: str) -> str | None:
    """Artifact folder beside a sqlite store (``<db folder>/artifacts``); None lets a server decide."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        if not db.is_absolute():
            db = Path.cwd() / db
        db.parent.mkdir(parents=True, exist_ok=True)
        return (db.parent / "artifacts").as_uri()
    return None


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """Return the id of experiment ``name``, creating it (with its artifact folder) if needed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location_for(tracking_uri))


def git_commit() -> str | None:
    """The repository's HEAD commit (with ``-dirty`` when the tree has changes), or None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def unique_run_name(app: str, stem: str | None = None) -> str:
    """``<app>-<stem>-<yyyymmdd-hhmmss>-<4 hex>``; the hex comes from ``os.urandom``, so seeding does not
    repeat it."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return "-".join(p for p in (app, stem, stamp, secrets.token_hex(2)) if p)


def checkpoint_run_id(
    ckpt_path: str | os.PathLike | None, run_dir: str | os.PathLike | None = None
) -> str | None:
    """The MLflow run id stored in a checkpoint (``RUN_ID_KEY``), or None.

    ``ckpt_path`` may be a file or ``"last"`` (``<run_dir>/last.ckpt``); Lightning's other keywords (``best``,
    ``hpc``) and missing files give None. Only that key is read: the file is opened with
    ``torch.load(weights_only=True, mmap=True)``, so an untrusted pickle runs nothing; a checkpoint that only
    names Python objects of an app has them replaced by inert placeholders, still read by torch's weights-only
    unpickler.
    """
    if ckpt_path is None:
        return None
    path = (
        Path(run_dir) / "last.ckpt" if str(ckpt_path) == "last" and run_dir is not None else Path(ckpt_path)
    )
    if not path.is_file():
        return None
    try:
        ckpt = _load_placeholders(path)
    except Exception as e:  # noqa: BLE001 - an unreadable file is Lightning's error to report, not ours
        log.warning("could not read the MLflow run id from %s: %s", path, e)
        return None
    run_id = ckpt.get(RUN_ID_KEY) if isinstance(ckpt, Mapping) else None
    return str(run_id) if run_id else None


class _Placeholder:
    """Stands in for any global a checkpoint names outside the allow-list: takes any arguments and state,
    does nothing (it is all ``checkpoint_run_id`` needs: the run id is a plain string beside them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _load_placeholders(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint where every global outside torch's weights-only
    allow-list is mapped to the inert :class:`_Placeholder` (``safe_globals`` with ``(class, name)`` pairs):
    nothing named by the file is imported or called, and torch's own weights-only unpickler reads it."""
    import torch

    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with torch.serialization.safe_globals([(_Placeholder, n) for n in names]):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


_OPEN_LOGGERS: weakref.WeakSet[MoekitMLFlowLogger] = weakref.WeakSet()


class MoekitMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` that ends a run KILLED (instead of FAILED) when :class:`MlflowRunLifecycle` saw a
    signal, and whose run, if still open when the process exits, is marked FAILED then (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failure_status = "FAILED"
        self._open = False
        # the status of the run this logger reopened (make_logger(reopen=True)), None for a new run: a test
        # or predict that fails on a FINISHED fit run leaves it FINISHED (see MlflowRunLifecycle.on_exception)
        self.reopened_status: str | None = None
        _OPEN_LOGGERS.add(self)

    @property
    def experiment(self):  # noqa: ANN201 - MlflowClient, as the parent's
        client = super().experiment
        if client is not None and not self._open and self._initialized:
            self._open = True
        return client

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:  # noqa: ANN401 - dict or Namespace, as the parent's
        """The module's hyper-parameters through :func:`log_params`: in a run that already has them (``test``
        of a checkpoint reopens its fit's run) only new keys are logged, and the keys whose value changed
        (e.g. ``config/vocab_size``, None at fit start and resolved from the data later) are listed in the
        tag ``moekit.changed_hparams`` instead of failing the command on MLflow's immutable params."""
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

        changed = log_params(self, _flatten_dict(_convert_params(params)))
        if changed:
            self.experiment.set_tag(self.run_id, "moekit.changed_hparams", ",".join(changed)[:4900])

    def finalize(self, status: str = "success") -> None:
        if status == "failed":
            status = self.failure_status
        super().finalize(status)
        self._open = False
        self.failure_status = "FAILED"


@atexit.register
def _fail_open_runs() -> None:
    for lg in list(_OPEN_LOGGERS):
        if not lg._open:
            continue
        try:
            client = lg._mlflow_client
            if client.get_run(lg._run_id).info.status == "RUNNING":
                why = "the process exited while the run was open"
                if lg.reopened_status == "FINISHED":  # a later command on a finished run: it stays finished
                    client.set_tag(lg._run_id, "moekit.last_error", why)
                    client.set_terminated(lg._run_id, "FINISHED")
                else:
                    client.set_tag(lg._run_id, "error", why)
                    client.set_terminated(lg._run_id, "FAILED")
        except Exception:  # noqa: BLE001, S110 - best effort at interpreter exit (the store may be gone)
            pass


def make_logger(
    *,
    app: str,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    config_stem: str | None = None,
    reopen: bool = False,
) -> MoekitMLFlowLogger:
    """The default moekit logger: an ``MLFlowLogger`` on the resolved store, experiment ``moekit-<app>``.

    Args:
        app: app name (used for the default experiment and a ``moekit.app`` tag).
        tracking_uri: store URI; None -> :func:`default_tracking_uri`.
        experiment: experiment name; None -> ``moekit-<app>``.
        run_name: MLflow run name; None -> :func:`unique_run_name` ``(app, config_stem)``.
        run_id: log into this existing run (the tuner's nested trial runs; the run a checkpoint came from).
        tags: extra run tags (set on the existing run too when ``run_id`` is given).
        config_stem: the config file's stem, part of the generated run name.
        reopen: with ``run_id``: set that run's status back to RUNNING (a resumed fit, a test of its
            checkpoint).
    """
    uri = tracking_uri or default_tracking_uri()
    name = experiment or f"moekit-{app}"
    ensure_experiment(name, uri)
    all_tags = {"moekit.app": app}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    all_tags.update(tags or {})
    if run_id is not None and reopen:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        try:
            previous = client.get_run(run_id).info.status
        except MlflowException:
            # a checkpoint from another store (another machine, a copied run folder): its run is not here
            log.warning("MLflow run %s (named in the checkpoint) is not in %s: logging to a new run", run_id,
                        uri)  # fmt: skip
            run_id = None
        else:
            client.update_run(run_id, status="RUNNING")
            for k, v in (tags or {}).items():
                client.set_tag(run_id, k, v)
    logger = MoekitMLFlowLogger(
        experiment_name=name,
        run_name=run_name or (unique_run_name(app, config_stem) if run_id is None else None),
        tracking_uri=uri,
        tags=all_tags if run_id is None else None,
        artifact_location=artifact_location_for(uri),
        run_id=run_id,
    )
    if run_id is not None and reopen:
        logger.reopened_status = previous
    return logger


def mlflow_loggers(trainer: L.Trainer) -> list[MLFlowLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b.c": value}`` (lists kept as values)."""
    out: dict[str, Any] = {}
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = d
    return out


def log_params(logger: MLFlowLogger, params: Mapping[str, Any], *, max_len: int = 500) -> list[str]:
    """Log params in batches of 100 (MLflow's limit), values truncated to ``max_len`` characters.

    MLflow params are immutable: in a run that already has some (a ``test`` or ``predict`` reopening its
    fit's run), only new keys are logged, and the keys whose value differs from the logged one are returned
    (not logged, not warned about: the caller records them).
    """
    from mlflow.entities import Param

    values = {k[:250]: str(v)[:max_len] for k, v in params.items()}
    client = logger.experiment
    try:
        existing = client.get_run(logger.run_id).data.params
    except Exception:  # noqa: BLE001 - a store that cannot answer: log everything, as before
        existing = {}
    changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
    items = [Param(k, v) for k, v in values.items() if k not in existing]
    for i in range(0, len(items), 100):
        try:
            client.log_batch(logger.run_id, params=items[i : i + 100])
        except Exception as e:  # noqa: BLE001 - a rejected batch must not stop training
            log.warning("could not log some params: %s", e)
    return changed


class MlflowRunLifecycle(Callback):
    """Ties the MLflow run to the training lifecycle (see the module docstring).

    * ``on_save_checkpoint``: the run id goes into the checkpoint (``RUN_ID_KEY``);
    * ``setup``: tag ``moekit.checkpoint_dir`` (the fixed checkpoint folder) when fitting;
    * ``on_fit_end``: tags ``moekit.checkpoint.last`` and ``moekit.checkpoint.best``;
    * ``on_exception``: a signal (``KeyboardInterrupt``, a ``SystemExit`` such as Lightning's
      ``SIGTERMException``) makes the logger end the run KILLED; any other exception FAILED, tagged ``error``.

    Args:
        checkpoint_dir: the checkpoint folder of the run, or None.
    """

    def __init__(self, *, checkpoint_dir: str | os.PathLike | None = None) -> None:
        self.checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.checkpoint_dir is None:
            return
        for lg in mlflow_loggers(trainer):
            lg.experiment.set_tag(lg.run_id, "moekit.checkpoint_dir", self.checkpoint_dir)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loggers = mlflow_loggers(trainer)
        if loggers and trainer.is_global_zero:
            checkpoint[RUN_ID_KEY] = loggers[0].run_id

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from lightning.pytorch.callbacks import ModelCheckpoint

        paths: dict[str, str] = {}
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                if cb.last_model_path and "last" not in paths:
                    paths["last"] = str(Path(cb.last_model_path).resolve())
                if cb.best_model_path and "best" not in paths:
                    paths["best"] = str(Path(cb.best_model_path).resolve())
        for lg in mlflow_loggers(trainer):
            for k, v in paths.items():
                lg.experiment.set_tag(lg.run_id, f"moekit.checkpoint.{k}", v)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not trainer.is_global_zero:
            return
        killed = isinstance(exception, (KeyboardInterrupt, SystemExit))
        stage = str(getattr(trainer.state.fn, "value", trainer.state.fn))
        for lg in mlflow_loggers(trainer):
            # a validate/test/predict that fails on the finished fit run it reopened (a wrong data file at
            # predict time) does not undo that run: it stays FINISHED, the failure in moekit.last_error
            keep = (
                isinstance(lg, MoekitMLFlowLogger) and lg.reopened_status == "FINISHED" and stage != "fit"
            )
            try:
                if keep:
                    what = "interrupted" if killed else f"{type(exception).__name__}: {exception}"
                    lg.experiment.set_tag(lg.run_id, "moekit.last_error", f"{stage}: {what}"[:5000])
                elif killed:
                    lg.experiment.set_tag(lg.run_id, "moekit.interrupted", type(exception).__name__)
                else:
                    lg.experiment.set_tag(
                        lg.run_id, "error", f"{type(exception).__name__}: {exception}"[:5000]
                    )
            except Exception as e:  # noqa: BLE001 - never hide the training error behind a tracking one
                log.warning("could not tag the MLflow run with the error: %s", e)
            if isinstance(lg, MoekitMLFlowLogger):
                lg.failure_status = "FINISHED" if keep else "KILLED" if killed else "FAILED"


class MlflowSaveConfigCallback(SaveConfigCallback):
    """Log the resolved LightningCLI config to every MLflow logger: ``config/config.yaml`` artifact, the
    flattened config as params (prefixed ``cfg.``) and a ``moekit.command`` tag.

    Lightning's own ``SaveConfigCallback`` asserts on ``trainer.log_dir``, None for an MLflow logger on
    a database store; this subclass writes to the run instead (and to the log dir when there is one).
    """

    def __init__(self, parser, config, **kwargs) -> None:
        kwargs["save_to_log_dir"] = False
        kwargs.setdefault("overwrite", True)
        super().__init__(parser, config, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        stage_name = str(getattr(stage, "value", stage))
        # a test/predict reopening the fit's run keeps the fit's config and writes its own beside it
        path = "config/config.yaml" if stage_name == "fit" else f"config/{stage_name}.yaml"
        for lg in mlflow_loggers(trainer):
            if not trainer.is_global_zero:
                continue
            lg.experiment.log_text(lg.run_id, text, path)
            cfg = self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config)
            cfg.pop("config", None)
            changed = log_params(lg, {f"cfg.{k}": v for k, v in flatten(cfg).items()})
            if changed:
                tag = f"moekit.{stage_name}.changed_params"
                lg.experiment.set_tag(lg.run_id, tag, ",".join(changed)[:4900])
            lg.experiment.set_tag(lg.run_id, "moekit.stage", stage_name)


class MlflowArtifactsCallback(Callback):
    """Log plots, tables and the fitted preprocessing to the MLflow run.

    * end of fit: loss curves and routing-statistics curves (PNG; the ``routing/`` metrics) from the run's
      metric history, and the datamodule's fitted preprocessing (``MoekitApp.save_preprocessing``);
    * end of test: the test metric table (JSON + Markdown), the app's own test artifacts
      (``MoekitApp.test_artifacts``) and, when AUC metrics exist, an AUC bar chart.

    Args:
        app: app name in the table of :mod:`pipelines.apps`.
    """

    def __init__(self, *, app: str) -> None:
        self.app = app

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        for lg in mlflow_loggers(trainer):
            try:
                self._log_curves(lg)
            except Exception as e:  # noqa: BLE001 - plots must never fail a training run
                log.warning("could not plot metric curves: %s", e)
            self._log_preprocessing(trainer, lg)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")}
        for lg in mlflow_loggers(trainer):
            lg.experiment.log_text(
                lg.run_id, json.dumps(metrics, indent=2, sort_keys=True), "tables/test_metrics.json"
            )
            lg.experiment.log_text(lg.run_id, metrics_markdown(metrics), "tables/test_metrics.md")
            self._log_app_test_artifacts(trainer, pl_module, lg)
            auc = {k: v for k, v in metrics.items() if "auc" in k.lower()}
            if auc:
                try:
                    self._log_bar(lg, auc, "plots/test_auc.png", "test AUC")
                except Exception as e:  # noqa: BLE001
                    log.warning("could not plot AUC table: %s", e)

    def _log_app_test_artifacts(
        self, trainer: L.Trainer, pl_module: L.LightningModule, lg: MLFlowLogger
    ) -> None:
        if trainer.datamodule is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            try:
                files = get_app(self.app).test_artifacts(pl_module, trainer.datamodule, Path(tmp))
            except Exception as e:  # noqa: BLE001 - reporting must never fail a test run
                log.warning("could not make the %s test artifacts: %s", self.app, e)
                return
            for f in files:
                lg.experiment.log_artifact(lg.run_id, str(f), f"{self.app}_test")

    def _log_preprocessing(self, trainer: L.Trainer, lg: MLFlowLogger) -> None:
        dm = trainer.datamodule
        if dm is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            try:
                files = get_app(self.app).save_preprocessing(dm, Path(tmp))
            except Exception as e:  # noqa: BLE001
                log.warning("could not export the fitted preprocessing: %s", e)
                return
            for f in files:
                lg.experiment.log_artifact(lg.run_id, str(f), "preprocessing")

    @staticmethod
    def _log_curves(lg: MLFlowLogger) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        client = lg.experiment
        run = client.get_run(lg.run_id)
        keys = sorted(run.data.metrics)
        groups = {
            "plots/loss_curves.png": [k for k in keys if "loss" in k and not k.startswith("test")],
            "plots/routing_stats.png": [k for k in keys if k.startswith(ROUTING_PREFIX)][:24],
            "plots/val_metrics.png": [k for k in keys if k.startswith("val") and "loss" not in k][:24],
        }
        for path, ks in groups.items():
            if not ks:
                continue
            fig, ax = plt.subplots(figsize=(8, 5))
            for k in ks:
                hist = client.get_metric_history(lg.run_id, k)
                if len(hist) < 1:
                    continue
                hist = sorted(hist, key=lambda m: m.step)
                ax.plot(
                    [m.step for m in hist],
                    [m.value for m in hist],
                    label=k,
                    marker="." if len(hist) < 30 else None,
                )
            ax.set_xlabel("step")
            # many curves (a metric per task and split): the legend beside the axes, not over them
            ax.legend(fontsize=6, ncol=1 + len(ax.lines) // 24, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            ax.set_title(Path(path).stem.replace("_", " "))
            _tight(fig)
            client.log_figure(lg.run_id, fig, path)
            plt.close(fig)

    @staticmethod
    def _log_bar(lg: MLFlowLogger, values: Mapping[str, float], path: str, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3 + 0.2 * len(values)))
        names = list(values)
        ax.barh(names, [values[n] for n in names])
        for i, n in enumerate(names):
            ax.text(values[n], i, f" {values[n]:.4f}", va="center", fontsize=8)
        ax.set_xlim(min(0.5, min(values.values())), 1.05)
        ax.set_title(title)
        _tight(fig)
        lg.experiment.log_figure(lg.run_id, fig, path)
        plt.close(fig)


def _tight(fig: Any) -> None:
    """``fig.tight_layout()`` without its "Tight layout not applied" warning (printed on every ``test`` of a
    run with many metrics, where the layout cannot shrink any further: the figure is logged as drawn)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.tight_layout()


def metrics_markdown(metrics: Mapping[str, float]) -> str:
    """A two-column Markdown table of metric name and value."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"
