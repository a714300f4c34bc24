"""SIGINT/SIGTERM during ``fit``: save a resumable ``last.ckpt`` at the next safe point, then exit non-zero.

Without this, Lightning turns SIGTERM into ``SIGTERMException`` (a ``SystemExit`` without code: exit
status 0) and Ctrl+C into ``sys.exit(1)``, saving nothing: a run stopped before its first validation loses
every step.

:class:`InterruptCheckpoint` (a Lightning callback) replaces the SIGINT and SIGTERM handlers while ``fit``
runs by one that only records the signal. At the end of the current training batch (where
``ModelCheckpoint(every_n_train_steps=...)`` saves, so Lightning resumes from it exactly) it saves
``<dirpath>/last.ckpt`` through ``trainer.save_checkpoint`` (hence through the trainer's checkpoint plugin,
e.g. :class:`pipelines.checkpointing.AtomicCheckpointIO`) and raises :class:`TrainingInterrupted`, a
``SystemExit`` whose code is ``128 + signum`` (130 for SIGINT, 143 for SIGTERM, as a shell reports a process
killed by that signal). Uncaught, it ends the process with that status; Lightning first runs its usual
interrupt handling (callbacks' ``on_exception``, loggers finalised as failed).

Where the signal lands:

* before training starts (data setup, restoring, sanity check): nothing was trained since the start or the
  resumed checkpoint, so nothing is saved; the process exits with ``128 + signum`` at the start of training;
* during a training batch, or during a validation run inside the epoch: saved after the current (or next)
  training batch;
* after the last training batch: saved at the end of training.

A second signal while waiting stops at once (SIGINT: ``KeyboardInterrupt``; SIGTERM: the default action, the
process is killed). Signals whose handler was ``SIG_IGN`` (e.g. under ``nohup``) stay ignored. With several
processes (DDP), the ranks agree at each batch end (one boolean all-reduce) so that all of them stop together.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

__all__ = ["InterruptCheckpoint", "TrainingInterrupted"]

log = logging.getLogger(__name__)


class TrainingInterrupted(SystemExit):
    """``fit`` stopped on a signal; ``code`` is ``128 + signum``.

    Attributes:
        signum: the signal received.
        checkpoint: the resumable checkpoint saved, or None when nothing had been trained since the start.
    """

    def __init__(self, signum: int, checkpoint: Path | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(128 + signum)

    def __str__(self) -> str:
        saved = (
            f"resumable checkpoint {self.checkpoint}"
            if self.checkpoint
            else "no checkpoint (nothing trained)"
        )
        return f"training interrupted by {signal.Signals(self.signum).name}; {saved}"


class InterruptCheckpoint(Callback):
    """Save ``<dirpath>/<filename>`` and exit with ``128 + signum`` when SIGINT or SIGTERM arrives during fit.

    Args:
        dirpath: the run's checkpoint folder (the one ``--ckpt_path last`` looks in).
        filename: the checkpoint's name; ``last.ckpt`` so that ``ModelCheckpoint(save_last=True)`` and
            ``ckpt_path="last"`` treat it as the last checkpoint.
        signals: the signals handled.
    """

    def __init__(
        self,
        *,
        dirpath: str | os.PathLike,
        filename: str = "last.ckpt",
        signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
    ) -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.signals = tuple(signals)
        self.received: int | None = None
        self._originals: dict[int, Any] = {}

    @property
    def path(self) -> Path:
        return self.dirpath / self.filename

    # -- handlers --------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # second signal: stop now
            self._restore()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        log.warning(
            "received %s: saving %s at the end of the current training batch, then exiting "
            "(send it again to stop at once)",
            signal.Signals(signum).name,
            self.path,
        )

    def _install(self) -> None:
        """Make our handler current (again: Lightning installs its own SIGTERM handler before running)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("InterruptCheckpoint: fit runs outside the main thread; signals are not handled")
            return
        for s in self.signals:
            current = signal.getsignal(s)
            if s not in self._originals:
                if current == signal.SIG_IGN:
                    continue
                self._originals[s] = current
            signal.signal(s, self._on_signal)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s, handler in self._originals.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._originals = {}

    # -- decisions -------------------------------------------------------------------------------------------
    def _stop_requested(self, trainer: L.Trainer) -> bool:
        local = self.received is not None
        if trainer.world_size > 1:
            return bool(trainer.strategy.reduce_boolean_decision(local, all=False))
        return local

    def _save_and_exit(self, trainer: L.Trainer, *, save: bool) -> None:
        signum = self.received if self.received is not None else int(signal.SIGTERM)  # another rank's signal
        path = None
        if save:
            path = self.path
            # ModelCheckpoint(save_last=True) in the same folder records it as its last checkpoint, so that a
            # resumed run keeps writing last.ckpt instead of a new last-v1.ckpt beside it
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                    if Path(cb.dirpath).absolute() == self.dirpath.absolute():
                        cb.last_model_path = str(path)
            trainer.save_checkpoint(path)
        exc = TrainingInterrupted(signum, path)
        log.warning("%s at global step %d; exiting with status %d", exc, trainer.global_step, exc.code)
        if path is not None:
            log.warning("resume with ckpt_path=%s (moekit: --ckpt_path last)", path)
        raise exc

    # -- hooks -----------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.received = None
            self._install()

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()
        if self._stop_requested(trainer):
            self._save_and_exit(trainer, save=False)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stop_requested(trainer):
            self._save_and_exit(trainer, save=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._stop_requested(trainer):
            self._save_and_exit(trainer, save=True)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()
