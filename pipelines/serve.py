"""Serving a registered moekit model over HTTP, bound to 127.0.0.1 by default: the commands ``moekit serve``
and ``moekit ui`` live in :mod:`pipelines.commands`; here are the server, and the helpers they and the tests
use to start and stop it.

The server is MLflow's own scoring app (``mlflow.pyfunc.scoring_server``, what ``mlflow models serve
--env-manager local`` runs under uvicorn) wrapped in two guards (:class:`RequestGuard`):

- a request body limit (``max_body_bytes``, default 8 MiB): a larger body is answered 413 before the model
  sees it, whether it announces its size (``Content-Length``) or not (chunked);
- the Host check the MLflow UI does (``mlflow.server``'s ``HostValidationMiddleware``): a ``Host`` header
  that is not loopback or a private address (or one of ``$MLFLOW_SERVER_ALLOWED_HOSTS``, comma-separated
  fnmatch patterns) is answered 403 (DNS rebinding); ``/ping`` and ``/health`` are exempt.

Requests: ``POST /invocations`` with ``{"dataframe_split": {"columns": [...], "data": [[...]]}}`` or
``{"dataframe_records": [{...}]}``; ``GET /ping`` answers once the model is loaded. Malformed requests
(bad JSON, a missing column, a wrong type, a value out of range) get HTTP 400 with a message naming the
problem, and the server keeps serving.

Processes: :func:`start_server` starts uvicorn in its own session (process group); :func:`stop_server` and
``moekit serve`` and ``moekit ui`` (on SIGTERM/SIGINT/SIGHUP, :func:`supervise`) stop that whole group,
workers included.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pipelines.tracking import default_tracking_uri

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
# read by create_app in the uvicorn process (and its workers)
ENV_MODEL_PATH = "MOEKIT_SERVE_MODEL_PATH"
ENV_MAX_BODY = "MOEKIT_SERVE_MAX_BODY_BYTES"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_env(tracking_uri: str | None) -> dict[str, str]:
    """The environment of a server or ``mlflow`` subprocess: tracking store, the venv's ``bin`` on PATH."""
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = tracking_uri or default_tracking_uri()
    # `mlflow ui` execs uvicorn/gunicorn through a shell: the venv's bin must be on PATH
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


