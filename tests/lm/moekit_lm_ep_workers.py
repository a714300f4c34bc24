"""Models, batch and spawn worker of ``test_lm_expert_parallel`` (imported by name in the spawned children).

pytest runs with ``--import-mode=importlib``, so test modules cannot be imported by name in spawned
processes; the test puts this folder on ``sys.path`` (spawn passes ``sys.path`` to the children), as
``tests/parallel`` does.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from apps.lm.model import LMConfig, TransformerLM

V, T, B = 23, 12, 4
SMALL = dict(vocab_size=V, context_len=T, dim=16, n_layers=3, n_heads=2, ffn_hidden=32, num_experts=4)
CONFIGS = {
    # DeepSeekMoE-style: dense first layer, fine-grained experts, a gated shared expert
    "deepseekmoe": dict(ffn="moe", top_k=2, expert_hidden=8, num_shared_experts=1, shared_gate=True,
                        first_dense_layers=1),
    # variable k: the router's mask travels through the all-to-all
    "top_p": dict(ffn="moe", router="top_p", router_kwargs={"threshold": 0.5}),
}


def build(name: str) -> TransformerLM:
    """The same float64 model on every process (seeded), with routers sharp enough to route unevenly."""
    torch.manual_seed(0)
    model = TransformerLM(config=LMConfig(**SMALL, **CONFIGS[name])).double()
    with torch.no_grad():
        for router in model.routers_by_name().values():
            router.gate.weight.normal_(0.0, 1.0)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))  # (B, T)
    return x, torch.roll(x, -1, dims=1)


def loss_of(logits: torch.Tensor, y: torch.Tensor, total: int) -> torch.Tensor:
    """Summed CE over these tokens / all tokens of the global batch: the ranks' gradients add up to the
    gradient of the global mean."""
    return F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="sum") / total


def rows(rank: int, world: int) -> slice:
    per = B // world
    return slice(rank * per, (rank + 1) * per)


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    """Convert each model to expert parallelism, run this rank's sequences forward and backward, save."""
    from moe_core.parallel import convert_to_expert_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        res = {}
        x, y = batch()
        for name in CONFIGS:
            model = build(name)
            converted = convert_to_expert_parallel(model)
            state = model.state_dict()  # collective: full (E, ...) expert tensors, single-process keys
            out = model(x[rows(rank, world)])
            loss_of(out.logits, y[rows(rank, world)], y.numel()).backward()
            res[name] = {
                "converted": converted,
                "layer_types": [type(b.ffn).__name__ for b in model.blocks],
                "logits": out.logits.detach(),
                "routing_names": [n for n, _ in out.routings],
                "routers_by_name": sorted(model.routers_by_name()),
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "state": state,
            }
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
