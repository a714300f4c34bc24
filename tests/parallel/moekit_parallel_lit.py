"""A tiny LightningModule for the strategy test (module level so that spawned children can unpickle it)."""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from moekit_parallel_workers import BATCH_PER_RANK, D, TinyNet, train_batches

__all__ = ["BATCH_PER_RANK", "LitTiny", "lightning_data"]


def lightning_data(world: int) -> torch.utils.data.TensorDataset:
    """The batches of ``train_batches`` flattened: with ``DistributedSampler(shuffle=False)`` and
    ``BATCH_PER_RANK`` per rank, step ``s`` of all ranks covers exactly ``train_batches(world)[s]``."""
    xs, ys = train_batches(world)
    return torch.utils.data.TensorDataset(xs.reshape(-1, D).double(), ys.reshape(-1).double())


class LitTiny(L.LightningModule):
    """TinyNet (float64) trained with SGD + momentum on an MSE; records the mean loss over all ranks."""

    def __init__(self, loss_file: str | None = None, world: int = 1) -> None:
        super().__init__()
        self.world = world
        self.net = TinyNet().double()
        self.loss_file = loss_file
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.net(x) - y) ** 2).mean()
        glob = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(glob)
            glob /= dist.get_world_size()
        self.losses.append(glob.item())
        return loss

    def on_train_end(self) -> None:
        if self.loss_file and self.global_rank == 0:
            torch.save(self.losses, self.loss_file)

    def train_dataloader(self):
        # Lightning's automatic sampler always shuffles training data: build the unshuffled one ourselves
        # (the Trainer runs with use_distributed_sampler=False)
        data = lightning_data(self.world)
        sampler = torch.utils.data.DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
        )
        return torch.utils.data.DataLoader(data, batch_size=BATCH_PER_RANK, sampler=sampler)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
