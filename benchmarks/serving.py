"""Benchmark of the served census model: latency and throughput over HTTP against in-process pyfunc.predict.

Trains a census HoME (``apps/recsys/configs/tiny.yaml``, 1 epoch, by default: the served network's size is
not what is measured here, the request path is), registers it in a temporary MLflow store, serves it with
``pipelines.serve.start_server`` on 127.0.0.1 (a free port, 1 worker), and fires requests from threads at 1,
16 and 64 concurrent clients with 1 and 1,000 census test rows per request (``dataframe_split`` JSON). For
each setting: p50/p99 latency, rows/s and errors; beside it the in-process ``pyfunc.predict`` time of the same
rows (median), and the server's overhead as p50 / in-process. Requests go only to 127.0.0.1; each setting is
bounded in count (``--requests-1``/``--requests-1000`` in total) and time (``--budget-s``).

Run: ``taskset -c 1 .venv/bin/python benchmarks/serving.py``; writes ``benchmarks/results/serving.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIENTS = (1, 16, 64)
ROWS = (1, 1000)


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def post(url: str, body: bytes, timeout: float) -> tuple[int, float]:
    """POST ``body`` to ``url``; return (HTTP status or -1 on a connection error, seconds)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError):
        status = -1
    return status, time.perf_counter() - t0


def run_clients(url: str, body: bytes, *, clients: int, total: int, budget_s: float) -> dict:
    """``clients`` threads share ``total`` requests; no request starts after ``budget_s`` seconds."""
    lock = threading.Lock()
    left = [total]
    lat: list[float] = []
    errors = [0]
    deadline = time.monotonic() + budget_s

    def worker() -> None:
        while True:
            with lock:
                if left[0] <= 0 or time.monotonic() > deadline:
                    return
                left[0] -= 1
            status, dt = post(url, body, timeout=120)
            with lock:
                if status == 200:
                    lat.append(dt)
                else:
                    errors[0] += 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=budget_s + 240)
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(lat) + errors[0],
        "errors": errors[0],
        "wall_s": wall,
        "p50_ms": 1e3 * lat[len(lat) // 2] if lat else math.nan,
        "p99_ms": 1e3 * lat[min(len(lat) - 1, math.ceil(0.99 * len(lat)) - 1)] if lat else math.nan,
        "lat": lat,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "apps/recsys/configs/tiny.yaml"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--requests-1", type=int, default=640, help="requests per setting with 1 row")
    p.add_argument("--requests-1000", type=int, default=64, help="requests per setting with 1,000 rows")
    p.add_argument("--budget-s", type=float, default=90.0, help="no request starts later in a setting")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/serving.json"))
    a = p.parse_args(argv)

    import mlflow
    import torch

    from pipelines.lightning_cli import MoekitCLI
    from pipelines.registry import register_trained
    from pipelines.serve import start_server, stop_server, wait_until_up

    tmp = Path(tempfile.mkdtemp(prefix="moekit-bench-serving-"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.chdir(tmp)  # MLflow's default artifact root (./mlartifacts) lands in the temp dir
    mlflow.set_tracking_uri(uri)

    t0 = time.perf_counter()
    cli = MoekitCLI(
        app="recsys",
        args=[
            "--config",
            a.config,
            f"--trainer.max_epochs={a.epochs}",
            f"--trainer.default_root_dir={tmp / 'runs'}",
            "--trainer.logger=false",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    version = register_trained(
        app="recsys", model=cli.model, datamodule=cli.datamodule, trainer=cli.trainer, name="bench-census"
    )
    model_uri = f"models:/bench-census/{version}"
    print(f"trained and registered {model_uri} in {time.perf_counter() - t0:.0f} s", flush=True)

    test = cli.datamodule.load_frames()["test"][0]
    cols = list(mlflow.models.get_model_info(model_uri).signature.inputs.input_names())
    pyfunc = mlflow.pyfunc.load_model(model_uri)

    proc, base = start_server(model_uri, tracking_uri=uri, log_file=tmp / "server.log")
    rows_out = []
    try:
        wait_until_up(proc, base, timeout=180)
        url = base + "/invocations"
        for n in ROWS:
            frame = test[cols].head(n).reset_index(drop=True)
            body = json.dumps(
                {"dataframe_split": {"columns": cols, "data": frame.to_numpy().tolist()}}
            ).encode()
            # in-process: the same rows through the same pyfunc, median of repeated calls
            pyfunc.predict(frame)
            reps = 200 if n == 1 else 20
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                pyfunc.predict(frame)
                times.append(time.perf_counter() - t)
            inproc_ms = 1e3 * statistics.median(times)
            for _ in range(3):  # warm the server on this shape
                post(url, body, timeout=120)
            for c in CLIENTS:
                total = a.requests_1 if n == 1 else a.requests_1000
                r = run_clients(url, body, clients=c, total=max(total, c), budget_s=a.budget_s)
                ok = r["requests"] - r["errors"]
                row = {
                    "rows_per_request": n,
                    "clients": c,
                    "requests": r["requests"],
                    "errors": r["errors"],
                    "p50_ms": round(r["p50_ms"], 2),
                    "p99_ms": round(r["p99_ms"], 2),
                    "rows_per_s": round(ok * n / r["wall_s"], 1),
                    "inprocess_ms": round(inproc_ms, 2),
                    "overhead_p50_over_inprocess": round(r["p50_ms"] / inproc_ms, 1),
                    "inprocess_rows_per_s": round(1e3 * n / inproc_ms, 1),
                    "body_bytes": len(body),
                }
                rows_out.append(row)
                print(json.dumps(row), flush=True)
        assert proc.poll() is None, "the server died during the benchmark"
    finally:
        stop_server(proc)
        os.chdir(ROOT)
        shutil.rmtree(tmp, ignore_errors=True)  # the temp store and the model copy

    meta = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"affinity {sorted(os.sched_getaffinity(0))}, torch threads {torch.get_num_threads()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "load_avg_after": load_avg(),
        "config": str(Path(a.config).relative_to(ROOT)) if Path(a.config).is_relative_to(ROOT) else a.config,
        "epochs": a.epochs,
        "server": "pipelines.serve.start_server: uvicorn, 1 worker, 127.0.0.1; clients: urllib threads",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))

    print(f"\nserving, {meta['date']}, {meta['machine']}, load {meta['load_avg_after']}")
    print("| rows/request | clients | requests | errors | p50 ms | p99 ms | rows/s | in-process ms "
          "| in-process rows/s | p50 / in-process |")  # fmt: skip
    print("|" + "---|" * 10)
    for r in rows_out:
        print(
            f"| {r['rows_per_request']} | {r['clients']} | {r['requests']} | {r['errors']} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rows_per_s']:.0f} "
            f"| {r['inprocess_ms']:.2f} | {r['inprocess_rows_per_s']:.0f} "
            f"| {r['overhead_p50_over_inprocess']:.1f}x |"
        )
    bad = [r for r in rows_out if r["clients"] == 64 and r["errors"]]
    if bad:
        raise SystemExit(f"errors at 64 clients: {bad}")


if __name__ == "__main__":
    main()
