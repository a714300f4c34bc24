"""The table of apps and the app contract: every app of the table satisfies ``MoekitApp`` and its commands
resolve; every app's search space yields overrides its configs accept; the recsys configs' old keys stop with
a message naming the injected form; and (on the real census data, when present) a tiny recsys run registers a
pyfunc whose predictions on raw rows equal the LightningModule's on preprocessed tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

from pipelines.apps import APPS, MoekitApp, app_names, get_app, load_command
from pipelines.lightning_cli import ConfigError, MoekitCLI
from pipelines.tune import overrides_to_args

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", [*APPS, "toy"])
def test_every_app_satisfies_the_contract(name: str) -> None:
    app = get_app(name)
    assert isinstance(app, MoekitApp) and app.name == name
    assert app.monitor and app.direction in ("maximize", "minimize")
    for command, target in app.commands.items():
        assert callable(load_command(target)), (name, command, target)


def test_table_is_the_builtin_apps_plus_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert app_names() == ["recsys", "finance", "lm", "toy"]
    monkeypatch.setenv("MOEKIT_APPS", "recsys=toy_app")
    with pytest.raises(ValueError, match="built-in"):
        app_names()
    monkeypatch.setenv("MOEKIT_APPS", "toy")
    with pytest.raises(ValueError, match="name=module"):
        app_names()
    monkeypatch.delenv("MOEKIT_APPS")
    with pytest.raises(ValueError, match="unknown app 'toy'"):
        get_app("toy")


@pytest.mark.parametrize("app", ["recsys", "finance", "lm"])
def test_search_space_overrides_parse(app: str, tracking_uri: str) -> None:
    configs = sorted((REPO / "apps" / app / "configs").glob("*.yaml"))
    assert configs, f"apps/{app}/configs has no YAML"
    contract = get_app(app)
    study = optuna.create_study(direction=contract.direction, sampler=optuna.samplers.RandomSampler(seed=0))
    checked = 0
    for _ in range(2):
        params = contract.search_space(study.ask())
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
            checked += 1
    assert checked >= 2


OLD_HOME_YAML = """\
model:
  class_path: apps.recsys.task.MultiTaskRecTask
  init_args:
    backbone: home
    embed_dim: 8
    home_levels: 2
    expert_hidden: [16]
data:
  class_path: apps.recsys.data.CensusDataModule
trainer: {logger: false}
"""


def test_old_recsys_keys_name_the_injected_form(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(OLD_HOME_YAML)
    with pytest.raises(ConfigError, match=r"class_path: apps\.recsys\.model\.HoMEBackbone"):
        MoekitCLI(app="recsys", args=["--config", str(old)], run=False)
    old.write_text(OLD_HOME_YAML.replace("    backbone: home\n", ""))
    with pytest.raises(ConfigError, match=r"model\.init_args\.backbone\.init_args\.levels"):
        MoekitCLI(app="recsys", args=["--config", str(old)], run=False)
    tiny = REPO / "apps" / "recsys" / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"model\.init_args\.backbone\.init_args\.num_experts"):
        MoekitCLI(app="recsys", args=["--config", str(tiny), "--model.init_args.num_experts=4"], run=False)
    with pytest.raises(ConfigError, match="moe_core.multigate.MMoE"):
        MoekitCLI(app="recsys", args=["--config", str(tiny), "--model.init_args.backbone", "mmoe"], run=False)


@pytest.mark.slow
@pytest.mark.needs_data("census_income_kdd/census-income.test.gz")
def test_recsys_registry_round_trip_on_census(tmp_path: Path, tracking_uri: str) -> None:
    import mlflow

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
    raw = cli.datamodule.load_frames()["test"][0]
    loaded = mlflow.pyfunc.load_model(f"models:/census-tiny/{version}")
    got = loaded.predict(raw[get_app("recsys").input_example(cli.datamodule).columns])
    for t in cli.model.task_names:
        np.testing.assert_allclose(got[t].to_numpy(), expected[t], rtol=1e-4, atol=1e-6)
    with pytest.raises(mlflow.exceptions.MlflowException, match="age"):
        loaded.predict(raw.drop(columns=["age"]).head(3))
