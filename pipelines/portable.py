"""A predictor as tensors plus JSON: what a registered moekit model stores instead of a pickle.

:func:`save_portable` walks a predictor (an object built by an app's ``build_predictor``) and writes two
files:

* ``predictor.safetensors``: every tensor and numeric array, by key;
* ``predictor.json``: the object tree: the class of each object and module (``"module:QualName"``), its
  attributes, and references to the tensors by key.

:func:`load_portable` rebuilds the tree without running code from the files: a class or function is looked up
only when its module is on an allow-list (moekit's ``apps``/``moe_core`` and the packages the model bundles,
``torch.nn``/``torch`` for layers and activations), objects are made with ``cls.__new__`` (no ``__init__``
of a class named by the file runs) and get their attributes back; a ``nn.Module`` gets its parameters,
buffers and children re-registered. JSON and safetensors cannot execute anything while they are read,
unlike a pickle.

What a predictor may hold: tensors, ``nn.Module`` trees, numpy arrays and scalars, pandas ``DataFrame``/
``Series``/``Index``, ``None``/``bool``/``int``/``float``/``str``, lists, tuples, sets, dicts, dtypes,
devices, enums, dataclasses and plain objects of allowed classes, references to allowed functions and
classes. Objects shared in the tree (tied weights, a preprocessor referenced twice) stay shared. A private
attribute (``_name``) that holds anything else is treated as a cache and left out; a public one is an error
naming its path.
"""

from __future__ import annotations

import enum
import importlib
import json
import logging
import os
import tempfile
import types
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

log = logging.getLogger(__name__)

FORMAT = "moekit-portable"
VERSION = 1
JSON_NAME = "predictor.json"
TENSORS_NAME = "predictor.safetensors"
DEFAULT_PACKAGES = ("apps", "moe_core")
"""Top-level packages whose classes and functions a portable file may name (plus ``extra_packages``)."""
_TORCH_CLASS_PREFIXES = ("torch.nn.modules.", "torch.nn.parameter")
_TORCH_CALLABLE_MODULES = ("torch", "torch.nn.functional", "torch.special", "math")
_NN_INTERNAL = frozenset(nn.Module().__dict__)
_MARK = "@"

__all__ = ["PortableError", "load_portable", "save_portable"]


class PortableError(ValueError):
    """A predictor that cannot be written, or a file that cannot be read back safely; names the path."""


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _allowed(module: str, packages: tuple[str, ...]) -> bool:
    top = module.split(".")[0]
    return top in packages


