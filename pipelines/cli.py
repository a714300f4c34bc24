"""The ``moekit`` command line.

::

    moekit <app> {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]
    moekit <app> <command> ...      the app's own commands (MoekitApp.commands), e.g.
                                    moekit lm {generate,merge,quantize} ..., moekit finance backtest ...
    moekit tune <app> --config CONFIG.yaml --n-trials N [--storage URL] [--study NAME] [--timeout S]
    moekit register <app> --config CONFIG.yaml --ckpt PATH --name NAME
    moekit serve models:/NAME/VERSION [--port P]
    moekit ui

The apps are those of the table in :mod:`pipelines.apps`; ``moekit <app> fit ...`` is :class:`MoekitCLI`
(:mod:`pipelines.lightning_cli`); the tools are typed functions run by jsonargparse
(:mod:`pipelines.commands`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from moe_core.runtime import tune_cpu_allocator
from pipelines.apps import app_names, get_app, load_command
from pipelines.checkpointing import CheckpointError
from pipelines.commands import TOOLS, run_tool
from pipelines.lightning_cli import ConfigError, MoekitCLI

__all__ = ["MoekitCLI", "main"]

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _usage() -> str:
    lines = [
        "usage: moekit <app> {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]",
        "       moekit <app> <command> ...",
        "       moekit <tool> ...",
        "",
        "apps:",
    ]
    for name in app_names():
        cmds = ",".join([*TRAINER_COMMANDS, *get_app(name).commands])
        lines.append(f"  {name:<9} {{{cmds}}}")
    lines += ["", "tools:"]
    lines += [f"  {k:<9} {v[1]}" for k, v in TOOLS.items()]
    lines += [
        "",
        "Help: `moekit <app> fit --help`; documented arguments of a class: "
        "`moekit <app> fit --model.help CLASS`; `moekit <tool> --help`.",
        "Tracking: MLflow, $MLFLOW_TRACKING_URI or sqlite <repo>/mlflow/mlflow.db; `moekit ui` opens it.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``moekit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tune_cpu_allocator()  # large MoE temporaries reuse heap memory (MOEKIT_MALLOC_TUNING=0 opts out)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    head, rest = argv[0], argv[1:]
    if head in TOOLS:
        run_tool(head, rest)
        return
    if head not in app_names():
        raise SystemExit(f"moekit: unknown app or tool {head!r}\n\n{_usage()}")
    commands = get_app(head).commands
    if rest and rest[0] in commands:
        target = commands[rest[0]]
        try:
            command = load_command(target)
        except (ModuleNotFoundError, AttributeError) as e:
            raise SystemExit(f"moekit {head} {rest[0]}: {target} is not available ({e})") from e
        command(rest[1:])
        return
    try:
        MoekitCLI(app=head, args=rest)
    except (ConfigError, CheckpointError) as e:
        raise SystemExit(f"moekit {head}: {e}") from e


if __name__ == "__main__":
    main()
