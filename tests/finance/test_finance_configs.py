"""Every shipped finance YAML parses and instantiates through LightningCLI (no data is loaded)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.cli import LightningCLI

from apps.finance.data import SP500DataModule
from apps.finance.task import FinanceTask

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "apps" / "finance" / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"tiny.yaml", "sp500_miga.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_yaml_instantiates(path):
    cli = LightningCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(path), "--trainer.logger=false"],
    )
    assert isinstance(cli.model, FinanceTask) and isinstance(cli.datamodule, SP500DataModule)
    nf = getattr(cli.model.model, "num_features", None)
    assert nf == cli.datamodule.num_features
