"""The ``moekit`` tool commands: ``tune``, ``register``, ``serve`` and ``ui``.

Each command is a typed function; jsonargparse's ``CLI`` makes its options from the signature and its help
from the docstring. The commands keep the spellings they have always accepted: dashed options (``--n-trials``;
jsonargparse's ``--n_trials`` works too), repeatable ``--config FILE`` and ``--set KEY=VALUE``, and, for
``register``, any further LightningCLI option (``--trainer.accelerator=cpu``) passed on to the app's config.
"""

from __future__ import annotations

import inspect
import json
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import CLI, ActionConfigFile, ArgumentParser

# historical option names -> the commands' parameter names
ALIASES = {"config": "configs", "set": "overrides"}


def tune(
    app: str,
    *,
    configs: list[str],
    n_trials: int,
    storage: str | None = None,
    study: str | None = None,
    timeout: float | None = None,
    out: str | None = None,
    overrides: list[str] | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    seed: int | None = None,
    enqueue: list[str] | None = None,
    pruner_startup_trials: int = 5,
    pruner_warmup_steps: int = 1,
    sampler_startup_trials: int = 10,
) -> None:
    """Optuna sweep of an app config (TPE, median pruning, RDB storage, MLflow nested runs).

    Args:
        app: the app (``recsys``, ``finance``, ``lm``).
        configs: base config YAML (``--config FILE``, repeatable).
        n_trials: the study's TOTAL number of finished (complete + pruned) trials over all runs and parallel
            workers, not a number to add: a rerun tops the study up to N (``--n-trials``).
        storage: Optuna RDB URL (default sqlite:///<repo>/runs/optuna/optuna.db: the moekit checkout's,
            whatever the current directory).
        study: study name (default <app>-<config stem>).
        timeout: stop starting trials after this many seconds.
        out: folder for trial checkpoints and best.yaml (default runs/tune/<study> under the current
            directory).
        overrides: fixed override for every trial (``--set trainer.max_epochs=3``, repeatable); stored in the
            study: a rerun with other values is refused (start a new study with ``--study NAME``).
        tracking_uri: MLflow store (``--tracking-uri``; default $MLFLOW_TRACKING_URI, else
            <repo>/mlflow/mlflow.db).
        experiment: MLflow experiment (default moekit-<app>-tune).
        seed: base of the per-trial TPE seeds (default: random in each process); with a seed a
            single-process sweep is reproducible; no worker or rerun repeats a configuration either way.
        enqueue: Optuna params (JSON) to run first in a new study, e.g. the base config's values:
            ``'{"lr": 0.003, "embed_dim": 8}'`` (repeatable).
        pruner_startup_trials: MedianPruner ``n_startup_trials``.
        pruner_warmup_steps: MedianPruner ``n_warmup_steps``.
        sampler_startup_trials: random trials before TPE starts modelling.
    """
    import optuna

    from pipelines.tune import run_study, summary_table

    # moekit prints a line per finished trial (pipelines.tune): Optuna's own INFO lines only on request
    optuna.logging.set_verbosity(logging.getLogger().getEffectiveLevel())
    result = run_study(
        app=app,
        configs=configs,
        n_trials=n_trials,
        storage=storage,
        study_name=study,
        timeout=timeout,
        overrides=parse_overrides(overrides or []),
        out_dir=out,
        tracking_uri=tracking_uri,
        experiment=experiment,
        seed=seed,
        pruner_startup_trials=pruner_startup_trials,
        pruner_warmup_steps=pruner_warmup_steps,
        sampler_startup_trials=sampler_startup_trials,
        enqueue=[json.loads(e) for e in enqueue or []],
    )
    print(summary_table(result))


