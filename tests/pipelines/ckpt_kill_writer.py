"""Subprocess of ``test_checkpointing.py``: fits a model whose checkpoints are ~50 MB, saving ``last.ckpt``
and a step checkpoint after every step, until it is killed; it resumes from ``OUT_DIR/last.ckpt`` if any.

Usage: ``python ckpt_kill_writer.py OUT_DIR {atomic,plain}`` (``plain``: Lightning's default
TorchCheckpointIO, to show what the test catches without :class:`pipelines.checkpointing.AtomicCheckpointIO`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipelines.checkpointing import AtomicCheckpointIO


class BigModule(L.LightningModule):
    """A 2048x2048 linear layer: 16 MB of weights, 48 MB with Adam's moments."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2048, 2048)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201 - Lightning hook
        (x,) = batch
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):  # noqa: ANN201 - Lightning hook
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def main(out_dir: str, io: str) -> None:
    torch.set_num_threads(1)
    data = DataLoader(TensorDataset(torch.randn(4, 2048)), batch_size=2)
    trainer = L.Trainer(
        max_steps=10_000,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO(app="toy") if io == "atomic" else TorchCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=out_dir, every_n_train_steps=1, save_top_k=1, save_last=True)],
    )
    last = Path(out_dir) / "last.ckpt"  # a killed job resumes, as `moekit ... --ckpt_path last` does
    trainer.fit(BigModule(), train_dataloaders=data, ckpt_path=last if last.exists() else None)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