# ---------------------------------------------------------------------------------------------- the server
class RequestGuard:
    """ASGI middleware: answer 413 to a request body over ``max_body_bytes``, else pass the request on.

    The body is read (at most ``max_body_bytes`` bytes are kept) and replayed to ``app``. Past the limit the
    rest is read and dropped, up to ``DRAIN_FACTOR`` times the limit, so that an ordinary client still sending
    gets the 413 rather than a broken pipe; a body announced (``Content-Length``) larger than that is refused
    without reading it.
    """

    DRAIN_FACTOR = 16

    def __init__(self, app: Any, *, max_body_bytes: int) -> None:
        if max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def _refuse(self, send: Any, size: str) -> None:
        msg = f"request body {size} exceeds the limit of {self.max_body_bytes} bytes".encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(msg)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": msg})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        n = int(length) if length is not None and length.isdigit() else -1
        if n > self.DRAIN_FACTOR * self.max_body_bytes:
            return await self._refuse(send, f"of {n} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # drop the rest, within bounds, then answer
                more = message.get("more_body", False)
                while more and size <= self.DRAIN_FACTOR * self.max_body_bytes:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    size += len(message.get("body", b""))
                    more = message.get("more_body", False)
                return await self._refuse(send, f"of {n if n >= 0 else size} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


_MAX_EXACT = 2**53  # integers a float64 holds exactly


def widen_json_columns(df: Any, schema: Any) -> Any:
    """The lossless conversions a JSON client cannot avoid, before MLflow enforces the signature ``schema``.

    * a ``double`` column sent as integers (JSON has one number type: ``JSON.stringify(30.0)`` is ``30``)
      becomes float64 when every value is within ``|x| <= 2**53`` (exact); MLflow refuses int64 there ("Can
      not safely convert int64 to float64");
    * a ``long`` column sent with integer strings (``"1010"``, as a CSV file keys them) becomes int64 when
      every value is an integer or such a string; MLflow refuses the strings.

    Anything else is left as sent, for the signature and the app's own check to refuse with a 400 that names
    the column (``38.9`` in a ``long`` column stays a 400). Columns the schema does not name are untouched.
    """
    import numpy as np
    import pandas as pd

    named = schema is not None and getattr(schema, "has_input_names", lambda: False)()
    if not isinstance(df, pd.DataFrame) or not named:
        return df
    out = None
    for spec in schema.inputs:
        name, kind = spec.name, str(getattr(spec, "type", ""))
        if name not in df.columns:
            continue
        col = df[name]
        new = None
        integers = pd.api.types.is_integer_dtype(col) and not pd.api.types.is_bool_dtype(col)
        if kind.endswith("double") and integers:
            if (col.abs() <= _MAX_EXACT).all():
                new = col.astype(np.float64)
        elif kind.endswith("long") and (col.dtype == object or pd.api.types.is_string_dtype(col)):
            values = col.tolist()
            ints = []
            for v in values:
                if isinstance(v, bool):
                    break
                if isinstance(v, int):
                    ints.append(v)
                elif isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d{1,16}\s*", v):
                    ints.append(int(v))
                else:
                    break
            else:
                if all(abs(v) <= _MAX_EXACT for v in ints):
                    new = pd.Series(ints, index=col.index, dtype=np.int64)
        if new is not None:
            out = df.copy() if out is None else out
            out[name] = new
    return df if out is None else out


class _ParseWithoutSchema:
    """The model as the scoring app sees it, minus the input schema at parse time.

    MLflow's scoring app casts the parsed JSON to the signature's types (38.9 in a ``long`` column becomes
    38, 1e308 becomes -2**63) before ``predict`` checks them. Without a schema at parse time the JSON keeps
    its own types and ``predict`` enforces the signature as it does in process: 38.9 for a ``long`` is a 400.
    Before that, :func:`widen_json_columns` makes the lossless conversions JSON forces (an integer in a
    ``double`` column, an integer string in a ``long`` column).
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self.metadata = _MetadataWithoutInputSchema(model.metadata)

    def predict(self, data: Any, params: dict | None = None) -> Any:
        data = widen_json_columns(data, self._model.metadata.get_input_schema())
        return self._model.predict(data, params=params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class _MetadataWithoutInputSchema:
    def __init__(self, metadata: Any) -> None:
        self._metadata = metadata

    def get_input_schema(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metadata, name)


def create_app() -> Any:
    """The ASGI app uvicorn runs (``--factory``): MLflow's scoring app for the model at
    ``$MOEKIT_SERVE_MODEL_PATH`` behind the Host check of the MLflow UI and the body limit
    ``$MOEKIT_SERVE_MAX_BODY_BYTES``."""
    from mlflow.pyfunc import scoring_server
    from mlflow.server.fastapi_security import HostValidationMiddleware, get_allowed_hosts

    model = scoring_server.load_model_with_mlflow_config(os.environ[ENV_MODEL_PATH])
    app = scoring_server.init(_ParseWithoutSchema(model))
    max_body = int(os.environ.get(ENV_MAX_BODY, DEFAULT_MAX_BODY_BYTES))
    return HostValidationMiddleware(RequestGuard(app, max_body_bytes=max_body), get_allowed_hosts())


def download_model(model_uri: str, tracking_uri: str | None = None) -> tuple[Path, Path]:
    """Copy the model's files (``models:/NAME/VERSION``, ``runs:/...`` or a path) into a new temp folder.

    Returns:
        (the new temp folder, which the caller removes; the model's folder, inside it or the folder itself).
    """
    import mlflow
    from mlflow.tracking.artifact_utils import _download_artifact_from_uri

    mlflow.set_tracking_uri(tracking_uri or default_tracking_uri())
    root = Path(tempfile.mkdtemp(prefix="moekit-serve-"))
    return root, Path(_download_artifact_from_uri(model_uri, output_path=str(root)))


def serve_command(*, host: str = "127.0.0.1", port: int = 5001, workers: int = 1) -> list[str]:
    """The uvicorn command line of the server (the model is named by :data:`ENV_MODEL_PATH`)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "pipelines.serve:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--no-access-log",
    ]


def start_server(
    model_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
    tracking_uri: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_file: str | os.PathLike | None = None,
) -> tuple[subprocess.Popen, str]:
    """Start the server in the background, in its own session; return (process, base URL).

    Stop it with :func:`stop_server` (the model's temp copy is removed then).
    """
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
    port = port or free_port(host)
    tmp_root, local = download_model(model_uri, tracking_uri)
    env = serve_env(tracking_uri)
    env[ENV_MODEL_PATH] = str(local)
    env[ENV_MAX_BODY] = str(max_body_bytes)
    repo = str(Path(__file__).resolve().parent.parent)  # `pipelines` importable by uvicorn from any cwd
    env["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        serve_command(host=host, port=port, workers=workers),
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc.moekit_tmp_root = tmp_root  # type: ignore[attr-defined] - removed by stop_server
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


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_server(proc: subprocess.Popen, *, timeout: float = 20.0) -> None:
    """SIGTERM the server's process group (uvicorn, its workers); SIGKILL what is left after ``timeout``."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    try:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    finally:
        # only the folder download_model made (the model's own folder may be that folder itself)
        root = getattr(proc, "moekit_tmp_root", None)
        if root is not None and Path(root).name.startswith("moekit-serve-"):
            shutil.rmtree(root, ignore_errors=True)


def supervise(proc: subprocess.Popen, *, banner: str | None = None) -> int:
    """Wait in the foreground for ``proc`` (a server started in its own session) until it exits or this
    process gets SIGTERM, SIGINT (Ctrl+C) or SIGHUP; then stop its whole process group (:func:`stop_server`).
    ``moekit serve`` and ``moekit ui`` both run their server through it.

    Args:
        proc: the server, started with ``start_new_session=True`` (its pid is its process group id).
        banner: a line printed (flushed) once the signal handlers are in place.

    Returns:
        The server's exit code, or ``128 + signal`` when a signal stopped it.
    """
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stopping.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        if banner:
            print(banner, flush=True)
        while not stopping and proc.poll() is None:
            time.sleep(0.2)
    finally:
        stop_server(proc)
        for s, h in old.items():
            signal.signal(s, h)
    if stopping:
        return 128 + stopping[0]
    return proc.returncode or 0


def serve_forever(
    model_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5001,
    workers: int = 1,
    tracking_uri: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> int:
    """Run the server in the foreground until it exits or this process gets SIGTERM/SIGINT/SIGHUP; then stop
    its whole process group (:func:`supervise`). Returns the exit code."""
    proc, url = start_server(
        model_uri, host=host, port=port, workers=workers, tracking_uri=tracking_uri,
        max_body_bytes=max_body_bytes, log_file=None,
    )  # fmt: skip
    return supervise(proc, banner=f"serving {model_uri} on {url}  (POST /invocations, GET /ping)")
