"""Shared fixtures and spawn workers for the scale-out tests (imported by name from the spawned children).

pytest runs with ``--import-mode=importlib``, so test modules cannot be imported by name in spawned
processes; the tests put this folder on ``sys.path`` (spawn passes ``sys.path`` to the children) and
hand the workers below to ``torch.multiprocessing.spawn``.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket

import torch
import torch.distributed as dist
from torch import nn

from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer
from moe_core.routers import TopKRouter
from moe_core.types import RouterOutput

D, H, E, K = 8, 16, 8, 2
EMPTY_EXPERT = 3  # receives no token: its router row is pushed far down on a constant input feature
N_TOKENS = 14  # global tokens, split unevenly over ranks
STEPS = 3
BATCH_PER_RANK = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COLD_EXPERTS = (6, 7)  # with router kind "cold": never chosen (at 4 ranks, rank 3 receives no token)
DROPPED_ROWS = 4  # global tokens 0..3 have x[:, 1] = 5; router kind "cold" drops all their slots


class MaskingRouter(nn.Module):
    """Top-k router with a ``mask`` (exercises variable-k routing).

    ``masked``: drops the second slot when its weight is below 0.35. ``cold``: drops every slot of tokens
    with ``x[:, 1] > 4`` (at 4 ranks, rank 0 then needs no expert at all).
    """

    def __init__(self, inner: TopKRouter, kind: str) -> None:
        super().__init__()
        self.inner, self.dim, self.num_experts, self.kind = inner, inner.dim, inner.num_experts, kind

    def forward(self, x: torch.Tensor) -> RouterOutput:
        r = self.inner(x)
        mask = torch.ones_like(r.indices, dtype=torch.bool)
        if self.kind == "masked":
            mask[:, 1] = r.weights[:, 1] >= 0.35
        else:
            mask &= (x[:, 1] <= 4.0)[:, None]
        return RouterOutput(
            logits=r.logits, probs=r.probs, weights=r.weights * mask, indices=r.indices, mask=mask
        )


def build_layer(router_kind: str = "topk", seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    router = TopKRouter(dim=D, num_experts=E, top_k=K)
    with torch.no_grad():
        router.gate.weight[EMPTY_EXPERT] = 0.0
        router.gate.weight[EMPTY_EXPERT, 0] = -50.0  # x[:, 0] == 1 for every token
        if router_kind == "cold":
            for e in COLD_EXPERTS:
                router.gate.weight[e] = 0.0
                router.gate.weight[e, 0] = -50.0
    if router_kind in ("masked", "cold"):
        router = MaskingRouter(router, router_kind)
    shared = nn.Sequential(nn.Linear(D, H), nn.SiLU(), nn.Linear(H, D))
    return MoELayer(
        router=router,
        experts=SwiGLUExperts(num_experts=E, dim=D, hidden_dim=H),
        shared_experts=shared,
        shared_gate=True,
    )


def tokens(n: int = N_TOKENS, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    x[:, 0] = 1.0
    x[:DROPPED_ROWS, 1] = 5.0
    return x, torch.randn(n, D, generator=g)  # tokens and the upstream gradient of the output


class TinyNet(nn.Module):
    """in-proj -> MoE -> head: a small model with dense and expert parameters."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(D, D)
        self.moe = build_layer("topk", seed)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = torch.cat([torch.ones_like(h[:, :1]), h[:, 1:]], dim=1)
        return self.head(h + self.moe(h).output).squeeze(-1)


def train_batches(world: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, world * BATCH_PER_RANK, D, generator=g)
    return x, x[..., 1:3].sum(-1) ** 2  # (STEPS, world*B, D), (STEPS, world*B)


