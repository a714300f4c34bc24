"""Checkpoint files a team can trust: atomic writes, safe loading, and an app stamp checked before restoring.

:class:`AtomicCheckpointIO` is a Lightning ``CheckpointIO`` plugin (``Trainer(plugins=[...])``) that

* writes every checkpoint (``last.ckpt`` included: ``ModelCheckpoint(save_last=True)`` writes it through
  ``trainer.save_checkpoint``, hence through this plugin) to a temporary file *in the checkpoint's own folder*
  (``.<name>.tmp-<pid>-<random>``), fsyncs it, renames it over the target with :func:`os.replace` and fsyncs
  the folder. A reader sees the old file or the new one, never a partial one, whatever ``$TMPDIR`` is:
  Lightning's own writer stages the file in ``$TMPDIR`` and moves it, which is a copy (and a 0-byte or
  truncated ``last.ckpt`` after ``kill -9``) when ``$TMPDIR`` is on another filesystem, and leaves the whole
  staged file behind in ``$TMPDIR`` when it is on the same one;
* stamps every checkpoint with ``checkpoint["moekit"] = {"app": <app>, "schema": SCHEMA_VERSION}``;
* loads with ``torch.load(weights_only=True)`` only, allowing moekit's own types that the caller lists
  (``safe_globals``) besides those registered with ``torch.serialization.add_safe_globals``; a file whose
  pickle names anything else (``os.system`` ...) is refused without running it;
* refuses, before Lightning restores any state, a file that is empty or truncated
  (:class:`IncompleteCheckpointError`), not written by moekit (:class:`NotMoekitCheckpointError`), written by
  a newer schema or by another app (:class:`ForeignCheckpointError`).

Temporaries left by a killed save are removed by :func:`remove_stale_temporaries` (call it on the
checkpoint folders at start; the plugin also calls it on each folder before its first save there).
Checkpoints written before the stamp existed can be stamped once with :func:`stamp_checkpoint_file`.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import secrets
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.cloud_io import _load as _fsspec_load

__all__ = [
    "CHECKPOINT_KEY",
    "SCHEMA_VERSION",
    "AtomicCheckpointIO",
    "CheckpointError",
    "ForeignCheckpointError",
    "IncompleteCheckpointError",
    "NotMoekitCheckpointError",
    "UnsafeCheckpointError",
    "atomic_save",
    "check_stamp",
    "load_checkpoint_file",
    "remove_stale_temporaries",
    "stamp",
    "stamp_checkpoint_file",
    "temporary_path",
]

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "moekit"
"""Top-level key of the stamp: ``checkpoint["moekit"] = {"app": "lm", "schema": 1}``."""

SCHEMA_VERSION = 1
"""Version of the checkpoint layout this moekit writes; it reads every version up to this one."""

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint file that moekit will not restore (the message names the file and the reason)."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = str(path)
        super().__init__(f"checkpoint {self.path}: {message}")


class IncompleteCheckpointError(CheckpointError):
    """The file is empty or cut short (an interrupted save or copy)."""


class UnsafeCheckpointError(CheckpointError):
    """The file's pickle names objects outside the allow-list; unpickling them could run code."""


class NotMoekitCheckpointError(CheckpointError):
    """The file is a readable checkpoint without moekit's stamp (not written by moekit)."""


class ForeignCheckpointError(CheckpointError):
    """The file was written by moekit for another app, or by a newer checkpoint schema."""


