"""The MLflow Model Registry side of moekit: a trained model goes in as a pyfunc that includes its
preprocessing (raw inputs in, predictions out), with a signature and an input example.

* recsys: raw feature columns -> one probability column per task;
* finance: a panel window -> a score per ticker;
* lm: a prompt -> generated text.

The pyfunc is :mod:`pipelines.pyfunc_model` logged as "model from code"; its ``predictor`` artifact is built
by the app (``MoekitApp.build_predictor``, :mod:`pipelines.apps`). During
``moekit <app> fit --tracking.register_as NAME`` the trained model is registered into the fit's run;
``moekit register`` (:mod:`pipelines.commands`) rebuilds a model from its config and a checkpoint first.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch

from pipelines.apps import Predictor, get_app
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
    predictor: Predictor,
    example: pd.DataFrame,
    name: str | None,
    run_id: str | None,
    tracking_uri: str,
    experiment: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> tuple[str, str | None]:
    """Log a predictor as a pyfunc model (optionally registered as ``name``).

    ``params`` (name -> default) become the signature's inference params (lm generation options).

    Returns:
        (model URI ``runs:/...``, registered version or None).
    """
    import mlflow
    from mlflow.models import infer_signature

    output = predictor.predict(example.copy())
    signature = infer_signature(example, output, params=dict(params) if params else None)
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
    contract = get_app(app)
    predictor = contract.build_predictor(model, datamodule)
    example = contract.input_example(datamodule)
    run_id, uri = None, tracking_uri
    loggers = mlflow_loggers(trainer) if trainer is not None else []
    if loggers:
        run_id, uri = loggers[0].run_id, uri or loggers[0]._tracking_uri
    _, version = log_predictor(
        params=contract.predict_params,
        app=app,
        predictor=predictor,
        example=example,
        name=name,
        run_id=run_id,
        tracking_uri=uri or default_tracking_uri(),
    )
    return version
