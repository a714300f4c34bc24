"""A registered model loads and predicts in a fresh Python environment that has torch, pandas and mlflow but
no moekit: the predictor's code travels in the model (``code_paths``), and the model's requirements are public
versions.

The environment is a new venv (``--without-pip``) whose only extra path is this venv's site-packages, added
by a plain ``.pth`` line: the installed third-party packages are importable, but moekit's editable-install
hook (itself a ``.pth`` in that folder, processed only for real site folders) is not run, and neither the
repository nor the tests folder is on ``sys.path`` (``python -I``, clean environment, an empty folder). The
child checks that ``pipelines``, ``apps``, ``moe_core`` and ``toy_app`` cannot be imported before loading.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.apps import get_app
from pipelines.lightning_cli import MoekitCLI
from pipelines.registry import register_trained

REPO = Path(__file__).resolve().parents[2]

CHILD = """\
import importlib.util, sys
for name in ("pipelines", "apps", "moe_core", "toy_app", "moekit"):
    if importlib.util.find_spec(name) is not None:
        raise SystemExit(f"{name} is importable: not a fresh environment")
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
model.predict(pd.read_pickle(sys.argv[2])).to_pickle(sys.argv[3])
"""


def _fresh_env(folder: Path) -> Path:
    """A venv seeing this venv's installed packages (not moekit); returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    (Path(site) / "base_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _predict_outside(tmp_path: Path, model_uri: str, raw: pd.DataFrame) -> pd.DataFrame:
    model_dir = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    python = _fresh_env(tmp_path / "env")
    outside = tmp_path / "outside"
    outside.mkdir()
    raw.to_pickle(outside / "raw.pkl")
    (outside / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MOEKIT", "MLFLOW"))}
    proc = subprocess.run(
        [str(python), "-I", "child.py", str(model_dir), "raw.pkl", "out.pkl"],
        cwd=outside, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return pd.read_pickle(outside / "out.pkl")


@pytest.mark.slow
def test_toy_model_predicts_in_an_environment_without_moekit(
    tmp_path: Path, toy_config: Path, tracking_uri: str
) -> None:
    cli = MoekitCLI(app="toy", args=["--config", str(toy_config), f"--run_dir={tmp_path / 'ck'}"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    expected = torch.cat(cli.trainer.predict(cli.model, datamodule=cli.datamodule)).numpy()
    raw = cli.datamodule.raw["test"].drop(columns=["y"])
    register_trained(app="toy", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="toy")
    got = _predict_outside(tmp_path, "models:/toy/1", raw)
    np.testing.assert_allclose(got["p"].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(expected - 0.5).max() > 0.1


@pytest.mark.slow
@pytest.mark.needs_data("census_income_kdd/census-income.test.gz")
def test_recsys_model_predicts_in_an_environment_without_moekit(tmp_path: Path, tracking_uri: str) -> None:
    """apps.recsys and moe_core travel in the model; the signature's types are the documented ones."""
    cfg = REPO / "apps" / "recsys" / "configs" / "tiny.yaml"
    args = ["--config", str(cfg), "--trainer.max_epochs=1", f"--run_dir={tmp_path / 'ck'}"]
    cli = MoekitCLI(app="recsys", args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    app = get_app("recsys")
    cols = list(app.input_example(cli.datamodule).columns)
    raw = cli.datamodule.load_frames()["test"][0][cols].head(64).reset_index(drop=True)
    expected = app.build_predictor(cli.model, cli.datamodule).predict(raw)
    register_trained(
        app="recsys", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="rec"
    )

    info = mlflow.models.get_model_info("models:/rec/1")
    schema = pd.Series({c.name: str(c.type) for c in info.signature.inputs.inputs})

    # docs/pipelines.md: the training file's types: text columns as strings, integer columns as longs, real
    # columns as doubles
    def documented(c: str) -> str:
        if pd.api.types.is_integer_dtype(raw[c]):
            return "DataType.long"
        return "DataType.double" if pd.api.types.is_float_dtype(raw[c]) else "DataType.string"

    assert {documented(c) for c in cols} >= {"DataType.string", "DataType.long"}
    assert schema.to_dict() == {c: documented(c) for c in cols}
    outputs = {c.name: str(c.type) for c in info.signature.outputs.inputs}
    assert outputs == dict.fromkeys(cli.model.task_names, "DataType.double")

    got = _predict_outside(tmp_path, "models:/rec/1", raw)
    for t in cli.model.task_names:
        np.testing.assert_allclose(got[t].to_numpy(), expected[t].to_numpy(), rtol=1e-5, atol=1e-6)


def _types(schema) -> dict[str, str]:  # noqa: ANN001 - mlflow Schema
    return {c.name: str(c.type) for c in schema.inputs}


@pytest.mark.slow
@pytest.mark.needs_data("tinyshakespeare/input.txt")
def test_lm_model_generates_in_an_environment_without_moekit(tmp_path: Path, tracking_uri: str) -> None:
    """docs/pipelines.md: input ``prompt`` (string), generation params, output ``text`` (string)."""
    cfg = REPO / "apps" / "lm" / "configs" / "tiny.yaml"
    args = ["--config", str(cfg), "--trainer.max_steps=4", f"--run_dir={tmp_path / 'ck'}"]
    cli = MoekitCLI(app="lm", args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    app = get_app("lm")
    raw = app.input_example(cli.datamodule)
    expected = app.build_predictor(cli.model, cli.datamodule).predict(raw.copy())
    register_trained(app="lm", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="lm")

    sig = mlflow.models.get_model_info("models:/lm/1").signature
    assert _types(sig.inputs) == {"prompt": "DataType.string"}
    assert _types(sig.outputs) == {"text": "DataType.string"}
    assert {p.name for p in sig.params.params} == {
        "max_new_tokens", "temperature", "top_k", "top_p", "greedy", "seed",
    }  # fmt: skip

    got = _predict_outside(tmp_path, "models:/lm/1", raw)
    assert got["text"].tolist() == expected["text"].tolist()  # seeded generation: identical text


@pytest.mark.slow
@pytest.mark.needs_data("sp500_5yr/individual_stocks_5yr", "sp500_index/GSPC.csv")
def test_finance_model_scores_in_an_environment_without_moekit(tmp_path: Path, tracking_uri: str) -> None:
    """docs/pipelines.md: a long OHLCV panel window in, ``ticker, score, rank`` for the last date out."""
    cfg = REPO / "apps" / "finance" / "configs" / "tiny.yaml"
    args = ["--config", str(cfg), f"--run_dir={tmp_path / 'ck'}"]
    cli = MoekitCLI(app="finance", args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    app = get_app("finance")
    raw = app.input_example(cli.datamodule)
    expected = app.build_predictor(cli.model, cli.datamodule).predict(raw.copy())
    register_trained(
        app="finance", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="fin"
    )

    sig = mlflow.models.get_model_info("models:/fin/1").signature
    inputs = _types(sig.inputs)
    assert list(inputs) == ["date", "ticker", "open", "high", "low", "close", "volume"]
    assert inputs["date"] == inputs["ticker"] == "DataType.string"
    assert {inputs[c] for c in ("open", "high", "low", "close", "volume")} == {"DataType.double"}
    outputs = _types(sig.outputs)
    assert list(outputs) == ["ticker", "score", "rank"]
    assert outputs == {"ticker": "DataType.string", "score": "DataType.double", "rank": "DataType.long"}

    got = _predict_outside(tmp_path, "models:/fin/1", raw)
    assert got["ticker"].tolist() == expected["ticker"].tolist()
    np.testing.assert_allclose(got["score"].to_numpy(), expected["score"].to_numpy(), rtol=1e-5, atol=1e-6)