# -- writing -------------------------------------------------------------------------------------------------
def temporary_path(path: str | os.PathLike) -> Path:
    """Where a save of ``path`` is staged: ``<folder>/.<name>.tmp-<pid>-<8 hex>`` (same folder, so the final
    rename never crosses a filesystem)."""
    p = Path(path)
    return p.with_name(f".{p.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (network, FUSE) do not fsync folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` so that ``path`` holds either its old content or the complete new one.

    Writes :func:`temporary_path` (``path``'s folder), fsyncs it, :func:`os.replace`-s it over ``path`` and
    fsyncs the folder. On any error the temporary is removed and the error re-raised; a ``kill -9`` leaves
    the temporary behind for :func:`remove_stale_temporaries`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that killed saves left in ``folder``; return the paths removed.

    A temporary is ``.<name>.tmp-<pid>-<8 hex>`` (:func:`temporary_path`). Those of a live process other than
    this one are kept (a concurrent save in progress); this process's own are removed, since a restarted job
    often gets its predecessor's pid (containers). Missing folder: nothing to do.

    Args:
        folder: a checkpoint folder (not searched recursively).

    Returns:
        The removed files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        m = _TMP_RE.match(entry.name)
        if m is None or not entry.is_file():
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and _pid_alive(pid):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
        log.info("removed %s, left by an interrupted checkpoint save", entry)
    return removed


# -- the stamp -----------------------------------------------------------------------------------------------
def stamp(checkpoint: Mapping[str, Any], app: str) -> dict[str, Any]:
    """A shallow copy of ``checkpoint`` with ``"moekit": {"app": app, "schema": SCHEMA_VERSION}`` added."""
    return {**checkpoint, CHECKPOINT_KEY: {"app": app, "schema": SCHEMA_VERSION}}


def check_stamp(checkpoint: Any, *, app: str | None, path: str | os.PathLike) -> None:
    """Raise unless ``checkpoint`` carries moekit's stamp for ``app`` with a schema this moekit reads.

    Args:
        checkpoint: the loaded object.
        app: the expected app; None accepts any app's stamp.
        path: the file, for the messages.

    Raises:
        NotMoekitCheckpointError: no stamp (not a moekit checkpoint, or one from before the stamp existed).
        ForeignCheckpointError: stamped by another app, or by a newer or unknown schema.
    """
    where = f" into app {app!r}" if app else ""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(CHECKPOINT_KEY), Mapping):
        raise NotMoekitCheckpointError(
            path,
            f"not a moekit checkpoint (it has no {CHECKPOINT_KEY!r} stamp naming its app and schema); "
            f"refusing to restore it{where}. A moekit checkpoint written before the stamp existed can be "
            "stamped once with pipelines.checkpointing.stamp_checkpoint_file(path, app=...)",
        )
    found = checkpoint[CHECKPOINT_KEY]
    schema = found.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool) or not 1 <= schema <= SCHEMA_VERSION:
        raise ForeignCheckpointError(
            path,
            f"checkpoint schema {schema!r}, but this moekit reads schemas 1..{SCHEMA_VERSION} "
            "(written by a newer moekit?)",
        )
    if app is not None and found.get("app") != app:
        raise ForeignCheckpointError(
            path, f"a checkpoint of app {found.get('app')!r}, not of app {app!r}; refusing to restore it"
        )


# -- reading -------------------------------------------------------------------------------------------------
def _check_complete(path: Path) -> None:
    """Raise IncompleteCheckpointError for an empty file or a zip archive without its end record."""
    size = path.stat().st_size
    if size == 0:
        raise IncompleteCheckpointError(
            path, "incomplete: the file is empty (0 bytes); the save or copy that wrote it was interrupted"
        )
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
    if head == _ZIP_MAGIC or len(head) < len(_ZIP_MAGIC):
        # torch.save writes a zip archive whose directory is at the end: a cut file has none
        if not zipfile.is_zipfile(path):
            raise IncompleteCheckpointError(
                path,
                f"incomplete: the file is truncated ({size} bytes, no zip end record); the save or copy "
                "that wrote it was interrupted",
            )


def _unsafe_globals(path: Path, allowed: Iterable[Any]) -> list[str]:
    names = {f"{getattr(a, '__module__', '')}.{getattr(a, '__qualname__', a)}" for a in allowed}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only used to improve the message
        return []
    return [g for g in found if g not in names]


