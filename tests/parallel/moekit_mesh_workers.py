"""Workers of ``test_parallel_mesh_dcp`` (imported by name in spawned children; the test puts this folder on
``sys.path``): a (dp, ep) mesh training step and distributed checkpoints saved and loaded at other world
sizes."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from apps.lm.model import LMConfig, TransformerLM

V, T, B = 23, 8, 4
CFG = dict(vocab_size=V, context_len=T, dim=16, n_layers=2, n_heads=2, ffn_hidden=16, ffn="moe",
           num_experts=4, top_k=2, expert_hidden=8, num_shared_experts=1)  # fmt: skip


def build() -> TransformerLM:
    """The same float64 model on every process, routers sharp enough to route unevenly."""
    torch.manual_seed(0)
    model = TransformerLM(config=LMConfig(**CFG)).double()
    with torch.no_grad():
        for router in model.routers_by_name().values():
            router.gate.weight.normal_(0.0, 1.0)
    return model


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(100 + step))  # (B, T)
    return x, torch.roll(x, -1, dims=1)


def local_loss(model: torch.nn.Module, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's sequences' summed CE / all tokens of the global batch (ranks' gradients add up)."""
    x, y = batch(step)
    per = B // world
    rows = slice(rank * per, (rank + 1) * per)
    logits = model(x[rows]).logits
    return F.cross_entropy(logits.reshape(-1, V), y[rows].reshape(-1), reduction="sum") / y.numel(), logits


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """A gradient as one process sees it: FSDP's DTensors gathered (an expert's: this ep rank's shard)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


def worker(
    rank: int,
    world: int,
    ep: int,
    port: int,
    outdir: str,
    step: int,
    load: str | None,
    mode: str = "replicated",
) -> None:
    """One training step ``step`` on a (world/ep, ep) mesh; optionally resume from ``load`` first; save a
    distributed checkpoint to ``outdir/ckpt`` and this rank's logits / gradients to ``outdir/rank<r>.pt``.

    ``mode``: ``replicated`` (gradients summed by ``sync_grads_2d``), ``fsdp_world`` or ``fsdp_dp`` (FSDP2
    with dense parameters sharded over the world or over dp, replicated over ep)."""
    from moe_core.parallel.mesh import init_moe_mesh, load_distributed, save_distributed, sync_grads_2d

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=90),
    )
    try:
        mesh = init_moe_mesh(ep)
        model = build()
        fsdp = mode != "replicated"
        converted = mesh.parallelize(model, fsdp=fsdp, dense_shard="dp" if mode == "fsdp_dp" else "world")
        opt = optimizer(model)
        if load:
            load_distributed(load, model, opt, mesh=mesh)
        loss, logits = local_loss(model, step, rank, world)
        loss.backward()
        sync_grads_2d(model, mesh)  # a no-op under FSDP
        grads = {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        save_distributed(os.path.join(outdir, "ckpt"), model, opt, mesh=mesh)
        local_numel = sum(_local(p).numel() for p in model.parameters())  # this rank's share of the weights
        torch.save(
            {
                "converted": converted,
                "logits": logits.detach(),
                "grads": grads,
                "numel": local_numel,
                "ep_rank": dist.get_rank(mesh.ep_group),
                "dp_rank": dist.get_rank(mesh.dp_group),
            },
            os.path.join(outdir, f"rank{rank}.pt"),
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()
