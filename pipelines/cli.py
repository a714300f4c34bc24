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

``moekit --help`` imports neither torch nor lightning (the app table gives the command names from a literal
in each app's module), so it answers in a fraction of a second. Errors the user can fix (a missing config
file, a renamed key, a missing data column, an unreadable checkpoint) end in one ``error: ...`` line on stderr
and exit status 2; ``--debug`` (anywhere on the line) or ``MOEKIT_DEBUG=1`` shows the traceback instead.
Logging is at WARNING unless ``--debug`` or ``MOEKIT_LOG_LEVEL`` (e.g. ``INFO``) says otherwise.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_core.runtime import tune_cpu_allocator
from pipelines.apps import app_commands, app_names, command_summary, get_app, load_command

if TYPE_CHECKING:
    from pipelines.lightning_cli import MoekitCLI

__all__ = ["MoekitCLI", "main"]

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
DEBUG_ENV = "MOEKIT_DEBUG"
"""``MOEKIT_DEBUG=1``: tracebacks instead of one ``error:`` line (as ``--debug``)."""
LOG_LEVEL_ENV = "MOEKIT_LOG_LEVEL"
EXIT_USAGE = 2


def __getattr__(name: str) -> Any:
    # ``from pipelines.cli import MoekitCLI`` still works; ``import pipelines.cli`` imports no lightning
    if name == "MoekitCLI":
        from pipelines.lightning_cli import MoekitCLI

        return MoekitCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tools() -> dict[str, tuple[Any, str]]:
    from pipelines.commands import TOOLS

    return TOOLS


def _usage() -> str:
    lines = [
        "usage: moekit <app> {fit,validate,test,predict} --config CONFIG.yaml [--key value ...]",
        "       moekit <app> <command> ...",
        "       moekit <tool> ...",
        "",
        "apps:",
    ]
    for name in app_names():
        cmds = ",".join([*TRAINER_COMMANDS, *app_commands(name)])
        lines.append(f"  {name:<9} {{{cmds}}}")
    lines += ["", "tools:"]
    lines += [f"  {k:<9} {v[1]}" for k, v in _tools().items()]
    lines += [
        "",
        "Help: `moekit <app> --help`, `moekit <app> fit --help`; documented arguments of a class: "
        "`moekit <app> fit --model.help CLASS`; `moekit <tool> --help`.",
        "Tracking: MLflow, $MLFLOW_TRACKING_URI or sqlite <repo>/mlflow/mlflow.db; `moekit ui` opens it.",
        f"Errors: one `error:` line; `--debug` or {DEBUG_ENV}=1 shows the traceback. "
        f"Log level: ${LOG_LEVEL_ENV} (default WARNING).",
    ]
    return "\n".join(lines)


def _app_usage(app: str) -> str:
    extra = app_commands(app)
    lines = [
        f"usage: moekit {app} {{{','.join([*TRAINER_COMMANDS, *extra])}}} ...",
        "",
        "commands:",
        *(
            f"  {c:<9} Lightning {c} from a config: moekit {app} {c} --config CONFIG.yaml"
            for c in TRAINER_COMMANDS
        ),
        *(f"  {c:<9} {command_summary(t) or f'the {app} app command {c}'} (moekit {app} {c} --help)"
          for c, t in extra.items()),
        "",
        f"Options of a trainer command: `moekit {app} fit --help`.",
    ]
    return "\n".join(lines)


# Third-party loggers that talk at INFO by default (Lightning's "GPU available", "💡 Tip: ... litlogger",
# MLflow's "Creating initial MLflow database tables"): moekit's own level applies to them too.
THIRD_PARTY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "mlflow", "alembic")
# Warnings the user cannot act on, each for a choice moekit owns: Lightning's own use of a deprecated torch
# pytree API; the log_every_n_steps hint (moekit logs epoch metrics, short epochs are fine); Lightning's
# IterableDataset length hint (the LM data streams define __len__ on purpose, as batches per epoch).
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",
    r"The number of training batches .* is smaller than the logging interval",
    r"Your `IterableDataset` has `__len__` defined",
)


PROGRESS_LOGGER = "moekit.progress"
"""Stage lines of long steps outside the training loop (feature computation, tokenisation), shown as plain
lines on stderr at the default level; ``MOEKIT_LOG_LEVEL=WARNING`` or higher hides them too."""


def _quiet_output(level: int | str) -> None:
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # MLflow sets its loggers' level when it is imported (later, lazily): tell it moekit's level, and keep its
    # artifact-download progress bars (one per registered-model load) out of the output; a user's own
    # settings of these variables win
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(_level(level)))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    _third_party_levels()
    progress = logging.getLogger(PROGRESS_LOGGER)
    explicit = os.environ.get(LOG_LEVEL_ENV)
    progress.setLevel(
        logging.getLevelName(explicit.upper()) if explicit else min(logging.INFO, _level(level))
    )
    if not progress.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        progress.addHandler(handler)
    progress.propagate = False