def _load_unchecked(path: str | os.PathLike, safe_globals: Sequence[Any], map_location: Any) -> Any:
    """``torch.load(weights_only=True)`` with moekit's errors; the stamp is not looked at."""
    local = _is_local_file_protocol(path)
    p = Path(path) if local else path
    if local:
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {p}")
        _check_complete(p)
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            if local:
                return torch.load(p, map_location=map_location, weights_only=True)
            return _fsspec_load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(p, safe_globals) if local else []
        detail = f"it names {', '.join(names)}" if names else str(e).strip().splitlines()[-1]
        raise UnsafeCheckpointError(
            p,
            f"refused: {detail}, outside the allow-list of torch.load(weights_only=True); unpickling it "
            "could run code from the file, so nothing of it was loaded. If it is one of moekit's own types, "
            "add it to the app's allow-list of checkpoint types",
        ) from e
    except (EOFError, RuntimeError) as e:
        raise IncompleteCheckpointError(
            p, f"incomplete or damaged: the file cannot be read ({type(e).__name__}: {e})"
        ) from e


def load_checkpoint_file(
    path: str | os.PathLike,
    *,
    app: str | None,
    safe_globals: Sequence[Any] = (),
    map_location: Any = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and check its stamp before returning it.

    Args:
        path: local path or fsspec URL.
        app: the app the checkpoint must belong to (None: any moekit app).
        safe_globals: classes and functions besides torch's defaults (and those registered with
            ``torch.serialization.add_safe_globals``) that the pickle may name, e.g.
            ``[apps.lm.model.LMConfig]``.
        map_location: as ``torch.load``.

    Returns:
        The checkpoint dict.

    Raises:
        FileNotFoundError: no such file.
        IncompleteCheckpointError: empty, truncated or otherwise unreadable file.
        UnsafeCheckpointError: the pickle names a global outside the allow-list (nothing of it is run).
        NotMoekitCheckpointError, ForeignCheckpointError: see :func:`check_stamp`.
    """
    checkpoint = _load_unchecked(path, safe_globals, map_location)
    check_stamp(checkpoint, app=app, path=path)
    return checkpoint


def stamp_checkpoint_file(path: str | os.PathLike, *, app: str, safe_globals: Sequence[Any] = ()) -> None:
    """Add moekit's stamp for ``app`` to a checkpoint written before the stamp existed (atomically, in place).

    The file is read with ``weights_only=True`` like any other. A file already stamped for ``app`` is left
    unchanged; one stamped for another app is refused (:class:`ForeignCheckpointError`), and so is a file that
    is not a Lightning checkpoint (:class:`NotMoekitCheckpointError`).
    """
    checkpoint = _load_unchecked(path, safe_globals, "cpu")
    if isinstance(checkpoint, Mapping) and CHECKPOINT_KEY in checkpoint:
        check_stamp(checkpoint, app=app, path=path)
        return
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise NotMoekitCheckpointError(path, "not a Lightning checkpoint (no 'state_dict'); not stamped")
    atomic_save(stamp(checkpoint, app), path)


# -- the Lightning plugin ------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic, stamped saves; safe, checked loads (see the module docstring).

    Args:
        app: the app whose checkpoints this trainer writes and accepts (``checkpoint["moekit"]["app"]``).
        safe_globals: moekit types the app keeps in its checkpoints besides plain data and tensors (e.g. a
            config dataclass in the hyper-parameters), allowed under ``weights_only=True``.

    ``load_checkpoint`` always loads with ``weights_only=True``: a ``weights_only=False`` passed by the
    trainer (``Trainer.fit(..., weights_only=False)``) is ignored with a warning.
    """

    def __init__(self, *, app: str, safe_globals: Sequence[Any] = ()) -> None:
        super().__init__()
        if not app:
            raise ValueError("app must name the app whose checkpoints are written")
        self.app = app
        self.safe_globals = tuple(safe_globals)
        self._cleaned: set[Path] = set()
        self._warned_weights_only = False

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        stamped = stamp(checkpoint, self.app)
        if not _is_local_file_protocol(path):  # object stores: Lightning's fsspec transaction
            super().save_checkpoint(stamped, path)
            return
        folder = Path(path).absolute().parent
        if folder not in self._cleaned:
            remove_stale_temporaries(folder)
            self._cleaned.add(folder)
        atomic_save(stamped, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False and not self._warned_weights_only:
            log.warning("weights_only=False ignored: moekit loads checkpoints with weights_only=True only")
            self._warned_weights_only = True
        return load_checkpoint_file(
            path, app=self.app, safe_globals=self.safe_globals, map_location=map_location
        )
