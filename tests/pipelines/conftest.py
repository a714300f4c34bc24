"""Shared fixtures of the pipelines tests: the toy app in the app table, a toy config, and MLflow/Optuna
state in tmp dirs.

The toy app (``toy_app.py`` beside this file) is an out-of-tree app: it joins the table through
``MOEKIT_APPS=toy=toy_app`` and this folder on ``sys.path`` / ``PYTHONPATH`` (so that ``mlflow models serve``
subprocesses can unpickle its predictor), exactly as any app outside the repository would.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

TOY_YAML = """\
seed_everything: 0
model:
  class_path: toy_app.ToyTask
  init_args: {hidden_dim: 8, lr: 0.05}
data:
  class_path: toy_app.ToyDataModule
  init_args: {n_samples: 512, batch_size: 64}
trainer:
  max_epochs: 3
  accelerator: cpu
  enable_model_summary: false
  enable_progress_bar: false
  log_every_n_steps: 1
"""


@pytest.fixture(autouse=True)
def toy_app_in_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """``toy`` is an app for every pipelines test (and for the processes they start)."""
    monkeypatch.setenv("MOEKIT_APPS", "toy=toy_app")
    paths = [str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


@pytest.fixture
def toy_config(tmp_path: Path) -> Path:
    path = tmp_path / "toy.yaml"
    path.write_text(TOY_YAML)
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An MLflow sqlite store in the test's tmp dir (also exported, so nothing reaches the repo's store)."""
    uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    (tmp_path / "mlflow").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri
