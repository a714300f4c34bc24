"""Serving a registered moekit model over HTTP (``mlflow models serve --env-manager local``, bound to
127.0.0.1 by default): the commands ``moekit serve`` and ``moekit ui`` live in :mod:`pipelines.commands`;
here are the helpers they and the tests use to start and stop a server.

Requests: ``POST /invocations`` with ``{"dataframe_split": {"columns": [...], "data": [[...]]}}`` or
``{"dataframe_records": [{...}]}``; ``GET /ping`` answers once the model is loaded. Malformed requests
(bad JSON, a missing column, a wrong type) get HTTP 400 with a message naming the problem, and the server
keeps serving.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipelines.tracking import default_tracking_uri


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_env(tracking_uri: str | None) -> dict[str, str]:
    """The environment of an ``mlflow`` subprocess: the tracking store and the venv's ``bin`` on PATH."""
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri or default_tracking_uri()
    # `mlflow models serve` execs uvicorn through a shell: the venv's bin must be on PATH
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def serve_command(
    model_uri: str, *, host: str = "127.0.0.1", port: int = 5001, workers: int = 1
) -> list[str]:
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    return [
        str(mlflow_bin),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        str(workers),
    ]


def start_server(
    model_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    tracking_uri: str | None = None,
    log_file: str | os.PathLike | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow models serve`` in the background; return (process, base URL).

    Stop it with :func:`stop_server`.
    """
    port = port or free_port(host)
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        serve_command(model_uri, host=host, port=port),
        env=serve_env(tracking_uri),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://{host}:{port}"


def wait_until_up(proc: subprocess.Popen, url: str, *, timeout: float = 120.0) -> None:
    """Poll ``/ping`` until it answers 200; raise if the process dies or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"model server exited with code {proc.returncode} before answering /ping")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"model server at {url} did not answer /ping within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, *, timeout: float = 20.0) -> None:
    """SIGTERM the server's process group (mlflow and its uvicorn), then SIGKILL after ``timeout``."""
    import signal

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
