"""Shared stores on real PostgreSQL: Optuna workers sharing one study; MLflow server on a Postgres backend."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_two_optuna_workers_share_one_study_without_losing_or_duplicating_trials(fresh_db, tmp_path):
    import optuna

    url, _ = fresh_db
    n_per_worker, workers = 6, 2
    optuna.create_study(study_name="shared", storage=url, direction="minimize")
    outs = [tmp_path / f"w{i}.json" for i in range(workers)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "moekit_optuna_worker.py"),
                url,
                "shared",
                str(n_per_worker),
                f"w{i}",
                str(o),
            ]
        )
        for i, o in enumerate(outs)
    ]
    for p in procs:
        assert p.wait(timeout=180) == 0
    ran = [t for o in outs for t in json.loads(o.read_text())]
    study = optuna.load_study(study_name="shared", storage=url)
    trials = study.get_trials(deepcopy=False)
    n = n_per_worker * workers
    assert len(trials) == n and len(ran) == n
    assert sorted(t.number for t in trials) == list(range(n))  # no gap, no duplicate
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    by_number = {t.number: t for t in trials}
    assert len({r["number"] for r in ran}) == n
    for r in ran:  # every trial a worker ran is stored once, with its own parameters and value
        t = by_number[r["number"]]
        assert t.params == {"x": r["x"], "y": r["y"]}
        assert t.value == pytest.approx(r["value"])
    assert {t.user_attrs["worker"] for t in trials} == {"w0", "w1"}  # both workers really took part
    assert study.best_value == min(r["value"] for r in ran)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 150.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def test_mlflow_run_logged_through_postgres_backed_server_reads_back(fresh_db, tmp_path, pg_url):
    import mlflow
    import psycopg
    from mlflow.tracking import MlflowClient

    url, db = fresh_db
    port = _free_port()
    env = dict(
        os.environ,
        MOEKIT_MLFLOW_DB=db,
        MOEKIT_MLFLOW_PORT=str(port),
        MOEKIT_MLFLOW_ARTIFACTS=str(tmp_path / "artifacts"),
        MLFLOW_BIN=str(Path(sys.executable).with_name("mlflow")),
    )
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(REPO / "mlflow" / "postgres" / "start_server.sh")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc)
        uri = f"http://127.0.0.1:{port}"
        client = MlflowClient(tracking_uri=uri)
        exp_id = client.create_experiment("moekit-scaleout-test")
        run = client.create_run(exp_id)
        rid = run.info.run_id
        client.log_param(rid, "lr", "0.01")
        for step, v in enumerate([1.5, 1.2, 0.9]):
            client.log_metric(rid, "loss", v, step=step)
        art = tmp_path / "note.txt"
        art.write_text("sparse all-gather\n")
        client.log_artifact(rid, str(art), artifact_path="notes")
        client.set_terminated(rid)

        fresh = MlflowClient(tracking_uri=uri)  # a new client reads everything back through the server
        got = fresh.get_run(rid)
        assert got.data.params == {"lr": "0.01"}
        assert got.data.metrics["loss"] == pytest.approx(0.9)
        hist = fresh.get_metric_history(rid, "loss")
        assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [
            (0, 1.5),
            (1, 1.2),
            (2, 0.9),
        ]
        assert [f.path for f in fresh.list_artifacts(rid, "notes")] == ["notes/note.txt"]
        local = mlflow.artifacts.download_artifacts(
            run_id=rid, artifact_path="notes/note.txt", tracking_uri=uri, dst_path=str(tmp_path / "dl")
        )
        assert Path(local).read_text() == "sparse all-gather\n"
        assert (tmp_path / "artifacts").exists()  # the server's artifact root holds the file
        # the run really lives in PostgreSQL
        with psycopg.connect(url) as conn, conn.cursor() as cur:
            cur.execute("SELECT status FROM runs WHERE run_uuid = %s", (rid,))
            assert cur.fetchone() == ("FINISHED",)
            cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss'", (rid,))
            assert cur.fetchone() == (3,)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=30)
        log.close()
