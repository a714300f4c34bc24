"""Every shipped finance YAML parses and instantiates through LightningCLI (no data is loaded)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.cli import LightningCLI

from apps.finance.data import MarketDataModule, SP500DataModule
from apps.finance.task import FinanceTask

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "apps" / "finance" / "configs").glob("*.yaml"))


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {
        "tiny.yaml",
        "sp500_miga.yaml",
        "csi300_miga.yaml",
        "csi300_miga_lstm.yaml",
        "csi300_mlp.yaml",
    } <= names


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
    assert isinstance(cli.model, FinanceTask)
    nf = getattr(cli.model.model, "num_features", None)
    dm = cli.datamodule
    if isinstance(dm, MarketDataModule):  # the feature count comes from the data (157 without VWAP)
        assert nf == 157 and dm.source == "qlib" and dm.benchmark == "SH000300" and dm.rules == "cn"
        assert "accelerator" not in path.read_text()  # runs on whatever device the machine has
        assert getattr(cli.model.model, "step_len", dm.step_len) == dm.step_len
    else:
        assert isinstance(dm, SP500DataModule) and nf == dm.num_features
