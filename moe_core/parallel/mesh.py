"""2-D parallelism for MoE models and world-size-independent distributed checkpoints. GShard expert
parallelism: arXiv 2006.16668; the (data x expert) mesh layout follows DeepSpeed-MoE (arXiv 2201.05596)
[D: our reading].

A ``(dp, ep)`` device mesh: ranks ``[g*ep, (g+1)*ep)`` form expert-parallel group ``g`` (experts sharded
inside it, tokens moved by all-to-all, :mod:`moe_core.parallel.expert_parallel`), and the ``dp`` groups of
equal ep-rank across groups hold the same expert shard (data parallel across groups). Gradient sync
(:func:`sync_grads_2d`): replicated (dense) parameters are summed over the whole world, expert shards over
their dp group; with each rank's loss ``sum(local token losses) / global tokens`` the result is exactly the
single-process gradient of the mean loss on the concatenated batch. Dense parameters are replicated
(all-reduce data parallelism), not sharded: FSDP2 (``fully_shard``) over the dp dimension is not wired in.

Checkpoints (:func:`save_distributed`, :func:`load_distributed`) go through ``torch.distributed.checkpoint``
(DCP) in a layout that does not depend on the world size: the model's full state dict (expert-parallel layers
gather their shards) and the optimizer's per-parameter state keyed by parameter name, with expert moments
gathered over the ep group to their full ``(E, ...)`` shape. Loading slices every rank's shard back out, so a
run saved on 4 ranks (EP 2 x DP 2) resumes on 2 ranks or 1 process with the same parameters and optimizer
state.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_core.parallel.expert_parallel import convert_to_expert_parallel, expert_parameter_names

log = logging.getLogger(__name__)

__all__ = [
    "MoEMesh",
    "full_training_state",
    "init_moe_mesh",
    "load_distributed",
    "save_distributed",
    "sync_grads_2d",
]


class MoEMesh:
    """The process groups of a ``(dp, ep)`` mesh (built by :func:`init_moe_mesh`).

    Attributes:
        mesh: the ``torch.distributed.device_mesh.DeviceMesh`` with dims ``("dp", "ep")``.
        ep_group: this rank's expert-parallel group (size ``ep``).
        dp_group: this rank's data-parallel group (same ep-rank in every group; size ``dp``).
        ep, dp: the mesh sizes.
    """

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.ep_group = mesh.get_group("ep")
        self.dp_group = mesh.get_group("dp")
        self.dp, self.ep = mesh.size(0), mesh.size(1)

    def parallelize(self, model: nn.Module) -> list[str]:
        """Convert every ``MoELayer`` of ``model`` to expert parallelism over this rank's ep group."""
        return convert_to_expert_parallel(model, group=self.ep_group)


def init_moe_mesh(ep_size: int, *, device_type: str = "cpu") -> MoEMesh:
    """A ``(world / ep_size, ep_size)`` mesh over the initialised default process group (a collective).

    Raises:
        ValueError: ``ep_size`` does not divide the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the world size {world}")
    mesh = init_device_mesh(device_type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
    return MoEMesh(mesh)


def sync_grads_2d(model: nn.Module, mesh: MoEMesh) -> None:
    """Sum gradients: replicated parameters over the world, expert shards over their dp group (in place).

    Call after ``backward`` with each rank's loss ``= sum of its token losses / tokens of the global batch``.
    """
    experts = set(expert_parameter_names(model))
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if name in experts:
            if mesh.dp > 1:
                dist.all_reduce(p.grad, group=mesh.dp_group)
        else:
            dist.all_reduce(p.grad)


def _gather_dim0(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _slice_dim0(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return t
    w, r = dist.get_world_size(group), dist.get_rank(group)
    n = t.shape[0] // w
    return t[r * n : (r + 1) * n]


def full_training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, ep_group: dist.ProcessGroup | None = None
) -> dict[str, Any]:
    """World-size-independent training state: ``{"model": full state dict, "optim": {param name: {key:
    tensor}}, "optim_groups": [hyper-parameters]}``; expert moments gathered to ``(E, ...)``. Every rank
    of the ep group must call it (collective)."""
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is None:
        return state
    experts = set(expert_parameter_names(model))
    by_param = {p: n for n, p in model.named_parameters()}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    for p, s in optimizer.state.items():
        name = by_param[p]
        optim[name] = {
            k: (_gather_dim0(v, ep_group) if name in experts and torch.is_tensor(v) and v.dim() > 0 else v)
            for k, v in s.items()
        }
    state["optim"] = optim
    state["optim_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return state


def save_distributed(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
    ep_group: dist.ProcessGroup | None = None,
) -> None:
    """Write :func:`full_training_state` with ``torch.distributed.checkpoint`` to the folder ``path`` (every
    rank calls it; replicated entries are written once)."""
    import torch.distributed.checkpoint as dcp

    state = full_training_state(model, optimizer, ep_group)
    state.pop("optim_groups", None)  # plain Python values: kept in the optimizer config, not in DCP
    dcp.save(state, checkpoint_id=path)
    log.info("distributed checkpoint written to %s", path)


def load_distributed(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
    ep_group: dist.ProcessGroup | None = None,
) -> None:
    """Load a :func:`save_distributed` folder at any world size: full tensors are read, then this rank's
    expert shards (model and optimizer moments) are sliced out. The optimizer must have taken no step yet or
    have state for every parameter; missing state is created by a zero-learning-rate dry step first."""
    import torch.distributed.checkpoint as dcp

    if optimizer is not None and not optimizer.state:
        _init_optimizer_state(model, optimizer)
    template = full_training_state(model, optimizer, ep_group)
    template.pop("optim_groups", None)
    dcp.load(template, checkpoint_id=path)
    model.load_state_dict(template["model"])  # expert-parallel layers keep their slice
    if optimizer is None:
        return
    experts = set(expert_parameter_names(model))
    params = dict(model.named_parameters())
    for name, s in template["optim"].items():
        target = optimizer.state[params[name]]
        for k, v in s.items():
            if torch.is_tensor(v) and name in experts and v.dim() > 0:
                v = _slice_dim0(v, ep_group)
            target[k] = v.clone() if torch.is_tensor(v) else v


def _init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state tensors without changing any parameter (zero gradients, lr 0)."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
