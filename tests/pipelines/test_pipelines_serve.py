"""Serving: a registered toy model behind ``mlflow models serve`` on 127.0.0.1 answers valid requests with
the in-process predictions, answers malformed ones (bad JSON, a missing column, a wrong type) with HTTP 400
and a message naming the problem, and keeps serving afterwards. All waits are bounded."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from pipelines.apps import get_app
from pipelines.lightning_cli import MoekitCLI
from pipelines.registry import register_trained
from pipelines.serve import start_server, stop_server, wait_until_up


def _post(url: str, body: bytes | str) -> tuple[int, str]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(
        url + "/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
def test_serve_valid_and_malformed_requests(tmp_path: Path, toy_config: Path, tracking_uri: str) -> None:
    cli = MoekitCLI(app="toy", args=["--config", str(toy_config), "--trainer.max_epochs=1"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    version = register_trained(
        app="toy", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="toy-served"
    )
    raw = cli.datamodule.raw["test"].drop(columns=["y"]).head(8)
    expected = get_app("toy").build_predictor(cli.model, cli.datamodule).predict(raw)["p"].to_numpy()

    proc, url = start_server(
        f"models:/toy-served/{version}", tracking_uri=tracking_uri, log_file=tmp_path / "server.log"
    )
    try:
        wait_until_up(proc, url, timeout=180)
        valid = json.dumps({"dataframe_split": {"columns": list(raw.columns), "data": raw.values.tolist()}})
        status, body = _post(url, valid)
        assert status == 200, body
        got = np.array([row["p"] for row in json.loads(body)["predictions"]])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

        status, body = _post(url, "{not json")
        assert status == 400 and "json" in body.lower(), body

        missing = json.dumps({"dataframe_split": {"columns": ["x0", "x1", "x2"], "data": [[1.0, 2.0, 3.0]]}})
        status, body = _post(url, missing)
        assert status == 400 and "x3" in body, body

        wrong = json.dumps({"dataframe_records": [{"x0": "abc", "x1": 1.0, "x2": 2.0, "x3": 0.1}]})
        status, body = _post(url, wrong)
        assert status == 400 and "x0" in body, body

        # still up and still right
        assert proc.poll() is None
        status, body = _post(url, valid)
        assert status == 200
        assert np.allclose([row["p"] for row in json.loads(body)["predictions"]], expected, atol=1e-6)
    finally:
        stop_server(proc)
    assert proc.poll() is not None