def register_checkpoint(
    *,
    app: str,
    configs: Sequence[str],
    ckpt: str,
    name: str,
    tracking_uri: str | None = None,
    extra_args: Sequence[str] = (),
) -> str:
    """Rebuild a model from its config(s) and checkpoint, validate it, and register it; return the version.

    The checkpoint is first read by :func:`pipelines.checkpointing.load_checkpoint_file`
    (``weights_only=True``, moekit's stamp for ``app``): a file that names anything outside the allow-list,
    is not moekit's, or is another app's raises :class:`~pipelines.checkpointing.CheckpointError` before any
    model is restored.
    """
    from pipelines.checkpointing import load_checkpoint_file
    from pipelines.lightning_cli import MoekitCLI, checkpoint_extras
    from pipelines.registry import register_trained

    args = [a for c in configs for a in ("--config", str(c))]
    args += ["--trainer.enable_progress_bar=false", "--tracking.run_name=register", *extra_args]
    if tracking_uri:
        args.append(f"--tracking.uri={tracking_uri}")
    cli = MoekitCLI(app=app, args=args, run=False)  # imports the app: its checkpoint types are registered
    checkpoint = load_checkpoint_file(ckpt, app=app)
    hook = getattr(cli.datamodule, "load_fitted_state", None)
    if callable(hook):  # the registered preprocessing is the checkpoint's, not a refit on today's files
        hook(checkpoint_extras(checkpoint), source=f"checkpoint {ckpt}")
    del checkpoint
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, weights_only=True)
    return register_trained(
        app=app,
        model=cli.model,
        datamodule=cli.datamodule,
        trainer=cli.trainer,
        name=name,
        tracking_uri=tracking_uri,
    )


def register(
    app: str,
    *,
    configs: list[str],
    ckpt: str,
    name: str,
    tracking_uri: str | None = None,
    cli_args: list[str] | None = None,
) -> None:
    """Put a trained model (with its preprocessing) in the MLflow Model Registry.

    Args:
        app: the app (``recsys``, ``finance``, ``lm``).
        configs: the training config YAML (``--config FILE``, repeatable).
        ckpt: checkpoint file (e.g. runs/<app>/<config>/last.ckpt).
        name: registered model name.
        tracking_uri: MLflow store (``--tracking-uri``; default $MLFLOW_TRACKING_URI, else
            <repo>/mlflow/mlflow.db).
        cli_args: further options for the app's config, e.g. ``--trainer.accelerator=cpu`` (any option this
            command does not know is collected here).
    """
    version = register_checkpoint(
        app=app, configs=configs, ckpt=ckpt, name=name, tracking_uri=tracking_uri, extra_args=cli_args or []
    )
    print(f"registered models:/{name}/{version}")
    print(f"serve it:  moekit serve models:/{name}/{version} --port 5001")


def serve(
    model_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5001,
    workers: int = 1,
    tracking_uri: str | None = None,
    max_body_bytes: int = 8 * 1024 * 1024,
) -> None:
    """Serve a registered model over HTTP (MLflow's scoring server under uvicorn, 127.0.0.1 by default).

    Stops its whole process tree on SIGTERM/SIGINT/SIGHUP. Bodies over ``max_body_bytes`` get 413; a ``Host``
    header that is not loopback/private (or in $MLFLOW_SERVER_ALLOWED_HOSTS) gets 403, as in the MLflow UI.

    Args:
        model_uri: ``models:/NAME/VERSION`` (or ``runs:/RUN_ID/model``).
        host: interface to bind.
        port: port.
        workers: server workers.
        tracking_uri: MLflow store (``--tracking-uri``; default $MLFLOW_TRACKING_URI, else
            <repo>/mlflow/mlflow.db).
        max_body_bytes: largest request body accepted (``--max-body-bytes``); larger ones are answered 413.
    """
    from pipelines.serve import serve_forever

    raise SystemExit(
        serve_forever(
            model_uri,
            host=host,
            port=port,
            workers=workers,
            tracking_uri=tracking_uri,
            max_body_bytes=max_body_bytes,
        )
    )


