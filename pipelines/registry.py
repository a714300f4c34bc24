"""The MLflow Model Registry side of moekit: a trained model goes in as a pyfunc that includes its
preprocessing (raw inputs in, predictions out), with a signature and an input example.

* recsys: raw feature columns -> one probability column per task;
* finance: a panel window -> a score per ticker;
* lm: a prompt -> generated text.

The pyfunc is :mod:`pipelines.pyfunc_model` logged as "model from code"; its ``predictor`` artifact is built
by the app (``MoekitApp.build_predictor``, :mod:`pipelines.apps`) and stored as tensors (safetensors) plus
JSON by :mod:`pipelines.portable`, never as a pickle.

A registered model works outside this repository: the source of every local package the predictor needs (the
modules of the classes and functions its JSON names and, transitively, what those import at module level:
``apps``, ``moe_core``, an out-of-tree app module, and ``pipelines`` for the reader) travels in the model as
``code_paths``, and its pip requirements are the packages that
code imports (torch, lightning, pandas, numpy, mlflow, ...), pinned to the installed versions without local
suffixes (``torch==2.13.0``, never ``2.13.0+cpu``), so they install from a public index. moekit itself is
never a requirement.

The model is logged into its *source run*, the training run that wrote the checkpoint (its id travels in the
checkpoint, :data:`pipelines.tracking.RUN_ID_KEY`), so the model version links to it; no separate run is made.
``moekit <app> fit --tracking.register_as NAME`` registers into the fit's run; ``moekit register``
(:mod:`pipelines.commands`) rebuilds a model from its config and a checkpoint, validates it, and registers it
into the checkpoint's run. The version gets a description (app, source run, checkpoint, commit), tags
(``moekit.app``, ``moekit.source_run_id``, ``moekit.checkpoint``, the git commit) and the source run's test
metrics (``test/...`` as version tags and as metrics of the logged model).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import logging
import shutil
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd

from pipelines import portable
from pipelines.apps import Predictor, get_app
from pipelines.tracking import (
    RUN_ID_KEY,
    checkpoint_run_id,
    default_tracking_uri,
    ensure_experiment,
    git_commit,
    mlflow_loggers,
)

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).resolve().parent / "pyfunc_model.py"
BASE_REQUIREMENTS = ("mlflow", "torch", "pandas", "numpy", "safetensors")
"""Distributions every registered model needs (the pyfunc file imports mlflow, torch and pandas; the
predictor is read back with safetensors)."""

__all__ = ["RUN_ID_KEY", "bundle_code", "log_predictor", "register_trained", "requirements_for"]


# -- the code a predictor needs ------------------------------------------------------------------------------
def _installed_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    return [Path(p).resolve() for p in roots]


def _is_local(top: str, installed: list[Path]) -> Path | None:
    """The source folder (package) or file (module) of top-level module ``top`` when it is not part of the
    interpreter or installed into site-packages (repository code, an editable install, ``sys.path`` entries);
    else None."""
    if top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return None
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return None
    origin = Path(spec.origin).resolve()
    if any(origin.is_relative_to(root) for root in installed):
        return None
    return origin.parent if spec.submodule_search_locations else origin


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _load_time_imports(source: str, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules a module imports when it is loaded: statements at module level (also
    inside ``if``/``try``), not inside functions, not under ``if TYPE_CHECKING``."""
    out: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(stmts: Iterable[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1] if node.level > 1 else base
                    prefix = ".".join(base)
                    mod = f"{prefix}.{node.module}" if node.module else prefix
                else:
                    mod = node.module or ""
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
            elif isinstance(node, ast.If):
                test = node.test
                name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
                if name != "TYPE_CHECKING":
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    visit(block)

    visit(ast.parse(source).body)
    return {m for m in out if m}


def code_closure(modules: Iterable[str]) -> tuple[set[str], set[str]]:
    """Follow load-time imports from ``modules``.

    Returns:
        (local top-level module names to bundle, third-party top-level module names they import).
    """
    installed = _installed_roots()
    local_tops: set[str] = set()
    third_party: set[str] = set()
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "__main__":
            continue
        if _is_local(top, installed) is None:
            third_party.add(top)
            continue
        local_tops.add(top)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages' __init__
        file = _module_file(name)
        if file is None:
            continue
        todo.extend(_load_time_imports(file.read_text(), name, file.name == "__init__.py"))
    return local_tops, third_party


def bundle_code(modules: Iterable[str], out_dir: Path) -> tuple[list[str], list[str]]:
    """Copy the local code ``modules`` need (whole top-level packages, ``.py`` files only) under ``out_dir``.

    Returns:
        (``code_paths`` for ``mlflow.pyfunc.log_model``, pip requirements).
    """
    installed = _installed_roots()
    local_tops, third_party = code_closure(modules)
    out_dir.mkdir(parents=True, exist_ok=True)
    code_paths = []
    for top in sorted(local_tops):
        src = _is_local(top, installed)
        assert src is not None
        dst = out_dir / src.name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=_only_python)
        else:
            shutil.copy2(src, dst)
        code_paths.append(str(dst))
    return code_paths, requirements_for(third_party)


