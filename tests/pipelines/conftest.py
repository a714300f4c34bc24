"""Shared fixtures of the pipelines tests: a toy config and MLflow/Optuna state in tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

TOY_YAML = """\
seed_everything: 0
model:
  class_path: pipelines._toy.ToyTask
  init_args: {hidden_dim: 8, lr: 0.05}
data:
  class_path: pipelines._toy.ToyDataModule
  init_args: {n_samples: 512, batch_size: 64}
trainer:
  max_epochs: 3
  accelerator: cpu
  enable_model_summary: false
  enable_progress_bar: false
  log_every_n_steps: 1
"""


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