def reference_training(world: int) -> list[float]:
    """One process training on the concatenated batches of all ranks (the oracle)."""
    net = TinyNet().double()  # float64; SGD, not Adam: Adam would hide a wrong gradient scale
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    xs, ys = (t.double() for t in train_batches(world))
    losses = []
    for x, y in zip(xs, ys):
        loss = ((net(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _split(n: int, world: int) -> list[tuple[int, int]]:
    sizes = [n // world + (1 if r < n % world else 0) for r in range(world)]
    sizes = sizes[1:] + sizes[:1]  # uneven and not sorted
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    return bounds


def token_slices(world: int) -> list[tuple[int, int]]:
    return _split(N_TOKENS, world)


def _layer_grads(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in layer.named_parameters()
    }


def _distributed_layer_run(kind: str, router_kind: str, rank: int, world: int) -> dict:
    from moe_core.parallel import ExpertParallelMoELayer, FSSDPMoELayer

    full = build_layer(router_kind)
    if kind == "ep":
        layer = ExpertParallelMoELayer.from_layer(copy.deepcopy(full))
    else:
        layer = FSSDPMoELayer.from_layer(copy.deepcopy(full), rematerialize=(kind == "fssdp_remat"))
    x, g = tokens()
    lo, hi = token_slices(world)[rank]
    xl = x[lo:hi].clone().requires_grad_(True)
    out = layer(xl).output
    out.backward(g[lo:hi])
    grads = _layer_grads(layer)
    return {"out": out.detach(), "x_grad": xl.grad.clone(), "grads": grads, "stats": dict(layer.last_stats)}


def _distributed_training(kind: str, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moe_core.parallel import convert_to_expert_parallel, convert_to_fssdp, scale_expert_grads
    from moe_core.parallel.fssdp import scale_fssdp_grads

    net = TinyNet().double()
    if kind == "ep":
        convert_to_expert_parallel(net)
        scale_expert_grads(net, 1.0 / world)
        from moe_core.parallel import expert_parameter_names

        ignore = expert_parameter_names(net)
    else:
        convert_to_fssdp(net)
        scale_fssdp_grads(net, 1.0 / world)
        ignore = [n for n, _ in net.named_parameters() if n.endswith("expert_shard")]
    DDP._set_params_and_buffers_to_ignore_for_model(net, ignore)
    ddp = DDP(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    xs, ys = (t.double() for t in train_batches(world))
    losses = []
    for x, y in zip(xs, ys):
        sl = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        loss = ((ddp(x[sl]) - y[sl]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        glob = loss.detach().clone()
        dist.all_reduce(glob)
        losses.append(glob.item() / world)
    return {"losses": losses, "net": net}


def worker(rank: int, world: int, port: int, outdir: str, ckpt_in: str | None) -> None:
    """Run every distributed scenario and save this rank's results to ``outdir/rank{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        res: dict = {"layers": {}}
        for kind in ("ep", "fssdp", "fssdp_remat"):
            for router_kind in ("topk", "masked", "cold"):
                res["layers"][(kind, router_kind)] = _distributed_layer_run(kind, router_kind, rank, world)
        probe, _ = tokens(10, seed=3)
        for kind in ("ep", "fssdp"):
            tr = _distributed_training(kind, rank, world)
            res[f"train_{kind}"] = tr["losses"]
            state = tr["net"].state_dict()  # collective: gathers the expert shards
            with torch.no_grad():
                res[f"probe_{kind}"] = tr["net"](probe.double())
            if rank == 0 and kind == "ep":
                torch.save(
                    {"state_dict": state, "probe_out": res["probe_ep"]}, os.path.join(outdir, "ckpt.pt")
                )
        if ckpt_in is not None:
            from moe_core.parallel import convert_to_expert_parallel, convert_to_fssdp

            ck = torch.load(ckpt_in)
            for kind, convert in (("ep", convert_to_expert_parallel), ("fssdp", convert_to_fssdp)):
                net = TinyNet(seed=123).double()  # different init: everything must come from the checkpoint
                convert(net)
                net.load_state_dict(ck["state_dict"])  # full tensors -> this rank's shard
                with torch.no_grad():
                    res[f"loaded_probe_{kind}"] = net(probe.double())
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