def ui(*, port: int = 5000, tracking_uri: str | None = None) -> None:
    """Start the MLflow UI on the moekit tracking store (127.0.0.1).

    Stops its whole process tree (``mlflow ui``, uvicorn, workers) on SIGTERM/SIGINT/SIGHUP, as ``serve``
    does.

    Args:
        port: port.
        tracking_uri: MLflow store (``--tracking-uri``; default $MLFLOW_TRACKING_URI, else
            <repo>/mlflow/mlflow.db).
    """
    from pipelines.serve import serve_env, supervise
    from pipelines.tracking import DEFAULT_STORE_DIR, default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if uri == f"sqlite:///{DEFAULT_STORE_DIR / 'mlflow.db'}":
        cmd += ["--default-artifact-root", (DEFAULT_STORE_DIR / "artifacts").as_uri()]
    # its own session, stopped as a group on SIGTERM/SIGINT/SIGHUP: `mlflow ui` runs uvicorn and its workers
    proc = subprocess.Popen(cmd, env=serve_env(uri), start_new_session=True)
    raise SystemExit(supervise(proc, banner=f"MLflow UI on http://127.0.0.1:{port}  ({uri})"))


TOOLS: dict[str, tuple[Callable[..., None], str]] = {
    "tune": (tune, "Optuna sweep of an app config (TPE, median pruning, RDB storage, MLflow nested runs)"),
    "register": (register, "put a trained model (with preprocessing) in the MLflow Model Registry"),
    "serve": (serve, "serve a registered model over HTTP on 127.0.0.1 (mlflow models serve)"),
    "ui": (ui, "start the MLflow UI on the moekit tracking store"),
}
PASS_THROUGH = {"register": "cli_args"}


class ToolParser(ArgumentParser):
    """jsonargparse's parser minus its own ``--config FILE`` option: ``--config`` names the app's YAML."""

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:
        if args == ("--config",) and kwargs.get("action") is ActionConfigFile:
            return None
        return super().add_argument(*args, **kwargs)


def run_tool(tool: str, argv: Sequence[str] | None) -> None:
    """Run ``moekit <tool> ARGS``: the tool's function through jsonargparse ``CLI``."""
    fn = TOOLS[tool][0]
    args = legacy_spelling(list(sys.argv[1:] if argv is None else argv), fn, PASS_THROUGH.get(tool))
    CLI(fn, args=args, as_positional=True, prog=f"moekit {tool}", parser_class=ToolParser)


def legacy_spelling(
    argv: Sequence[str], fn: Callable[..., Any], pass_through: str | None = None
) -> list[str]:
    """Rewrite the historical option spellings of ``fn``'s command into jsonargparse's.

    ``--n-trials 3`` -> ``--n_trials 3``; ``--config A --config B`` -> ``--configs+ A --configs+ B`` (list
    options append, like argparse's ``action="append"``); names in :data:`ALIASES` are mapped to the
    parameter. With ``pass_through``, an unknown dotted option (``--trainer.max_epochs=3`` or
    ``--trainer.max_epochs 3``) is appended to that list parameter as one ``--key=value`` string. Values are
    passed on verbatim.
    """
    params = inspect.signature(fn).parameters
    lists = {n for n, p in params.items() if "list[" in str(p.annotation)}
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if (
            not tok.startswith("--")
            or tok in ("--help", "--print_config")
            or tok.startswith("--print_config=")
        ):
            out.append(tok)
            continue
        name, eq, value = tok[2:].partition("=")
        plus = name.endswith("+")
        key = name.rstrip("+").replace("-", "_")
        key = ALIASES.get(key, key)
        if key in params:
            out.append(f"--{key}{'+' if key in lists or plus else ''}{eq}{value}")
            if not eq and i < len(argv):  # the option's value, verbatim
                out.append(argv[i])
                i += 1
        elif pass_through and "." in name:
            if not eq and i < len(argv) and not argv[i].startswith("--"):
                value, eq, i = argv[i], "=", i + 1
            out.append(f"--{pass_through}+=--{name}{eq}{value}")
        else:
            out.append(tok)
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["trainer.max_epochs=3"]`` -> ``{"trainer.max_epochs": 3}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.lstrip("-")] = yaml.safe_load(v)
    return out
