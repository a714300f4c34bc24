"""The MLflow pyfunc of every moekit model, logged as "model from code" (MLflow 3: a file, not a pickle of a
``__main__`` instance).

The model's artifacts hold ``predictor``, a folder with the predictor built by the app
(``MoekitApp.build_predictor``, :mod:`pipelines.apps`) as ``predictor.safetensors`` + ``predictor.json``
(:mod:`pipelines.portable`; no pickle, nothing in the files runs as code): the trained network plus its
data module's fitted transform, taking raw inputs. Bad input raises an ``MlflowException`` with
``INVALID_PARAMETER_VALUE``, which ``mlflow models serve`` answers with HTTP 400 and the message, and keeps
serving.

This file imports only mlflow, pandas and torch: the code the predictor needs (``apps``, ``moe_core``, an
out-of-tree app module, ``pipelines.portable`` to read it) is in the model's ``code/`` folder
(``code_paths``, :mod:`pipelines.registry`), which MLflow puts on ``sys.path`` before this file runs, so the
model loads where moekit is not installed.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class MoekitPyfunc(PythonModel):
    """Raw inputs -> predictions through a moekit predictor (see :mod:`pipelines.apps`)."""

    def load_context(self, context) -> None:
        torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
        from pipelines.portable import load_portable  # from the model's code/ folder

        packages = (context.model_config or {}).get("packages", [])
        self.predictor = load_portable(context.artifacts["predictor"], extra_packages=packages)

    # the type hint (a DataFrame: no schema is inferred from it) keeps MLflow from warning at log/load time
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        try:
            return self.predictor.predict(model_input, **(params or {}))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise MlflowException(f"invalid input: {e}", error_code=INVALID_PARAMETER_VALUE) from e


mlflow.models.set_model(MoekitPyfunc())