def configure_output(*, debug: bool = False) -> None:
    """What ``moekit`` does to its output, for other moekit programs (``python -m pipelines.demo``): logging
    at WARNING (``$MOEKIT_LOG_LEVEL``; DEBUG with ``debug``), third-party INFO chatter and the warnings of
    :data:`QUIET_WARNINGS` off, progress lines on. Call it at start and again after importing lightning."""
    _quiet_output(logging.DEBUG if debug else os.environ.get(LOG_LEVEL_ENV, "WARNING").upper())


def _level(level: int | str) -> int:
    return level if isinstance(level, int) else logging.getLevelName(level)


def _third_party_levels() -> None:
    """Give the third-party loggers moekit's level and put moekit's warning filters first; again after
    importing lightning and mlflow (they set their loggers' levels and add warning filters on import)."""
    level = logging.getLogger().level
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _config_files(args: Sequence[str]) -> list[str]:
    out = []
    for i, tok in enumerate(args):
        if tok == "--config" and i + 1 < len(args):
            out.append(args[i + 1])
        elif tok.startswith("--config="):
            out.append(tok.partition("=")[2])
    return out


def _check_config_files(app: str, args: Sequence[str]) -> None:
    for f in _config_files(args):
        if not Path(f).is_file():
            shipped = Path(__file__).resolve().parent.parent / "apps" / app / "configs"
            hint = f"; shipped configs: {shipped}" if shipped.is_dir() else ""
            raise FileNotFoundError(f"--config {f}: no such file (relative to {Path.cwd()}){hint}")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "fix your command, config or data", not "moekit has a bug"."""
    from mlflow.exceptions import MlflowException  # a run, model or store that is not there

    from pipelines.checkpointing import CheckpointError
    from pipelines.lightning_cli import ConfigError

    return (ConfigError, CheckpointError, FileNotFoundError, ValueError, MlflowException)


def _run_app(head: str, rest: list[str]) -> None:
    _check_config_files(head, rest)
    # MLflow configures its loggers from this variable (on import and again when it opens a store)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(logging.getLogger().level))
    from pipelines.lightning_cli import MoekitCLI

    _third_party_levels()
    MoekitCLI(app=head, args=rest)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``moekit`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    _quiet_output(logging.DEBUG if debug else os.environ.get(LOG_LEVEL_ENV, "WARNING").upper())
    tune_cpu_allocator()  # large MoE temporaries reuse heap memory (MOEKIT_MALLOC_TUNING=0 opts out)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    head, rest = argv[0], argv[1:]
    try:
        if head not in app_names() and head not in _tools():
            raise _UsageError(
                f"unknown app or tool {head!r}; apps: {', '.join(app_names())}; tools: {', '.join(_tools())} "
                "(moekit --help)"
            )
        _dispatch(head, rest)
    except _UsageError as e:
        _fail(str(e), e, debug, hint=False)
    except Exception as e:
        if debug or not isinstance(e, _user_errors()):
            raise
        where = f"moekit {head}{' ' + rest[0] if rest and not rest[0].startswith('-') else ''}"
        _fail(f"{where}: {_error_text(e)}", e, debug)


class _UsageError(Exception):
    pass


def _error_text(exc: BaseException) -> str:
    """The exception's message, saying "file not found" where it names only the missing file (pyarrow raises
    ``FileNotFoundError(path)``)."""
    text = str(exc)
    if isinstance(exc, FileNotFoundError):
        said = text.lower()
        if "not found" not in said and "no such file" not in said:
            path = os.fsdecode(exc.filename) if exc.filename is not None else text
            return f"file not found: {path}" + ("" if path == text or not text else f" ({text})")
    return text


def _fail(message: str, exc: BaseException, debug: bool, *, hint: bool = True) -> None:
    if debug:
        raise exc
    tail = f"  (--debug or {DEBUG_ENV}=1 for the traceback)" if hint else ""
    print(f"error: {message}{tail}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE)


def _dispatch(head: str, rest: list[str]) -> None:
    if head in _tools():
        if head in ("tune", "register"):  # MLflow's INFO lines at moekit's level (serve and ui keep theirs)
            os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(logging.getLogger().level))
            # as for fit (_run_app): lightning sets its loggers to INFO when imported ("Seed set to 0", "GPU
            # available", the litlogger tip); import it first, so that moekit's level below overrides that
            import lightning  # noqa: F401
        from pipelines.commands import run_tool

        _third_party_levels()
        run_tool(head, rest)
        return
    if not rest or rest[0] in ("-h", "--help", "help"):
        print(_app_usage(head))
        return
    if rest[0] in app_commands(head):
        target = get_app(head).commands[rest[0]]
        try:
            command = load_command(target)
        except (ModuleNotFoundError, AttributeError) as e:
            raise _UsageError(f"moekit {head} {rest[0]}: {target} is not available ({e})") from e
        command(rest[1:])
        return
    _run_app(head, rest)


if __name__ == "__main__":
    main()
