"""Subprocess of ``test_interrupts.py``: a small fit that prints ``step <global_step>`` at each training step.

Usage: ``python interrupt_fit.py OUT_DIR [--max-steps N] [--resume] [--slow-setup S] [--no-callback]``.
An epoch is 1,000 batches, so no validation (and no ``ModelCheckpoint`` save) happens before the test
signals the process. ``--resume`` continues from ``OUT_DIR/last.ckpt``; ``--slow-setup`` prints ``setup``
and sleeps in ``LightningModule.setup`` (a signal before training); ``--no-callback`` runs without
``InterruptCheckpoint`` (Lightning's own handling, to show what the test catches).
"""

from __future__ import annotations

import argparse
import signal
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipelines.checkpointing import AtomicCheckpointIO
from pipelines.interrupts import InterruptCheckpoint


class SlowModule(L.LightningModule):
    def __init__(self, slow_setup: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.slow_setup = slow_setup

    def setup(self, stage: str) -> None:
        if self.slow_setup:
            print("setup", flush=True)
            time.sleep(self.slow_setup)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201 - Lightning hook
        print(f"step {self.global_step}", flush=True)
        time.sleep(0.02)
        x, y = batch
        return nn.functional.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201 - Lightning hook
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.layer(x).squeeze(-1), y))

    def configure_optimizers(self):  # noqa: ANN201 - Lightning hook
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--max-steps", type=int, default=100_000)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--slow-setup", type=float, default=0.0)
    p.add_argument("--no-callback", action="store_true")
    args = p.parse_args()
    # act like a process started from a terminal: a shell that runs the test suite in the background (nohup,
    # `cmd &` in CI) starts children with SIGINT ignored, and InterruptCheckpoint rightly leaves ignored
    # signals alone
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    x = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, x.sum(-1))
    callbacks = [ModelCheckpoint(dirpath=args.out_dir, save_last=True)]
    if not args.no_callback:
        callbacks.append(InterruptCheckpoint(dirpath=args.out_dir))
    trainer = L.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO(app="toy")],
        callbacks=callbacks,
    )
    trainer.fit(
        SlowModule(args.slow_setup),
        train_dataloaders=DataLoader(data, batch_size=4),
        val_dataloaders=DataLoader(data, batch_size=1000),
        ckpt_path=f"{args.out_dir}/last.ckpt" if args.resume else None,
    )


if __name__ == "__main__":
    main()
