"""Served recsys inputs are checked, not coerced (issue 14), in process and behind the server.

In process (the predictor the pyfunc wraps): a non-integral value in an integer column, an integer out of
range, a number or a null in a string column each raise a ``ValueError`` naming column, row and value; a
categorical string with surrounding blanks scores exactly like the stripped value (the training's
normalisation); integers sent as doubles score like the integers. Served: the same requests get 400 (types)
and 413 (a body over the limit, announced or chunked), a foreign ``Host`` gets 403, and valid requests match
the in-process predictions.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.apps import get_app
from pipelines.lightning_cli import MoekitCLI

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "apps" / "recsys" / "configs" / "tiny.yaml"
CENSUS = "census_income_kdd/census-income.test.gz"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("recsys_tiny")
    cli = MoekitCLI(
        app="recsys",
        args=[
            "--config",
            str(TINY),
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={out}",
            "--trainer.logger=false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    predictor = get_app("recsys").build_predictor(cli.model, cli.datamodule)
    cols = predictor.feature_columns
    raw = cli.datamodule.load_frames()["test"][0][cols].head(8).reset_index(drop=True)
    return cli, predictor, raw


def _string_columns(predictor, raw: pd.DataFrame) -> list[str]:
    return [
        c for c in predictor.preprocessor.schema.categorical if predictor.preprocessor.kinds[c] == "string"
    ]


@pytest.mark.slow
@pytest.mark.needs_data(CENSUS)
@pytest.mark.parametrize(
    ("column", "value", "words"),
    [
        ("age", 38.9, ["age", "row 3", "38.9", "integer"]),
        ("capital_gains", 1e308, ["capital_gains", "row 3", "1e+308", "out of range"]),
        ("class_worker", 5, ["class_worker", "row 3", "5", "string"]),
        ("class_worker", None, ["class_worker", "row 3", "None", "string"]),
        ("age", float("nan"), ["age", "row 3", "nan"]),
        ("age", True, ["age", "row 3", "True", "number"]),
        ("det_ind_code", 4.5, ["det_ind_code", "row 3", "4.5", "integer"]),
    ],
)
def test_predictor_rejects_out_of_type_values(trained, column: str, value, words: list[str]) -> None:
    _, predictor, raw = trained
    bad = raw.astype(object).copy()
    bad.loc[3, column] = value
    with pytest.raises(ValueError) as err:
        predictor.predict(bad)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


@pytest.mark.slow
@pytest.mark.needs_data(CENSUS)
def test_blank_padded_strings_and_integral_doubles_score_like_training(trained) -> None:
    _, predictor, raw = trained
    strings = _string_columns(predictor, raw)
    assert len(strings) == 26  # the census columns read as text
    expected = predictor.predict(raw)
    padded = raw.copy()
    for c in strings:
        padded[c] = " " + padded[c].astype(str) + "  "
    pd.testing.assert_frame_equal(predictor.predict(padded), expected)
    # and not by accident: an unknown string does change the score (the OOV bucket)
    unknown = raw.copy()
    for c in strings:
        unknown[c] = "no such category"
    assert not np.allclose(predictor.predict(unknown).to_numpy(), expected.to_numpy())
    # integers sent as JSON doubles (the signature's type) are the same categories and values
    doubles = raw.copy()
    for c in raw.columns:
        if pd.api.types.is_integer_dtype(raw[c]):
            doubles[c] = raw[c].astype(np.float64)
    pd.testing.assert_frame_equal(predictor.predict(doubles), expected)


def _post(url: str, body: bytes | str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(
        url + "/invocations", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _records(df: pd.DataFrame) -> str:
    rows = [{c: (None if v is None else v) for c, v in row.items()} for row in df.to_dict(orient="records")]
    return json.dumps({"dataframe_records": rows})


@pytest.mark.slow
@pytest.mark.needs_data(CENSUS)
def test_served_recsys_checks_types_body_size_and_host(trained, tmp_path: Path, tracking_uri: str) -> None:
    from pipelines.registry import register_trained
    from pipelines.serve import start_server, stop_server, wait_until_up

    cli, predictor, raw = trained
    version = register_trained(
        app="recsys", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="census-served"
    )
    expected = predictor.predict(raw)
    limit = 64 * 1024
    proc, url = start_server(
        f"models:/census-served/{version}",
        tracking_uri=tracking_uri,
        max_body_bytes=limit,
        log_file=tmp_path / "server.log",
    )
    try:
        wait_until_up(proc, url, timeout=180)
        status, body = _post(url, _records(raw))
        assert status == 200, body
        got = pd.DataFrame(json.loads(body)["predictions"])[expected.columns]
        np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-6)

        for column, value in [
            ("age", 38.9),
            ("capital_gains", 1e308),
            ("class_worker", 5),
            ("class_worker", None),
        ]:
            bad = raw.astype(object).copy()
            bad.loc[2, column] = value
            status, body = _post(url, _records(bad))
            assert status == 400 and column in body, (column, value, status, body)

        padded = raw.copy()
        for c in _string_columns(predictor, raw):
            padded[c] = " " + padded[c].astype(str)
        status, body = _post(url, _records(padded))
        assert status == 200, body
        got = pd.DataFrame(json.loads(body)["predictions"])[expected.columns]
        np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-6)

        big = pd.concat([raw] * 40, ignore_index=True)
        payload = _records(big).encode()
        assert 4 * limit < len(payload) < 16 * limit  # read and dropped past the limit, then answered
        status, body = _post(url, payload)
        assert status == 413 and str(limit) in body, (status, body[:200])

        # a body announced far larger is refused from its headers alone (none of it is sent)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 10000000000\r\n\r\n"
            )
            head = sock.recv(4096).decode(errors="replace")
        assert head.startswith("HTTP/1.1 413"), head

        # chunked: no Content-Length, the limit still holds
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            chunks = (payload[i : i + 8192] for i in range(0, len(payload), 8192))
            conn.request(
                "POST", "/invocations", body=chunks, headers={"Content-Type": "application/json"},
                encode_chunked=True,
            )  # fmt: skip
            resp = conn.getresponse()
            assert resp.status == 413, resp.read()[:200]
        finally:
            conn.close()

        status, body = _post(url, _records(raw), headers={"Host": "attacker.example:80"})
        assert status == 403, (status, body)

        assert proc.poll() is None  # still serving, still right
        status, body = _post(url, _records(raw))
        assert status == 200, body
    finally:
        stop_server(proc)
