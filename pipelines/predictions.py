"""``moekit <app> predict`` writes its predictions: one table, written atomically into the run folder.

:class:`PredictionsWriter` is a Lightning ``BasePredictionWriter`` (``write_interval="epoch"``). At the end
of ``Trainer.predict`` it turns what the app's ``predict_step`` returned for every batch into one table and
writes ``<run folder>/predictions.parquet`` through a temporary file in the same folder and
:func:`os.replace` (a reader sees the old file or the whole new one), then prints its path.

What a ``predict_step`` may return per batch (the app decides its columns):

* a ``pandas.DataFrame``;
* a mapping ``{column: (B,) tensor | array | list}``;
* a tensor ``(B,)`` (column ``prediction``) or ``(B, C)`` (columns ``prediction_0`` ... ``prediction_{C-1}``).

With several predict dataloaders a ``dataloader_idx`` column says which one each row came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PREDICTIONS_FILE", "PredictionsWriter", "predictions_frame"]

PREDICTIONS_FILE = "predictions.parquet"


def _column(value: Any) -> np.ndarray | list:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.is_floating_point():
            value = value.float()
        return value.cpu().numpy()
    return value if isinstance(value, list) else np.asarray(value)


def _batch_frame(out: Any) -> pd.DataFrame:
    """One batch's ``predict_step`` output as a table (see the module docstring for the accepted kinds)."""
    if isinstance(out, pd.DataFrame):
        return out.reset_index(drop=True)
    if isinstance(out, Mapping):
        cols = {str(k): _column(v) for k, v in out.items()}
        bad = {k: np.shape(v) for k, v in cols.items() if np.ndim(v) > 1}
        if bad:
            raise ValueError(f"predict_step columns must be 1-D per batch, got shapes {bad}")
        return pd.DataFrame(cols)
    if isinstance(out, torch.Tensor | np.ndarray):
        arr = _column(out)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim == 1:
            return pd.DataFrame({"prediction": arr})
        if arr.ndim == 2:  # (B, C)
            return pd.DataFrame({f"prediction_{c}": arr[:, c] for c in range(arr.shape[1])})
        raise ValueError(f"predict_step returned a tensor of shape {tuple(arr.shape)}, not (B,) or (B, C)")
    raise TypeError(
        f"predict_step returned a {type(out).__name__}, not a DataFrame, a mapping of columns or a tensor"
    )


def predictions_frame(predictions: Sequence[Any]) -> pd.DataFrame:
    """``Trainer.predict``'s outputs (a list of batch outputs, or one such list per dataloader) as one table.

    Args:
        predictions: what ``BasePredictionWriter.write_on_epoch_end`` receives.

    Returns:
        The rows of every batch in order; with several dataloaders, a ``dataloader_idx`` column first.
    """
    nested = len(predictions) > 0 and all(isinstance(p, list) for p in predictions)
    per_loader = list(predictions) if nested else [list(predictions)]
    frames = []
    for i, outs in enumerate(per_loader):
        f = pd.concat([_batch_frame(o) for o in outs], ignore_index=True) if outs else pd.DataFrame()
        if len(per_loader) > 1:
            f.insert(0, "dataloader_idx", i)
        frames.append(f)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


class PredictionsWriter(BasePredictionWriter):
    """Writes ``Trainer.predict``'s outputs to ``<folder>/predictions.parquet`` atomically, prints the path.

    Args:
        folder: the run folder (``MoekitCLI.run_dir()``); created if missing.
        filename: the file's name in ``folder``.
    """

    def __init__(self, folder: str | os.PathLike, *, filename: str = PREDICTIONS_FILE) -> None:
        super().__init__(write_interval="epoch")
        self.path = Path(folder) / filename

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        if not trainer.is_global_zero:
            return
        frame = predictions_frame(predictions)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            frame.to_parquet(tmp, index=False)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # the command's result: its path on stdout, as `moekit register` prints the version it made
        print(f"predictions: {self.path} ({len(frame)} rows)", flush=True)