def _only_python(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if not (n.endswith(".py") or (Path(folder) / n).is_dir()) or n == "__pycache__"]


def requirements_for(top_level_modules: Iterable[str]) -> list[str]:
    """Pinned requirements (``name==public version``, no local suffix such as ``+cpu``) of the distributions
    providing ``top_level_modules``, plus :data:`BASE_REQUIREMENTS`; moekit itself is left out."""
    from packaging.version import Version

    dists = md.packages_distributions()
    names = set(BASE_REQUIREMENTS)
    for top in top_level_modules:
        names.update(dists.get(top, []))
    reqs = []
    for name in sorted(names, key=str.lower):
        if name.lower() == "moekit":
            continue
        try:
            reqs.append(f"{name}=={Version(md.version(name)).public}")
        except md.PackageNotFoundError:
            log.warning("no installed distribution %s: left out of the model's requirements", name)
    return reqs


# -- logging and registering ---------------------------------------------------------------------------------
def log_predictor(
    *,
    app: str,
    predictor: Predictor,
    example: pd.DataFrame,
    name: str | None,
    run_id: str | None,
    tracking_uri: str,
    experiment: str | None = None,
    params: Mapping[str, Any] | None = None,
    description: str | None = None,
    tags: Mapping[str, str] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> tuple[str, str | None]:
    """Log a predictor as a pyfunc model into run ``run_id`` (optionally registered as ``name``).

    Args:
        params: name -> default; the signature's inference params (lm generation options).
        run_id: the source run; None creates a run ``register-<name>`` (a checkpoint from before run ids were
            stored in checkpoints).
        description: the model version's description.
        tags: the model version's tags.
        metrics: logged to the model (``LoggedModel``) and set as version tags.

    Returns:
        (model URI, registered version or None).
    """
    import mlflow
    from mlflow.models import infer_signature

    output = predictor.predict(example.copy())
    with warnings.catch_warnings():
        # MLflow's hint that integer columns cannot hold missing values: moekit's request check answers a
        # missing or fractional value in an integer column with a 400 naming the column, so the hint (with its
        # raw colour codes) is nothing a user can act on
        warnings.filterwarnings("ignore", message=".*[Ii]nferred schema contains integer column")
        signature = infer_signature(example, output, params=dict(params) if params else None)
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    if run_id is None:
        exp_id = ensure_experiment(experiment or f"moekit-{app}", tracking_uri)
        run = client.create_run(
            exp_id, run_name=f"register-{name or app}", tags={"moekit.app": app, "moekit.command": "register"}
        )
        run_id = run.info.run_id
    status = client.get_run(run_id).info.status
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "predictor"
        _, _, modules = portable.save_portable(predictor, folder)
        # the pyfunc rebuilds the predictor with pipelines.portable: it travels with the code it names
        code_paths, requirements = bundle_code({*modules, portable.__name__}, Path(tmp) / "code")
        packages = sorted({m.split(".")[0] for m in modules} - {"torch", "math", "builtins"})
        # start_run(run_id=...) reopens the run and ends it FINISHED: give it back the status it had
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_FILE),
                artifacts={"predictor": str(folder)},
                model_config={"packages": packages},
                code_paths=code_paths,
                signature=signature,
                input_example=example,
                pip_requirements=requirements,
            )
            if metrics:
                try:
                    mlflow.log_metrics(dict(metrics), model_id=info.model_id)
                except Exception as e:  # noqa: BLE001 - the version tags below carry them too
                    log.warning("could not log metrics to the logged model: %s", e)
        if status != "FINISHED":
            client.update_run(run_id, status=status)
    version = None
    if name is not None:
        all_tags = {**(tags or {}), **{k: f"{v:.6g}" for k, v in (metrics or {}).items()}}
        mv = mlflow.register_model(info.model_uri, name, tags=all_tags)
        if description:
            client.update_model_version(name, mv.version, description=description)
        version = str(mv.version)
    return info.model_uri, version


