"""The real apps through the pipelines: every app's search space yields overrides its configs accept, and
(on the real census data, when present) a tiny recsys run registers a pyfunc whose predictions on raw rows
equal the LightningModule's on preprocessed tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from pipelines.cli import MoekitCLI
from pipelines.tune import load_search_space, overrides_to_args

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("app", ["recsys", "finance", "lm"])
def test_search_space_overrides_parse(app: str, tracking_uri: str) -> None:
    configs = sorted((REPO / "apps" / app / "configs").glob("*.yaml"))
    if not configs:
        pytest.skip(f"apps/{app}/configs has no YAML yet")
    suggest, monitor, direction = load_search_space(app)
    assert monitor and direction in ("maximize", "minimize")
    study = optuna.create_study(direction=direction, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(2):
        params = suggest(study.ask())
        for cfg in configs:
            text = cfg.read_text()
            if app == "finance" and "apps.finance.model.MIGA" not in text:
                continue  # the finance space tunes MIGA configs
            args = ["--config", str(cfg), *overrides_to_args(params), "--trainer.logger=false"]
            cli = MoekitCLI(app=app, args=args, run=False)
            for key, value in params.items():
                node = cli.config
                for part in key.split("."):
                    node = node[part]
                assert node == value or list(node) == list(value), (cfg.name, key, node, value)


@pytest.mark.slow
@pytest.mark.needs_data("census_income_kdd/census-income.test.gz")
def test_recsys_registry_round_trip_on_census(tmp_path: Path, tracking_uri: str) -> None:
    import mlflow

    from pipelines.adapters import get_adapter
    from pipelines.registry import register_trained

    cfg = REPO / "apps" / "recsys" / "configs" / "tiny.yaml"
    cli = MoekitCLI(app="recsys", args=["--config", str(cfg), "--trainer.max_epochs=1"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    version = register_trained(
        app="recsys", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="census-tiny"
    )
    # in-process: the LightningModule on the datamodule's preprocessed test tensors
    preds = cli.trainer.predict(cli.model, dataloaders=cli.datamodule.test_dataloader())
    expected = {t: torch.cat([p[t] for p in preds]).numpy() for t in cli.model.task_names}
    # registered: raw census rows (strings and raw numbers) through the pyfunc
    adapter = get_adapter("recsys")
    raw = adapter.raw_frame(cli.datamodule, "test")
    loaded = mlflow.pyfunc.load_model(f"models:/census-tiny/{version}")
    got = loaded.predict(raw[adapter.input_example(cli.datamodule).columns])
    for t in cli.model.task_names:
        np.testing.assert_allclose(got[t].to_numpy(), expected[t], rtol=1e-4, atol=1e-6)
    with pytest.raises(mlflow.exceptions.MlflowException, match="age"):
        loaded.predict(raw.drop(columns=["age"]).head(3))
