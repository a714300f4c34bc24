"""``moekit register``: put a trained model in the MLflow Model Registry as a pyfunc that includes its
preprocessing (raw inputs in, predictions out), with a signature and an input example.

* recsys: raw feature columns -> one probability column per task;
* finance: a panel window -> a score per ticker;
* lm: a prompt -> generated text.

The pyfunc is :mod:`pipelines.pyfunc_model` logged as "model from code"; its ``predictor`` artifact is built
by the app adapter (:mod:`pipelines.adapters`). From the command line a model is rebuilt from its config and a
checkpoint (``trainer.validate`` restores it, so the registration also logs validation metrics); during
``moekit <app> fit --tracking.register_as NAME`` the trained model is registered directly into the fit's run.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from pipelines.tracking import default_tracking_uri, ensure_experiment, mlflow_loggers

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).resolve().parent / "pyfunc_model.py"


def _requirements() -> list[str]:
    import importlib.metadata as md

    reqs = []
    for pkg in ("torch", "lightning", "pandas", "numpy", "mlflow", "torchmetrics", "tokenizers"):
        try:
            reqs.append(f"{pkg}=={md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return reqs


def log_predictor(
    *,
    app: str,
    predictor,
    example,
    name: str | None,
    run_id: str | None,
    tracking_uri: str,
    experiment: str | None = None,
    params: dict | None = None,
) -> tuple[str, str | None]:
    """Log a predictor as a pyfunc model (optionally registered as ``name``).

    ``params`` (name -> default) become the signature's inference params (lm generation options).

    Returns:
        (model URI ``runs:/...``, registered version or None).
    """
    import mlflow
    from mlflow.models import infer_signature

    output = predictor.predict(example.copy())
    signature = infer_signature(example, output, params=params)
    mlflow.set_tracking_uri(tracking_uri)
    if run_id is None:
        exp_id = ensure_experiment(experiment or f"moekit-{app}", tracking_uri)
        run = mlflow.MlflowClient(tracking_uri).create_run(
            exp_id, run_name=f"register-{name or app}", tags={"moekit.app": app, "moekit.command": "register"}
        )
        run_id = run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictor.pt"
        torch.save(predictor, path)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_FILE),
                artifacts={"predictor": str(path)},
                signature=signature,
                input_example=example,
                registered_model_name=name,
                pip_requirements=_requirements(),
            )
    version = None if info.registered_model_version is None else str(info.registered_model_version)
    return info.model_uri, version


def register_trained(
    *,
    app: str,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    trainer: L.Trainer | None,
    name: str,
    tracking_uri: str | None = None,
) -> str:
    """Register an in-memory trained model (and its datamodule's fitted preprocessing); return the version.

    Logs into the trainer's MLflow run when it has one.
    """
    from pipelines.adapters import get_adapter

    adapter = get_adapter(app)
    predictor = adapter.build_predictor(model, datamodule)
    example = adapter.input_example(datamodule)
    run_id, uri = None, tracking_uri
    loggers = mlflow_loggers(trainer) if trainer is not None else []
    if loggers:
        run_id, uri = loggers[0].run_id, uri or loggers[0]._tracking_uri
    _, version = log_predictor(
        params=getattr(adapter, "params", None),
        app=app,
        predictor=predictor,
        example=example,
        name=name,
        run_id=run_id,
        tracking_uri=uri or default_tracking_uri(),
    )
    return version


def register_checkpoint(
    *,
    app: str,
    configs: Sequence[str],
    ckpt: str,
    name: str,
    tracking_uri: str | None = None,
    extra_args: Sequence[str] = (),
) -> str:
    """Rebuild a model from its config(s) and checkpoint, validate it, and register it; return the version."""
    from pipelines.cli import MoekitCLI

    args = [a for c in configs for a in ("--config", str(c))]
    args += ["--trainer.enable_progress_bar=false", "--tracking.run_name=register", *extra_args]
    if tracking_uri:
        args.append(f"--tracking.uri={tracking_uri}")
    cli = MoekitCLI(app=app, args=args, run=False)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=False)
    return register_trained(
        app=app,
        model=cli.model,
        datamodule=cli.datamodule,
        trainer=cli.trainer,
        name=name,
        tracking_uri=tracking_uri,
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="moekit register", description=__doc__.split("\n\n")[0])
    p.add_argument("app", help="recsys | finance | lm")
    p.add_argument("--config", action="append", required=True, help="the training config YAML (repeatable)")
    p.add_argument("--ckpt", required=True, help="checkpoint file (e.g. runs/<app>/<config>/last.ckpt)")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument(
        "--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or <repo>/mlflow/mlflow.db"
    )
    a, extra = p.parse_known_args(argv)
    version = register_checkpoint(
        app=a.app, configs=a.config, ckpt=a.ckpt, name=a.name, tracking_uri=a.tracking_uri, extra_args=extra
    )
    print(f"registered models:/{a.name}/{version}")
    print(f"serve it:  moekit serve models:/{a.name}/{version} --port 5001")