def source_run_id(trainer: L.Trainer | None) -> str | None:
    """The run a model comes from: the one named by the checkpoint the trainer last loaded (``moekit
    register``), else the trainer's MLflow run (registering at the end of ``fit``)."""
    if trainer is None:
        return None
    from_ckpt = checkpoint_run_id(trainer.ckpt_path) if trainer.ckpt_path else None
    if from_ckpt:
        return from_ckpt
    loggers = mlflow_loggers(trainer)
    return loggers[0].run_id if loggers else None


def _drop_validation_run(trainer: L.Trainer, source: str) -> None:
    """``moekit register`` reloads the checkpoint under a CLI whose logger opens a run just to validate; once
    the model is in its source run, that run (a ``python`` command run with only a ``validate`` stage) is
    deleted: the registry links to the source run only."""
    for lg in mlflow_loggers(trainer):
        if not lg._initialized or lg.run_id == source:
            continue
        run = lg.experiment.get_run(lg.run_id)
        t = run.data.tags
        if t.get("moekit.command") == "python" and t.get("moekit.stage") == "validate":
            lg.experiment.set_terminated(lg.run_id, "FINISHED")
            lg.experiment.delete_run(lg.run_id)


def _find_run(client: Any, run_id: str) -> Any | None:
    """The run ``run_id`` of ``client``'s store, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def register_trained(
    *,
    app: str,
    model: L.LightningModule,
    datamodule: L.LightningDataModule,
    trainer: L.Trainer | None,
    name: str,
    tracking_uri: str | None = None,
) -> str:
    """Register an in-memory trained model (and its datamodule's fitted preprocessing) into its source run
    (:func:`source_run_id`); return the version."""
    import mlflow

    contract = get_app(app)
    predictor = contract.build_predictor(model, datamodule)
    example = contract.input_example(datamodule)
    loggers = mlflow_loggers(trainer) if trainer is not None else []
    uri = tracking_uri or (loggers[0]._tracking_uri if loggers else None) or default_tracking_uri()
    run_id = source_run_id(trainer)
    ckpt = str(Path(trainer.ckpt_path).resolve()) if trainer is not None and trainer.ckpt_path else None
    metrics: dict[str, float] = {}
    tags = {"moekit.app": app}
    run = _find_run(mlflow.MlflowClient(uri), run_id) if run_id is not None else None
    if run_id is not None and run is None:
        # a checkpoint from another store (another machine, a copied run folder), as `moekit <app> test`
        # handles it: the model goes into a new run of this store, the one that validated it if it is here
        new = [lg.run_id for lg in loggers if lg._initialized and lg._tracking_uri == uri]
        log.warning(
            "MLflow run %s (named in the checkpoint) is not in %s: registering with a new run", run_id, uri
        )
        run_id = new[0] if new else None
        if run_id is not None:
            run = mlflow.MlflowClient(uri).get_run(run_id)
    if run is not None:
        metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test")}
        ckpt = (
            ckpt or run.data.tags.get("moekit.checkpoint.best") or run.data.tags.get("moekit.checkpoint.last")
        )
        tags["moekit.source_run_id"] = run_id
        tags["moekit.source_run_name"] = run.info.run_name or ""
    if trainer is not None:
        metrics.update(
            {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith("test") and v.numel() == 1
            }
        )
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if ckpt:
        tags["moekit.checkpoint"] = ckpt
    description = (
        f"moekit {app} model ({type(model).__name__}) with its fitted preprocessing: raw inputs in, "
        f"predictions out. Source run {run_id or 'none'}"
        + (f", checkpoint {ckpt}" if ckpt else "")
        + (f", commit {commit}" if commit else "")
        + "."
        + (" Test: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())) + "." if metrics else "")
    )
    _, version = log_predictor(
        params=contract.predict_params,
        app=app,
        predictor=predictor,
        example=example,
        name=name,
        run_id=run_id,
        tracking_uri=uri,
        description=description,
        tags=tags,
        metrics=metrics,
    )
    if trainer is not None and run_id is not None:
        _drop_validation_run(trainer, run_id)
    return version
