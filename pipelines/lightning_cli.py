"""``MoekitCLI``: the LightningCLI of ``moekit <app> {fit,validate,test,predict}``.

Each app's YAML names its LightningModule and LightningDataModule by ``class_path``; LightningCLI (subclass
mode) is the registry, so any such YAML runs and ``--model.help CLASS`` prints a class's documented arguments.
:class:`MoekitCLI` adds: the app's check for renamed config keys (``MoekitApp.check_config``, before parsing),
an MLflow logger by default (see :mod:`pipelines.tracking`), the resolved config, params and git commit logged
to the run, plots/tables/preprocessing artifacts, a checkpoint folder that does not depend on the run id (so
``--ckpt_path last`` resumes exactly), progress bars when stderr is a terminal, and
``--tracking.register_as NAME`` to register the model at the end of ``fit``.
"""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import Logger

from pipelines.apps import get_app
from pipelines.checkpointing import AtomicCheckpointIO, remove_stale_temporaries
from pipelines.interrupts import InterruptCheckpoint
from pipelines.registry import register_trained
from pipelines.tracking import (
    MlflowArtifactsCallback,
    MlflowRunLifecycle,
    MlflowSaveConfigCallback,
    checkpoint_run_id,
    default_tracking_uri,
    make_logger,
)

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config uses a key or value its app has renamed (the message names the new form)."""


def _deep_merge(base: dict, extra: Mapping) -> dict:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def merged_config(configs: Sequence[str | Path], overrides: Mapping[str, Any]) -> dict:
    """Base YAML files merged in order, then dotted overrides set into the nested mapping."""
    cfg: dict = {}
    for c in configs:
        with open(c) as f:
            _deep_merge(cfg, yaml.safe_load(f) or {})
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return cfg


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def raw_config(args: Sequence[str]) -> dict:
    """The config that command-line ``args`` describe, before parsing: the ``--config`` files merged, then the
    ``--a.b=value`` / ``--a.b value`` overrides (values read as YAML). Only used to look for renamed keys."""
    files, overrides = [], {}
    i = 0
    while i < len(args):
        tok = str(args[i])
        i += 1
        if not tok.startswith("--"):
            continue
        key, eq, value = tok[2:].partition("=")
        if not eq and i < len(args) and not str(args[i]).startswith("--"):
            value, i = str(args[i]), i + 1
        if key == "config":
            files.append(value)
        elif "." in key:
            overrides[key] = _yaml_value(value)
    return merged_config([f for f in files if Path(f).is_file()], overrides)


def _import_class(path: str) -> type:
    import importlib

    module, _, name = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        obj = None
    if not isinstance(obj, type):
        raise ConfigError(f"{path!r} is not an importable class (give its full dotted path)")
    return obj


def _argument_type(owner: type, name: str) -> type | None:
    """The class that argument ``name`` of ``owner`` (an ``__init__`` parameter or a dataclass field) is
    typed as, ``Optional`` unwrapped; None when it is not a single class."""
    import dataclasses
    import typing

    target = owner if dataclasses.is_dataclass(owner) else owner.__init__
    try:
        hint = typing.get_type_hints(target).get(name)
    except (NameError, TypeError):
        return None
    classes = [t for t in (typing.get_args(hint) or (hint,)) if isinstance(t, type) and t is not type(None)]
    return classes[0] if len(classes) == 1 else None


def nested_class_help(
    args: Sequence[str], shipped_configs: Sequence[Path] = (), prog: str = "moekit"
) -> str | None:
    """Help for ``--<key>.<arg>[.<field>...].help [CLASS]``, an argument inside a class-typed key, e.g.
    ``--model.config.help [LMConfig]`` (a dataclass: its fields with types, defaults and docstring help) or
    ``--model.model.help MIGA`` (a subclass of the argument's type: its init arguments). None when ``args``
    ask no such help or the key's class is unknown (jsonargparse answers: ``--trainer.callbacks.help X``).

    jsonargparse prints help for the class of a subclass-mode key (``--model.help CLASS``) but refuses
    ``.help`` on an argument inside it. The class owning the argument is taken from ``--<key> CLASS``,
    ``--<key>.class_path CLASS`` or the ``--config`` files, else from ``shipped_configs`` (the app's configs).

    Raises:
        ConfigError: a class named on the command line or in a config does not import, ``CLASS`` is not the
            argument's type or a subclass of it, or is missing for an argument that is not a dataclass.
    """
    import dataclasses

    asked = None
    for i, tok in enumerate(args):
        key, eq, value = str(tok).partition("=")
        if key.startswith("--") and key.endswith(".help") and key.count(".") >= 2:
            if not eq:
                nxt = str(args[i + 1]) if i + 1 < len(args) else ""
                value = "" if nxt.startswith("-") else nxt
            asked = key[2 : -len(".help")], value or None
            break
    if asked is None:
        return None
    path, name = asked
    root, *fields = [p for p in path.split(".") if p != "init_args"]
    # --model CLASS is not in raw_config (no dot); --model.class_path CLASS and --config files are
    at = [i for i, tok in enumerate(args[:-1]) if tok == f"--{root}" and not str(args[i + 1]).startswith("-")]
    node = str(args[at[-1] + 1]) if at else raw_config(args).get(root)
    node = node.get("class_path") if isinstance(node, Mapping) else node
    owners = [node] if isinstance(node, str) else []
    shipped = not owners
    if shipped:
        for f in shipped_configs:
            node = (yaml.safe_load(Path(f).read_text()) or {}).get(root)
            node = node.get("class_path") if isinstance(node, Mapping) else node
            if isinstance(node, str) and node not in owners:
                owners.append(node)
    found: set[type] = set()
    for owner in owners:
        try:
            typ: type | None = _import_class(owner)
        except ConfigError:
            if shipped:  # a shipped config whose class needs an optional dependency
                continue
            raise
        for field in fields:
            typ = _argument_type(typ, field) if typ is not None else None
        if typ is not None:
            found.add(typ)
    if not found:
        return None
    types = ", ".join(sorted(f"{t.__module__}.{t.__qualname__}" for t in found))
    if name is None and not any(dataclasses.is_dataclass(t) for t in found):
        raise ConfigError(f"--{path}.help: name a class (--{path}.help CLASS); --{path} is typed {types}")
    if name is not None:  # the argument's type or a subclass: a dotted path, or a loaded class's bare name
        known, todo = set(), list(found)
        while todo:
            t = todo.pop()
            known.add(t)
            todo += [c for c in t.__subclasses__() if c not in known]
        named = {t for t in known if t.__name__ == name}
        if len(named) > 1:
            paths = ", ".join(sorted(f"{t.__module__}.{t.__qualname__}" for t in named))
            raise ConfigError(
                f"--{path}.help {name}: several classes have that name ({paths}); give its path"
            )
        given = _import_class(name) if "." in name else next(iter(named), None)
        if given is None or not any(issubclass(given, t) for t in found):
            raise ConfigError(f"--{path}.help {name}: --{path} is typed {types}")
        found = {given}
    if len(found) > 1:
        raise ConfigError(f"--{path}.help: the app's configs type --{path} as {types}; name one")
    (typ,) = found
    from jsonargparse import ArgumentParser

    qual = f"{typ.__module__}.{typ.__qualname__}"
    parser = ArgumentParser(prog=prog, description=f"Help for --{path}.help={qual}", add_help=False)
    parser.add_class_arguments(typ, nested_key=path, fail_untyped=False)
    return parser.format_help()


def _fix_checkpointing(trainer: L.Trainer, run_dir: Path) -> None:
    """Give every ModelCheckpoint without a folder a fixed one; make sure one of them saves ``last.ckpt``."""
    cbs = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    for cb in cbs:
        if cb.dirpath is None:
            cb.dirpath = str(run_dir)
    if cbs and not any(cb.save_last for cb in cbs):
        cbs[0].save_last = True


class _CheckpointFolder(Callback):
    """Re-applies :func:`_fix_checkpointing` at setup, after a LightningModule's ``configure_callbacks`` may
    have replaced the trainer's checkpoint callbacks (Lightning runs ModelCheckpoint setups last)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _fix_checkpointing(trainer, self.run_dir)
        if trainer.is_global_zero:  # temporaries of saves that a crash or kill -9 interrupted
            for cb in trainer.checkpoint_callbacks:
                if cb.dirpath and Path(cb.dirpath).is_dir():
                    remove_stale_temporaries(cb.dirpath)


class ResumableRng(Callback):
    """Store the global RNG states (python, numpy, torch CPU and CUDA) in every checkpoint and restore them on
    resume, so ``--ckpt_path last`` continues with the same data order and dropout masks as an uninterrupted
    run (Lightning restores model, optimiser and loop state, but not the global RNGs the samplers draw from).

    Restoring happens while the checkpoint is loaded, before the fit loop creates the epoch's data iterator
    (Lightning runs the sanity check under ``isolate_rng``).
    """

    KEY = "moekit_rng_states"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        import random

        import numpy as np
        import torch

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain types and tensors only: Lightning loads checkpoints with ``weights_only=True``
        states = {
            "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint[self.KEY] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        import random

        import numpy as np
        import torch

        states = checkpoint.get(self.KEY)
        if not states or trainer.state.fn != "fit":
            return
        random.setstate(states["python"])
        name, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


_NOISE = ("Subtypes:", "Errors:", "Given value type:", "Given value:", "Expected a <class 'NoneType'>")


def condense_parse_error(message: str, prog: str) -> str:
    """One line for jsonargparse's multi-line error. An unknown key in a class's section (a typo such as
    ``categoricals:``) becomes ``--data (CLASS): unknown option(s) ['categoricals']`` with the command that
    lists the accepted ones; any other message keeps its informative lines, joined."""
    import re

    unknown = re.findall(r"Option '([^']+)' is not accepted", message)
    key = re.search(r'Parser key "([^"]+)"', message)
    cls = re.search(r"given class_path '([^']+)'", message)
    if unknown and key:
        where = f"--{key.group(1)}" + (f" ({cls.group(1)})" if cls else "")
        help_cmd = f"{prog} --{key.group(1)}.help {cls.group(1) if cls else 'CLASS'}"
        return f"{where}: unknown option(s) {sorted(set(unknown))}; `{help_cmd}` lists the accepted ones"
    kept = []
    for raw in message.splitlines():
        ln = raw.strip().removeprefix("- ").strip()
        if ln.startswith("Given value:") and len(ln) <= 100 and "Arg(" not in ln and "Namespace(" not in ln:
            kept.append(ln.replace("Given value:", "given", 1))
        elif ln and not ln.startswith(_NOISE) and "Union subtypes" not in ln:
            kept.append(re.sub(r'^Parser key "([^"]+)":$', r"--\1:", ln))
    return " ".join(kept).replace(": ;", ":") or message.strip()


class MoekitArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose command-line errors are one line (``error: ...``, exit status 2) instead
    of the whole usage and jsonargparse's nested report (65 lines for one misspelt config key); ``--debug``
    still raises, and a parser that does not exit on error raises as before."""

    def error(self, message: str, ex: Exception | None = None) -> Any:  # noqa: D102
        from jsonargparse._common import debug_mode_active  # jsonargparse's own switch (JSONARGPARSE_DEBUG)

        if not self.exit_on_error or debug_mode_active():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {prog}: {condense_parse_error(message, prog)}\n")
        self.exit(2)


_EVALUATION = ("validate", "test", "predict")
_CKPT_BULK = ("state_dict", "optimizer_states", "lr_schedulers")


def checkpoint_extras(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint without its weights and optimizer state: what a data module's ``load_fitted_state``
    reads (e.g. recsys's ``preprocessor``), small enough to keep while the trainer loads the file again."""
    return {k: v for k, v in ckpt.items() if k not in _CKPT_BULK}


def _class_paths(node: Any, prefix: str = "") -> dict[str, str]:
    """``{dotted key: class path}`` of every ``class_path`` inside a (nested) config node."""
    node = node.as_dict() if hasattr(node, "as_dict") else node
    out: dict[str, str] = {}
    if isinstance(node, Mapping):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if k == "class_path" and isinstance(v, str):
                out[key] = v
            else:
                out.update(_class_paths(v, f"{key}."))
    return out


class MoekitCLI(LightningCLI):
    """LightningCLI for one moekit app, with MLflow tracking and resumable checkpoints by default.

    Args:
        app: app name in the table of :mod:`pipelines.apps`; names the MLflow experiment ``moekit-<app>``.
        args: command-line arguments (None: ``sys.argv``).
        run: run the subcommand (False: only instantiate ``model``, ``datamodule`` and ``trainer``).
        logger: a ready logger instead of the default MLflow logger (the tuner passes nested-run loggers).
        extra_callbacks: callbacks appended to the trainer's (the tuner passes the pruning callback).

    Raises:
        ConfigError: the config uses a key the app renamed (before any parsing).
    """

    def __init__(
        self,
        *,
        app: str,
        args: Sequence[str] | None = None,
        run: bool = True,
        logger: Logger | None = None,
        extra_callbacks: Sequence[Callback] = (),
    ) -> None:
        self.app = app
        self.contract = get_app(app)
        self._logger_override = logger
        self._extra_callbacks = list(extra_callbacks)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        # predict: PredictionsWriter writes whole epochs and never uses batch indices, which Lightning cannot
        # infer from the apps' batch samplers (a warning on every predict otherwise)
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        super().__init__(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=MlflowSaveConfigCallback,
            parser_class=MoekitArgumentParser,
            args=list(args) if args is not None else None,
            run=run,
            parser_kwargs={"prog": f"moekit {app}"}
            if run
            else {"prog": f"moekit {app}", "exit_on_error": False},
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--tracking.uri",
            type=str | None,
            default=None,
            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite <repo>/mlflow/mlflow.db)",
        )
        parser.add_argument(
            "--tracking.experiment",
            type=str | None,
            default=None,
            help="MLflow experiment name (default: moekit-<app>)",
        )
        parser.add_argument("--tracking.run_name", type=str | None, default=None, help="MLflow run name")
        parser.add_argument(
            "--tracking.register_as",
            type=str | None,
            default=None,
            help="register the trained model under this name in the MLflow Model Registry after fit",
        )
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="checkpoint folder (default: <trainer.default_root_dir>/runs/<app>/<config stem>); "
            "`--ckpt_path last` resumes from its last.ckpt",
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate/test/predict without --ckpt_path: score the model's initial (untrained) weights "
            "instead of refusing",
        )
        parser.set_defaults({"trainer.enable_progress_bar": sys.stderr.isatty()})
        # checkpoints are always read with weights_only=True by AtomicCheckpointIO (allow-listed moekit types
        # only): nothing in a checkpoint file runs code

    def _add_instantiators(self) -> None:
        """Register LightningCLI's hyper-parameter instantiator for the model only.

        LightningCLI normally makes ``save_hyperparameters()`` record the *config's* init args of the class
        it instantiates; a DataModule subclass that calls ``save_hyperparameters()`` in its own and its
        parent's ``__init__`` (e.g. ``CensusDataModule(MultiTaskDataModule)``) then loses the parent's hparams
        under the CLI but not in plain Python. Data modules are instantiated normally here, so they behave the
        same both ways.
        """
        from lightning.pytorch.cli import _get_module_type, _InstantiatorFn

        self.parser.add_instantiator(
            _InstantiatorFn(cli=self, key="model"),
            _get_module_type(self._model_class),
            subclasses=self.subclass_mode_model,
        )

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's merge of a ``--ckpt_path`` file's model hyper-parameters into the config, with
        dataclass values handed to the parser as dicts.

        The parser validates a dataclass-typed argument (the LM's ``config: LMConfig``) from a mapping, not
        from the object that ``save_hyperparameters`` stored, so ``moekit lm test --ckpt_path FILE`` failed
        with "Does not validate against any of the Union subtypes". Read weights-only, as Lightning does.
        """
        import dataclasses

        import torch

        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        if isinstance(ckpt, dict):  # what the data module may need of it (load_fitted_state), no weights
            self._ckpt_extras = checkpoint_extras(ckpt)
        hparams = dict(ckpt.get("hyper_parameters", {})) if isinstance(ckpt, dict) else {}
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        hparams = {
            k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
            for k, v in hparams.items()
        }
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        before = _class_paths(self.config[sub].get("model"))
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write(f"Parsing of the model hyper-parameters of {ckpt_path} failed\n")
            raise
        after = _class_paths(self.config[sub].get("model"))
        changed = {k: (v, after[k]) for k, v in before.items() if k in after and after[k] != v}
        if changed:
            what = "; ".join(f"model.{k}: {a} -> {b}" for k, (a, b) in sorted(changed.items()))
            log.warning(
                "--ckpt_path %s holds another model than the config names; it is used (%s)", ckpt_path, what
            )

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - LightningArgumentParser, argv
        if args is None or isinstance(args, (list, tuple)):
            argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
            app_file = getattr(sys.modules.get(type(self.contract).__module__), "__file__", None)
            shipped = sorted((Path(app_file).parent / "configs").glob("*.yaml")) if app_file else []
            sub = next((a for a in argv if not a.startswith("-")), "")
            text = nested_class_help(argv, shipped, prog=f"moekit {self.app} {sub}".strip())
            if text is not None:  # e.g. --model.config.help: jsonargparse refuses .help inside a subclass key
                print(text)
                raise SystemExit(0)
            try:
                self.contract.check_config(raw_config(argv))
            except ValueError as e:
                raise ConfigError(str(e)) from e
        super().parse_arguments(parser, args)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _cfg(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def run_dir(self) -> Path:
        """Checkpoint folder: ``--run_dir``, else ``<default_root_dir>/runs/<app>/<first config's stem>``."""
        cfg = self._cfg()
        if cfg.get("run_dir"):
            return Path(cfg["run_dir"])
        root = Path(cfg["trainer"].get("default_root_dir") or Path.cwd())
        configs = cfg.get("config") or []
        stem = Path(str(configs[0])).stem if configs else "default"
        return root / "runs" / self.app / stem

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        tracking = self._cfg().get("tracking") or {}
        if self._logger_override is not None:  # the tuner's nested trial run, whatever the config says
            config["logger"] = self._logger_override
        elif config.get("logger") in (None, True):
            # a checkpoint names the run that wrote it: a resumed fit (or a test of it) continues that run
            run_id = checkpoint_run_id(self._cfg().get("ckpt_path"), self.run_dir())
            configs = self._cfg().get("config") or []
            config["logger"] = make_logger(
                app=self.app,
                tracking_uri=tracking.get("uri"),
                experiment=tracking.get("experiment"),
                run_name=tracking.get("run_name"),
                run_id=run_id,
                reopen=run_id is not None,
                config_stem=Path(str(configs[0])).stem if configs else None,
                tags={"moekit.command": self.subcommand or "python"},
            )
        run_dir = self.run_dir()
        ckpt_path = self._cfg().get("ckpt_path")
        if ckpt_path is not None:  # resuming into (or testing from) the run folder: of course it has files
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        if str(ckpt_path) == "last" and not (run_dir / "last.ckpt").is_file():
            raise ConfigError(
                f"--ckpt_path last: no last.ckpt in {run_dir} (the run folder of this config; pass --run_dir "
                "FOLDER or --ckpt_path FILE to resume another run, or drop --ckpt_path to start anew)"
            )
        # atomic, app-stamped checkpoint writes; weights_only loads that refuse other apps' checkpoints
        config["plugins"] = [*(config.get("plugins") or []), AtomicCheckpointIO(app=self.app)]
        from pipelines.predictions import PredictionsWriter

        callbacks = [
            *callbacks,
            MlflowArtifactsCallback(app=self.app),
            MlflowRunLifecycle(checkpoint_dir=run_dir),
            _CheckpointFolder(run_dir),
            ResumableRng(),
            InterruptCheckpoint(dirpath=run_dir),  # SIGINT/SIGTERM: save last.ckpt, exit 128 + signum
            PredictionsWriter(run_dir),  # predict: <run_dir>/predictions.parquet, its path printed
            *self._extra_callbacks,
        ]
        trainer = super()._instantiate_trainer(config, callbacks)
        _fix_checkpointing(trainer, run_dir)
        return trainer

    def instantiate_classes(self) -> None:
        """LightningCLI's, with a class's refusal of its arguments (a ``ValueError`` in a data module's
        ``__init__``, which jsonargparse reports inside its multi-line Union error) as one line."""
        try:
            super().instantiate_classes()
        except Exception as e:  # jsonargparse wraps the class's own exception in its report
            text = str(e)
            if "Union subtypes" not in text and "Parser key" not in text:
                raise
            prog = f"moekit {self.app} {self.subcommand or ''}".strip()
            raise ConfigError(condense_parse_error(text, prog)) from e

    def before_instantiate_classes(self) -> None:
        cfg = self._cfg()
        if self.subcommand in _EVALUATION and cfg.get("ckpt_path") is None and not cfg.get("allow_untrained"):
            init_args = (cfg.get("model") or {}).get("init_args") or {}
            if not init_args.get("init_weights"):  # a model that loads its own weights (lm: init_weights)
                raise ConfigError(
                    f"moekit {self.app} {self.subcommand}: no --ckpt_path, so the model would have its "
                    "initial (untrained) weights; pass --ckpt_path FILE (or `last`: this config's run folder "
                    f"{self.run_dir()}/last.ckpt), or --allow_untrained true to score them anyway"
                )

    def _use_checkpoint_data_state(self) -> None:
        """Hand the checkpoint to a data module that keeps fitted preprocessing in it (``load_fitted_state``,
        e.g. recsys vocabularies), before the trainer sets the data up."""
        hook = getattr(self.datamodule, "load_fitted_state", None)
        ckpt_path = self._cfg().get("ckpt_path")
        if not callable(hook) or ckpt_path is None:
            return
        extras = getattr(self, "_ckpt_extras", None)
        if extras is None and str(ckpt_path) == "last":
            import torch

            path = self.run_dir() / "last.ckpt"
            ckpt = torch.load(path, weights_only=True, map_location="cpu")
            extras = checkpoint_extras(ckpt)
            ckpt_path = path
        if extras is not None:
            hook(extras, source=f"checkpoint {ckpt_path}")

    def before_validate(self) -> None:
        self._use_checkpoint_data_state()

    def before_test(self) -> None:
        self._use_checkpoint_data_state()

    def before_predict(self) -> None:
        self._use_checkpoint_data_state()

    def after_fit(self) -> None:
        print(fit_summary(self.trainer, monitor=self.contract.monitor, run_dir=self.run_dir()), flush=True)
        name = (self._cfg().get("tracking") or {}).get("register_as")
        if name:
            version = register_trained(
                app=self.app, model=self.model, datamodule=self.datamodule, trainer=self.trainer, name=name
            )
            log.info("registered %s as models:/%s/%s", self.app, name, version)
            print(f"registered models:/{name}/{version}")


def fit_summary(trainer: L.Trainer, *, monitor: str, run_dir: Path) -> str:
    """The lines printed at the end of ``moekit <app> fit`` (to stdout, terminal or not): the best value of
    the monitored metric, the checkpoint to use, the MLflow run and how to open it."""
    lines = ["fit done"]
    ckpt = next((cb for cb in trainer.checkpoint_callbacks if cb.monitor), None)
    if ckpt is not None and ckpt.best_model_score is not None:
        lines.append(f"  best {ckpt.monitor}: {float(ckpt.best_model_score):.6g}")
    elif monitor in trainer.callback_metrics:
        lines.append(f"  last {monitor}: {float(trainer.callback_metrics[monitor]):.6g}")
    best = ckpt.best_model_path if ckpt is not None else ""
    if best:
        lines.append(f"  best checkpoint: {best}")
    if (run_dir / "last.ckpt").is_file():
        lines.append(f"  last checkpoint: {run_dir / 'last.ckpt'}  (resume: --ckpt_path last)")
    logger = trainer.logger
    run_id = getattr(logger, "run_id", None)
    if run_id:
        uri = getattr(logger, "_tracking_uri", None) or ""
        exp = getattr(logger, "experiment_id", None)
        lines.append(
            f"  MLflow run: {run_id}  (experiment {getattr(logger, '_experiment_name', exp)}, {uri})"
        )
        ui = "moekit ui" if not uri or uri == default_tracking_uri() else f"moekit ui --tracking-uri {uri}"
        lines.append(f"  open it: {ui}, then http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id}")
    else:
        lines.append("  MLflow: not logged (trainer.logger is off)")
    return "\n".join(lines)