# -- writing ------------------------------------------------------------------------------------------------
class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._tensor_keys: dict[int, str] = {}
        self._objects: dict[int, int] = {}
        self._keep: list[Any] = []  # keep encoded objects alive so their ids stay unique
        self.modules: set[str] = set()

    def tensor(self, t: torch.Tensor) -> str:
        key = self._tensor_keys.get(id(t))
        if key is None:
            key = f"t{len(self.tensors)}"
            # a copy of its own: safetensors refuses views and storage shared between entries
            self.tensors[key] = t.detach().to("cpu").contiguous().clone()
            self._tensor_keys[id(t)] = key
            self._keep.append(t)
        return key

    def _ref(self, obj: Any) -> dict | None:
        idx = self._objects.get(id(obj))
        return None if idx is None else {_MARK: "ref", "id": idx}

    def _register(self, obj: Any) -> int:
        idx = len(self._objects)
        self._objects[id(obj)] = idx
        self._keep.append(obj)
        return idx

    def encode(self, v: Any, path: str) -> Any:  # noqa: C901, PLR0911, PLR0912 - one branch per kind
        if v is None or isinstance(v, bool | str):
            return v
        if isinstance(v, int) and not isinstance(v, enum.Enum):
            return v
        if isinstance(v, float):
            return v if np.isfinite(v) else {_MARK: "float", "v": repr(v)}
        if isinstance(v, torch.Tensor):
            if isinstance(v, nn.Parameter):
                return {_MARK: "param", "t": self.tensor(v), "grad": v.requires_grad}
            return {_MARK: "tensor", "t": self.tensor(v)}
        if isinstance(v, np.ndarray):
            return self._ndarray(v, path)
        if isinstance(v, np.generic):
            return {
                _MARK: "npscalar",
                "dtype": v.dtype.str,
                "v": v.item() if not isinstance(v, np.floating) else repr(float(v)),
            }
        if isinstance(v, torch.dtype):
            return {_MARK: "dtype", "v": str(v).removeprefix("torch.")}
        if isinstance(v, torch.device):
            return {_MARK: "device", "v": str(v)}
        if isinstance(v, enum.Enum):
            self.modules.add(type(v).__module__)
            return {_MARK: "enum", "cls": _qualname(type(v)), "v": self.encode(v.value, path)}
        if isinstance(v, list | tuple | set | frozenset):
            kind = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset"}.get(type(v))
            if kind is None:  # a NamedTuple or another sequence subclass: an object
                return self._object(v, path)
            items = sorted(v, key=repr) if kind in ("set", "frozenset") else v
            enc = [self.encode(x, f"{path}[{i}]") for i, x in enumerate(items)]
            return enc if kind == "list" else {_MARK: kind, "v": enc}
        if type(v) is dict or isinstance(v, OrderedDict):
            if all(isinstance(k, str) and k != _MARK for k in v):
                return {k: self.encode(x, f"{path}.{k}") for k, x in v.items()}
            return {
                _MARK: "dict",
                "items": [[self.encode(k, path), self.encode(x, f"{path}[{k!r}]")] for k, x in v.items()],
            }
        if isinstance(v, pd.DataFrame | pd.Series | pd.Index):
            return self._pandas(v, path)
        if isinstance(v, type):
            self.modules.add(v.__module__)
            return {_MARK: "class", "v": _qualname(v)}
        if isinstance(v, types.FunctionType | types.BuiltinFunctionType):
            if "<locals>" in v.__qualname__ or v.__name__ == "<lambda>":
                raise PortableError(
                    f"{path}: a lambda or nested function cannot be stored; use a named function"
                )
            name = _function_name(v, path)
            self.modules.add(name.split(":")[0])
            return {_MARK: "func", "v": name}
        if isinstance(v, nn.Module):
            return self._module(v, path)
        return self._object(v, path)

    def _ndarray(self, a: np.ndarray, path: str) -> dict:
        if a.dtype == object or a.dtype.kind in "US":
            return {
                _MARK: "ndarray_list",
                "dtype": a.dtype.str if a.dtype.kind in "US" else "object",
                "shape": list(a.shape),
                "v": [self.encode(x, path) for x in a.ravel().tolist()],
            }
        if a.dtype.kind in "Mm":  # datetime64 / timedelta64: their int64 counts
            return {
                _MARK: "ndarray",
                "dtype": a.dtype.str,
                "t": self.tensor(torch.from_numpy(np.array(a.view(np.int64), copy=True))),
            }
        return {
            _MARK: "ndarray",
            "dtype": a.dtype.str,
            "t": self.tensor(torch.from_numpy(np.array(a, copy=True))),
        }

    def _pandas(self, v: pd.DataFrame | pd.Series | pd.Index, path: str) -> dict:
        if isinstance(v, pd.Index):
            if isinstance(v, pd.MultiIndex):
                return {
                    _MARK: "multiindex",
                    "names": list(v.names),
                    "levels": [self._pandas(v.get_level_values(i), path) for i in range(v.nlevels)],
                }
            return {
                _MARK: "index",
                "name": self.encode(v.name, path),
                "dtype": str(v.dtype),
                "v": self._ndarray(_plain_values(v), path),
            }
        if isinstance(v, pd.Series):
            return {
                _MARK: "series",
                "name": self.encode(v.name, path),
                "dtype": str(v.dtype),
                "index": self._pandas(v.index, path),
                "v": self._ndarray(_plain_values(v), path),
            }
        return {
            _MARK: "frame",
            "index": self._pandas(v.index, path),
            "columns": [
                [self.encode(c, path), str(v[c].dtype), self._ndarray(_plain_values(v[c]), f"{path}.{c}")]
                for c in v.columns
            ],
        }

    def _attrs(self, state: dict[str, Any], path: str) -> dict[str, Any]:
        out = {}
        for k, x in state.items():
            try:
                out[k] = self.encode(x, f"{path}.{k}")
            except PortableError:
                if not k.startswith("_"):
                    raise
                log.debug("%s.%s: not storable, left out as a cache", path, k)
        return out

    def _module(self, m: nn.Module, path: str) -> dict:
        ref = self._ref(m)
        if ref is not None:
            return ref
        idx = self._register(m)
        self.modules.add(type(m).__module__)
        hooks = [k for k in _NN_INTERNAL if "hook" in k and getattr(m, k, None)]
        if hooks:
            log.warning("%s: %s left out (hooks are code, not state)", path, ", ".join(sorted(hooks)))
        attrs = {k: x for k, x in m.__dict__.items() if k not in _NN_INTERNAL}
        return {
            _MARK: "module",
            "id": idx,
            "cls": _qualname(type(m)),
            "training": m.training,
            "params": {
                k: None if p is None else self.encode(p, f"{path}.{k}") for k, p in m._parameters.items()
            },
            "buffers": {
                k: None if b is None else self.encode(b, f"{path}.{k}") for k, b in m._buffers.items()
            },
            "non_persistent": sorted(m._non_persistent_buffers_set),
            "children": {
                k: None if c is None else self._module(c, f"{path}.{k}") for k, c in m._modules.items()
            },
            "attrs": self._attrs(attrs, path),
        }

    def _object(self, v: Any, path: str) -> dict:
        ref = self._ref(v)
        if ref is not None:
            return ref
        cls = type(v)
        if "<locals>" in cls.__qualname__:
            raise PortableError(
                f"{path}: instance of a class defined inside a function ({cls.__qualname__})"
            )
        if isinstance(v, tuple) and hasattr(v, "_fields"):  # NamedTuple
            idx = self._register(v)
            self.modules.add(cls.__module__)
            return {
                _MARK: "namedtuple",
                "id": idx,
                "cls": _qualname(cls),
                "v": [self.encode(x, f"{path}.{f}") for f, x in zip(v._fields, v)],
            }
        state = getattr(v, "__dict__", None)
        if (
            state is None
            or cls.__module__ in ("builtins",)
            or cls.__module__.split(".")[0]
            in (
                "pandas",
                "numpy",
                "torch",
                "tokenizers",
                "io",
                "threading",
                "_io",
                "_thread",
            )
        ):
            raise PortableError(
                f"{path}: a {cls.__module__}.{cls.__qualname__} cannot be stored as tensors + JSON; keep "
                "predictors to tensors, modules, arrays, pandas objects, primitives, containers and plain "
                "objects"
            )
        idx = self._register(v)
        self.modules.add(cls.__module__)
        return {_MARK: "object", "id": idx, "cls": _qualname(cls), "attrs": self._attrs(dict(state), path)}


