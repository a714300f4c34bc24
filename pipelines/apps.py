"""The app contract and the one table of apps that the CLI, tuner, registry and tracking read.

Each app keeps everything the pipelines need about it in one module beside its code, ``apps/<app>/app.py``,
which defines an object ``APP`` satisfying :class:`MoekitApp`. Apps never import ``pipelines``; this module
names them only by import path (:data:`APPS`), resolved lazily, so ``moekit --help`` stays cheap.

Adding an app: write ``apps/<app>/`` (data, model, task, configs, ``app.py``) and add one line to
:data:`APPS`. Apps outside the repository (the pipelines tests' toy app) are added through the environment
variable :data:`APPS_ENV`: ``MOEKIT_APPS="toy=toy_app,other=pkg.other_app"`` (``name=module`` pairs; the
module must be importable, also by the ``mlflow models serve`` process that unpickles its predictors).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import lightning as L
    import optuna
    import pandas as pd

APPS: dict[str, str] = {
    "recsys": "apps.recsys.app",
    "finance": "apps.finance.app",
    "lm": "apps.lm.app",
}
"""App name -> module defining ``APP``. The only place the pipelines name an app."""

APPS_ENV = "MOEKIT_APPS"


@runtime_checkable
class Predictor(Protocol):
    """What the registry stores: raw inputs in, predictions out (picklable, CPU, eval mode).

    ``predict`` raises ``ValueError`` naming the problem for bad input (missing column, wrong type...); the
    registered pyfunc turns that into HTTP 400.
    """

    def predict(self, df: pd.DataFrame, **params: Any) -> pd.DataFrame: ...


@runtime_checkable
class MoekitApp(Protocol):
    """Everything the pipelines know about one app.

    Attributes:
        name: the app's name (``moekit <name> fit ...``; MLflow experiment ``moekit-<name>``).
        monitor: validation metric the tuner optimises and prunes on (e.g. ``val/auc_mean``).
        direction: ``maximize`` or ``minimize`` for ``monitor``.
        commands: extra commands, ``{"backtest": "apps.finance.backtest:main"}``; each target is a function
            ``f(argv: list[str] | None) -> None``, imported only when its command runs.
        predict_params: inference parameters (name -> default) of the registered model's signature, or None.
    """

    name: str
    monitor: str
    direction: Literal["maximize", "minimize"]
    commands: Mapping[str, str]
    predict_params: Mapping[str, Any] | None

    def search_space(self, trial: optuna.Trial) -> dict[str, Any]:
        """One sampled configuration as dotted config overrides, ``{"model.init_args.lr": 0.003}``."""
        ...

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming the new form when ``config`` (the merged YAML and overrides, as
        nested dicts, before parsing) uses a key or value the app has renamed; else do nothing."""
        ...

    def build_predictor(self, module: L.LightningModule, datamodule: L.LightningDataModule) -> Predictor:
        """A predictor from a trained module and its set-up datamodule, applying the datamodule's own fitted
        transform to raw inputs."""
        ...

    def input_example(self, datamodule: L.LightningDataModule) -> pd.DataFrame:
        """A few raw input rows (the registered model's signature and input example)."""
        ...

    def save_preprocessing(self, datamodule: L.LightningDataModule, out_dir: Path) -> list[Path]:
        """Write the datamodule's fitted preprocessing under ``out_dir``; return the files written."""
        ...

    def test_artifacts(
        self, module: L.LightningModule, datamodule: L.LightningDataModule, out_dir: Path
    ) -> list[Path]:
        """App-specific files (plots, tables) logged at the end of ``test``; may be empty."""
        ...


def app_table() -> dict[str, str]:
    """:data:`APPS` plus the ``name=module`` entries of ``$MOEKIT_APPS`` (which may not replace an app)."""
    table = dict(APPS)
    for item in filter(None, (s.strip() for s in os.environ.get(APPS_ENV, "").split(","))):
        name, sep, module = item.partition("=")
        if not sep or not name.strip() or not module.strip():
            raise ValueError(f"${APPS_ENV}: expected name=module entries separated by commas, got {item!r}")
        if name.strip() in APPS:
            raise ValueError(f"${APPS_ENV}: {name.strip()!r} is a built-in app; choose another name")
        table[name.strip()] = module.strip()
    return table


def app_names() -> list[str]:
    """Known app names: the built-in ones first, then those of ``$MOEKIT_APPS``."""
    return list(app_table())


def get_app(name: str) -> MoekitApp:
    """The ``APP`` object of app ``name`` (imports its module); ValueError naming the known apps."""
    table = app_table()
    if name not in table:
        raise ValueError(f"unknown app {name!r}; known apps: {sorted(table)}")
    app = getattr(importlib.import_module(table[name]), "APP", None)
    if not isinstance(app, MoekitApp):
        raise TypeError(f"{table[name]}.APP must satisfy pipelines.apps.MoekitApp, got {type(app).__name__}")
    if app.name != name:
        raise ValueError(f"{table[name]}.APP.name is {app.name!r}, but the table names it {name!r}")
    return app


def app_commands(name: str) -> dict[str, str]:
    """App ``name``'s extra commands, ``{command: "package.module:function"}``, for ``moekit --help``, without
    importing its module.

    Read from a literal top-level ``COMMANDS = {...}`` in the module's source when it has one (the built-in
    apps do, so the listing imports no torch or lightning); else from the imported ``APP.commands``.
    """
    module = app_table().get(name)
    if module is None:
        raise ValueError(f"unknown app {name!r}; known apps: {sorted(app_table())}")
    if module not in sys.modules:
        for node in _module_ast(module).body:
            target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
            if isinstance(node, ast.AnnAssign):
                target = node.target
            if isinstance(target, ast.Name) and target.id == "COMMANDS" and node.value is not None:
                try:
                    return dict(ast.literal_eval(node.value))
                except (ValueError, TypeError):
                    break
    return dict(get_app(name).commands)


def _module_ast(module: str) -> ast.Module:
    """The parsed source of ``module`` (found, not imported; parent packages' ``__init__`` do run), or an
    empty module when it cannot be read."""
    try:
        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_text() if spec and spec.origin else ""
        return ast.parse(source)
    except (ImportError, OSError, ValueError, SyntaxError):
        return ast.Module(body=[], type_ignores=[])


def command_summary(target: str) -> str:
    """What a command target ``"package.module:function"`` does: the first sentence of its docstring, read
    from the source without importing it, less a leading ````moekit ...``:`` (a docstring that only says
    ``:func:`other` as a command`` gives ``other``'s sentence); "" when there is none."""
    module, _, func = target.partition(":")
    docs = {
        n.name: ast.get_docstring(n) or ""
        for n in _module_ast(module).body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    text = " ".join(docs.get(func, "").split())
    text = re.sub(r"^``[^`]*``( \(or ``[^`]*``\))?:\s*", "", text)
    ref = re.fullmatch(r":func:`(\w+)` as a command\.?", text)
    if ref and ref[1] in docs:
        text = " ".join(docs[ref[1]].split())
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return sentence.rstrip(".")


def load_command(target: str) -> Callable[[Sequence[str] | None], None]:
    """Import a command target ``"package.module:function"``."""
    module, sep, func = target.partition(":")
    if not sep:
        raise ValueError(f"command target {target!r}: expected 'module:function'")
    return getattr(importlib.import_module(module), func)
