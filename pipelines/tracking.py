"""MLflow tracking for moekit runs: where runs go, the default logger, and the callbacks that log the
resolved config, params, git commit, fitted preprocessing, plots and metric tables.

Where runs go (first that applies): an explicit ``tracking.uri`` in the config, ``$MLFLOW_TRACKING_URI``,
else the embedded sqlite store ``<repo>/mlflow/mlflow.db`` with artifacts beside it in
``<repo>/mlflow/artifacts`` (both git-ignored). MLflow 3.17 refuses the old file store, so a URI is
always given.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from pipelines.apps import get_app

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE_DIR = REPO_ROOT / "mlflow"
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


def make_logger(
    *,
    app: str,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> MLFlowLogger:
    """The default moekit logger: an ``MLFlowLogger`` on the resolved store, experiment ``moekit-<app>``.

    Args:
        app: app name (used for the default experiment and a ``moekit.app`` tag).
        tracking_uri: store URI; None -> :func:`default_tracking_uri`.
        experiment: experiment name; None -> ``moekit-<app>``.
        run_name: MLflow run name.
        run_id: log into this existing run (used by the tuner for nested trial runs).
        tags: extra run tags.
    """
    uri = tracking_uri or default_tracking_uri()
    name = experiment or f"moekit-{app}"
    ensure_experiment(name, uri)
    all_tags = {"moekit.app": app}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    all_tags.update(tags or {})
    return MLFlowLogger(
        experiment_name=name,
        run_name=run_name,
        tracking_uri=uri,
        tags=all_tags if run_id is None else None,
        artifact_location=artifact_location_for(uri),
        run_id=run_id,
    )


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


def log_params(logger: MLFlowLogger, params: Mapping[str, Any], *, max_len: int = 500) -> None:
    """Log params in batches of 100 (MLflow's limit), values truncated to ``max_len`` characters."""
    from mlflow.entities import Param

    items = [Param(k[:250], str(v)[:max_len]) for k, v in params.items()]
    client = logger.experiment
    for i in range(0, len(items), 100):
        try:
            client.log_batch(logger.run_id, params=items[i : i + 100])
        except Exception as e:  # noqa: BLE001 - params are immutable in MLflow; a re-logged run keeps the first
            log.warning("could not log some params: %s", e)


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
        for lg in mlflow_loggers(trainer):
            if not trainer.is_global_zero:
                continue
            lg.experiment.log_text(lg.run_id, text, "config/config.yaml")
            cfg = self.config.as_dict() if hasattr(self.config, "as_dict") else dict(self.config)
            cfg.pop("config", None)
            log_params(lg, {f"cfg.{k}": v for k, v in flatten(cfg).items()})
            lg.experiment.set_tag(lg.run_id, "moekit.stage", str(getattr(stage, "value", stage)))


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
            ax.legend(fontsize=6, ncol=2)
            ax.set_title(Path(path).stem.replace("_", " "))
            fig.tight_layout()
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
        fig.tight_layout()
        lg.experiment.log_figure(lg.run_id, fig, path)
        plt.close(fig)


def metrics_markdown(metrics: Mapping[str, float]) -> str:
    """A two-column Markdown table of metric name and value."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"