def _resolve(module: str, qual: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _function_name(f: Any, path: str) -> str:
    """``"module:qualname"`` that resolves back to ``f``; torch's C functions (``F.gelu`` lives in
    ``torch._C._nn``, ``torch.sigmoid`` on a private class) get their public name."""
    short = f.__name__
    candidates = [
        ("torch.nn.functional", short),
        ("torch", short),
        ("torch.special", short.removeprefix("special_")),
        (f.__module__, f.__qualname__),
    ]
    for module, qual in candidates:
        try:
            if module and _resolve(module, qual) is f:
                return f"{module}:{qual}"
        except (ImportError, AttributeError):
            continue
    raise PortableError(f"{path}: function {f.__module__}.{f.__qualname__} has no importable name")


def _plain_values(v: pd.Series | pd.Index) -> np.ndarray:
    """A numpy array of a pandas column: numeric dtypes as they are, anything else as Python objects."""
    if isinstance(v.dtype, np.dtype) and v.dtype.kind in "biufcMm":
        return v.to_numpy()
    return v.astype(object).to_numpy()


def _atomic_write(path: Path, write) -> None:  # noqa: ANN001 - a callable of a temp path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_portable(obj: Any, folder: str | Path) -> tuple[Path, Path, set[str]]:
    """Write ``obj`` as ``predictor.json`` + ``predictor.safetensors`` in ``folder`` (atomically each).

    Returns:
        (json path, tensors path, the modules whose classes or functions the files name).

    Raises:
        PortableError: ``obj`` holds something that is not state (a lambda, an open file, a Rust tokenizer in
            a public attribute), named by its attribute path.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    enc = _Encoder()
    tree = {"format": FORMAT, "version": VERSION, "root": enc.encode(obj, "predictor")}
    jpath, tpath = folder / JSON_NAME, folder / TENSORS_NAME
    _atomic_write(tpath, lambda p: save_file(enc.tensors, p, metadata={"format": FORMAT}))
    text = json.dumps(tree, indent=1)
    _atomic_write(jpath, lambda p: Path(p).write_text(text))
    return jpath, tpath, enc.modules


# -- reading ------------------------------------------------------------------------------------------------
class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], packages: tuple[str, ...], source: str) -> None:
        self.tensors = tensors
        self.packages = packages
        self.source = source
        self.objects: dict[int, Any] = {}
        self.made: dict[tuple[str, str], Any] = {}

    def fail(self, msg: str) -> PortableError:
        return PortableError(f"{self.source}: {msg}")

    def lookup(self, name: Any, *, kind: str) -> Any:
        if not isinstance(name, str) or ":" not in name:
            raise self.fail(f"malformed {kind} name {name!r}")
        module, qual = name.split(":", 1)
        ok = (
            _allowed(module, self.packages)
            or (kind == "class" and module.startswith(_TORCH_CLASS_PREFIXES))
            or (kind == "function" and module in _TORCH_CALLABLE_MODULES)
        )
        if not ok:
            raise self.fail(
                f"{kind} {name} is not allowed (only moekit's own packages {list(self.packages)} and "
                "torch layers)"
            )
        try:
            obj = _resolve(module, qual)
        except (ImportError, AttributeError) as e:
            raise self.fail(f"{kind} {name} does not exist here ({e})") from e
        if kind == "class" and not isinstance(obj, type):
            raise self.fail(f"{name} is not a class")
        if kind == "function" and (isinstance(obj, type) or not callable(obj)):
            raise self.fail(f"{name} is not a function")
        return obj

    def tensor(self, key: Any) -> torch.Tensor:
        if key not in self.tensors:
            raise self.fail(f"tensor {key!r} is missing from {TENSORS_NAME}")
        return self.tensors[key]

    def decode(self, v: Any) -> Any:  # noqa: C901, PLR0911, PLR0912 - one branch per kind
        if v is None or isinstance(v, bool | int | float | str):
            return v
        if isinstance(v, list):
            return [self.decode(x) for x in v]
        if not isinstance(v, dict):
            raise self.fail(f"unexpected JSON value {type(v).__name__}")
        kind = v.get(_MARK)
        if kind is None:
            return {k: self.decode(x) for k, x in v.items()}
        if kind == "ref":
            if v.get("id") not in self.objects:
                raise self.fail(f"reference to unknown object {v.get('id')!r}")
            return self.objects[v["id"]]
        if kind == "float":
            return float(v["v"])
        if kind == "tensor":
            return self.tensor(v["t"])
        if kind == "param":  # one Parameter per stored tensor: tied weights stay tied
            key = ("param", v["t"])
            if key not in self.made:
                self.made[key] = nn.Parameter(self.tensor(v["t"]), requires_grad=bool(v.get("grad", True)))
            return self.made[key]
        if kind == "ndarray":
            a = self.tensor(v["t"]).numpy()
            dt = np.dtype(v["dtype"])
            return a.view(dt) if dt.kind in "Mm" else a.astype(dt, copy=False)
        if kind == "ndarray_list":
            dt = np.dtype(v["dtype"]) if v["dtype"] != "object" else object
            flat = [self.decode(x) for x in v["v"]]
            a = np.empty(len(flat), dtype=dt)
            a[:] = flat
            return a.reshape(v["shape"])
        if kind == "npscalar":
            dt = np.dtype(v["dtype"])
            return dt.type(float(v["v"]) if dt.kind == "f" else v["v"])
        if kind == "dtype":
            dt = getattr(torch, str(v["v"]), None)
            if not isinstance(dt, torch.dtype):
                raise self.fail(f"unknown dtype {v['v']!r}")
            return dt
        if kind == "device":
            return torch.device(str(v["v"]))
        if kind in ("tuple", "set", "frozenset"):
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[kind](
                self.decode(x) for x in v["v"]
            )
        if kind == "dict":
            return {self._hashable(self.decode(k)): self.decode(x) for k, x in v["items"]}
        if kind == "enum":
            return self.lookup(v["cls"], kind="class")(self.decode(v["v"]))
        if kind == "class":
            return self.lookup(v["v"], kind="class")
        if kind == "func":
            return self.lookup(v["v"], kind="function")
        if kind in ("index", "multiindex", "series", "frame"):
            return self._pandas(v)
        if kind == "module":
            return self._module(v)
        if kind == "namedtuple":
            cls = self.lookup(v["cls"], kind="class")
            obj = cls(*[self.decode(x) for x in v["v"]])
            self.objects[v["id"]] = obj
            return obj
        if kind == "object":
            return self._object(v)
        raise self.fail(f"unknown node kind {kind!r}")

    @staticmethod
    def _hashable(k: Any) -> Any:
        return tuple(k) if isinstance(k, list) else k

    def _pandas(self, v: dict) -> Any:
        kind = v[_MARK]
        if kind == "multiindex":
            return pd.MultiIndex.from_arrays([self._pandas(x) for x in v["levels"]], names=v["names"])
        if kind == "index":
            return pd.Index(self.decode(v["v"]), name=self.decode(v["name"]), dtype=_pd_dtype(v["dtype"]))
        if kind == "series":
            return pd.Series(
                self.decode(v["v"]),
                index=self._pandas(v["index"]),
                name=self.decode(v["name"]),
                dtype=_pd_dtype(v["dtype"]),
            )
        index = self._pandas(v["index"])
        cols = {}
        for name, dtype, values in v["columns"]:
            cols[self._hashable(self.decode(name))] = pd.Series(
                self.decode(values), index=index, dtype=_pd_dtype(dtype)
            )
        return pd.DataFrame(cols, index=index)

    def _module(self, v: dict) -> nn.Module:
        cls = self.lookup(v["cls"], kind="class")
        if not issubclass(cls, nn.Module):
            raise self.fail(f"{v['cls']} is not a torch module")
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        self.objects[v["id"]] = m
        m.__dict__.update(
            {k: self.decode(x) for k, x in v.get("attrs", {}).items() if k not in _NN_INTERNAL}
        )
        for k, p in v.get("params", {}).items():
            m._parameters[k] = None if p is None else self.decode(p)
        for k, b in v.get("buffers", {}).items():
            m._buffers[k] = None if b is None else self.decode(b)
        m._non_persistent_buffers_set.update(v.get("non_persistent", []))
        for k, c in v.get("children", {}).items():
            child = None if c is None else self.decode(c)
            if child is not None and not isinstance(child, nn.Module):
                raise self.fail(f"child {k!r} of {v['cls']} is not a module")
            m._modules[k] = child
        m.training = bool(v.get("training", False))
        return m

    def _object(self, v: dict) -> Any:
        cls = self.lookup(v["cls"], kind="class")
        obj = cls.__new__(cls)
        self.objects[v["id"]] = obj
        for k, x in v.get("attrs", {}).items():
            object.__setattr__(obj, k, self.decode(x))
        return obj


def _pd_dtype(name: str) -> Any:
    return None if name in ("object",) else name


def load_portable(folder: str | Path, *, extra_packages: Iterable[str] = ()) -> Any:
    """Rebuild the object :func:`save_portable` wrote in ``folder``; no code named by the files runs unless
    its module is in moekit's packages (``apps``, ``moe_core``), ``extra_packages`` (an out-of-tree app's
    package) or torch's layers and functions.

    Raises:
        PortableError: a missing or malformed file, a class or function outside the allow-list, a missing
            tensor; the message names the file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    jpath, tpath = folder / JSON_NAME, folder / TENSORS_NAME
    for p in (jpath, tpath):
        if not p.is_file():
            raise PortableError(
                f"{p}: missing (a moekit model folder holds {JSON_NAME} and {TENSORS_NAME})"
            )
    try:
        tree = json.loads(jpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PortableError(f"{jpath}: not valid JSON ({e})") from e
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise PortableError(f"{jpath}: not a moekit portable predictor (format {FORMAT!r} expected)")
    if tree.get("version") != VERSION:
        raise PortableError(f"{jpath}: format version {tree.get('version')!r}; this moekit reads {VERSION}")
    try:
        tensors = load_file(str(tpath))
    except (SafetensorError, OSError) as e:
        raise PortableError(f"{tpath}: not a readable safetensors file ({e})") from e
    packages = tuple(dict.fromkeys([*DEFAULT_PACKAGES, *extra_packages]))
    try:
        return _Decoder(tensors, packages, str(jpath)).decode(tree.get("root"))
    except PortableError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise PortableError(f"{jpath}: malformed ({type(e).__name__}: {e})") from e
