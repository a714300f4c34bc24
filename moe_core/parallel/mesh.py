"""2-D parallelism for MoE models and world-size-independent distributed checkpoints. GShard expert
parallelism: arXiv 2006.16668; the (data x expert) mesh layout follows DeepSpeed-MoE (arXiv 2201.05596)
[D: our reading]; FSDP2 of dense and expert parameters on different meshes follows torchtitan's MoE recipe
[D: our reading]. FSDP: arXiv 2304.11277.

A ``(dp, ep)`` device mesh: ranks ``[g*ep, (g+1)*ep)`` form expert-parallel group ``g`` (experts sharded
inside it, tokens moved by all-to-all, :mod:`moe_core.parallel.expert_parallel`), and the ``dp`` groups of
equal ep-rank across groups hold the same expert shard (data parallel across groups). Every rank sees its
own tokens, so dense parameters are data parallel over the whole world and expert shards over their dp group.
:meth:`MoEMesh.parallelize` offers two ways to train on it:

* ``fsdp=False`` (replicated): every rank holds every dense parameter and its expert shard;
  :func:`sync_grads_2d` sums gradients after ``backward`` (dense ones over the world, expert shards over their
  dp group).
* ``fsdp=True`` (FSDP2, ``torch.distributed.fsdp.fully_shard``): every expert bank is ``fully_shard``-ed over
  the **dp** sub-mesh (its ``(E/ep, ...)`` shard is split again over the dp group, all-gathered for the
  experts' forward and reduce-scattered over dp in backward), then every unit (each transformer block, then
  the root) is ``fully_shard``-ed for its dense parameters, on one of two meshes (``dense_shard``):
  ``"world"`` shards them over all ``dp * ep`` ranks (least memory; gradients reduce-scattered over the
  world), ``"dp"`` is HSDP on the ``(ep, dp)`` mesh: sharded over the dp sub-mesh and replicated over ep
  (parameter all-gathers stay inside a dp group; gradients reduce-scattered over dp and all-reduced over ep).
  FSDP does all gradient reduction; :func:`sync_grads_2d` is then a no-op. Gradients are **sums** in both
  modes (FSDP's divide factor is set to 1): with each rank's loss ``sum(local token losses) / global tokens``
  the result is exactly the single-process gradient of the mean loss on the concatenated batch.

Checkpoints (:func:`save_distributed`, :func:`load_distributed`) go through ``torch.distributed.checkpoint``
(DCP) in a layout that does not depend on the world size or the mode: the model's state dict with full shapes
(experts ``(E, ...)``) and the optimizer's per-parameter state keyed by parameter name. Replicated runs write
full tensors (expert shards and moments gathered over the ep group); FSDP runs write only their own shards,
as DTensors with global shapes (an expert shard is a ``(Shard(0), Shard(0))`` DTensor on the ``(ep, dp)``
mesh), so nothing is gathered. DCP reshards on load: a run saved on 4 ranks (EP 2 x DP 2, either mode)
resumes on 2 ranks or 1 process, in either mode, with the same parameters and optimizer state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from moe_core.parallel.expert_parallel import (
    ExpertParallelMoELayer,
    convert_to_expert_parallel,
    expert_parameter_names,
)

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
        expert_mesh: after ``parallelize(fsdp=True)``, the same ranks as an ``("ep", "dp")`` mesh: an expert
            tensor ``(E, ...)`` split over ep, then each piece over dp, is a ``(Shard(0), Shard(0))`` DTensor
            on it (the checkpoint layout of FSDP-sharded experts); else None.
    """

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.ep_group = mesh.get_group("ep")
        self.dp_group = mesh.get_group("dp")
        self.dp, self.ep = mesh.size(0), mesh.size(1)
        self.expert_mesh: Any = None

    def parallelize(
        self,
        model: nn.Module,
        *,
        fsdp: bool = False,
        dense_shard: Literal["world", "dp"] = "world",
        units: Sequence[nn.Module] | None = None,
    ) -> list[str]:
        """Convert every ``MoELayer`` of ``model`` to expert parallelism over this rank's ep group and, with
        ``fsdp``, apply FSDP2 (see the module docstring). Every rank calls it (collective) with identical
        weights.

        Args:
            model: the model (changed in place; with ``fsdp`` it becomes an ``FSDPModule``).
            fsdp: shard with ``fully_shard``; else parameters stay replicated (use :func:`sync_grads_2d`).
            dense_shard: ``"world"``: dense parameters sharded over all ranks; ``"dp"``: sharded over the dp
                sub-mesh and replicated over ep (HSDP). Only with ``fsdp``.
            units: modules that get their own ``fully_shard`` (their parameters gathered together), innermost
                first; default: the members of every ``nn.ModuleList`` child of ``model`` (the transformer
                blocks). The root is always a unit.

        Returns:
            The qualified names of the converted MoE layers.

        Raises:
            ValueError: unknown ``dense_shard``, or (with ``fsdp``) an expert bank with a parameter that is
                not stacked over experts (FSDP over dp would not reduce its gradient over ep).
        """
        if dense_shard not in ("world", "dp"):
            raise ValueError(f"dense_shard must be 'world' or 'dp', got {dense_shard!r}")
        converted = convert_to_expert_parallel(model, group=self.ep_group)
        if not fsdp:
            return converted
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        ranks = self.mesh.mesh  # (dp, ep) global ranks
        device = self.mesh.device_type
        # building a DeviceMesh creates its process groups: a collective, same order on every rank
        self.expert_mesh = DeviceMesh(device, ranks.T.contiguous(), mesh_dim_names=("ep", "dp"))
        if dense_shard == "world":
            dense_mesh = DeviceMesh(device, ranks.reshape(-1), mesh_dim_names=("dp_ep",))
        else:  # HSDP: fully_shard replicates over dim 0 and shards over dim 1
            dense_mesh = self.expert_mesh
        if units is None:
            units = [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]
        for name, mod in model.named_modules():
            if isinstance(mod, ExpertParallelMoELayer):
                stacked = set(mod.stacked_parameter_names)
                other = [n for n, _ in mod.experts.named_parameters() if n not in stacked]
                if other:
                    raise ValueError(
                        f"{name}.experts has parameters not stacked over experts ({other}); FSDP over dp "
                        "would not reduce their gradients over ep"
                    )
                fully_shard(mod.experts, mesh=self.mesh["dp"])
        for unit in units:
            fully_shard(unit, mesh=dense_mesh)
        fully_shard(model, mesh=dense_mesh)
        from torch.distributed.fsdp import FSDPModule

        for mod in model.modules():
            if isinstance(mod, FSDPModule):
                mod.set_gradient_divide_factor(1.0)  # sums, as sync_grads_2d
        log.info(
            "FSDP2: %d expert banks over dp=%d, %d units + root over %s",
            len(converted),
            self.dp,
            len(units),
            "the world" if dense_shard == "world" else f"dp={self.dp} (replicated over ep)",
        )
        return converted


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


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sync_grads_2d(model: nn.Module, mesh: MoEMesh) -> None:
    """Sum gradients: replicated parameters over the world, expert shards over their dp group (in place).

    Call after ``backward`` with each rank's loss ``= sum of its token losses / tokens of the global batch``.
    A no-op for a model parallelized with ``fsdp=True`` (FSDP reduced the gradients in backward).
    """
    if _is_fsdp(model):
        return
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
    """World-size-independent training state of a replicated (not FSDP) model: ``{"model": full state dict,
    "optim": {param name: {key: tensor}}, "optim_groups": [hyper-parameters]}``; expert moments gathered to
    ``(E, ...)``. Every rank of the ep group must call it (collective)."""
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


def _state_entries(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``{state-dict key: (module, attribute)}`` for every parameter and persistent buffer, the keys
    ``model.state_dict()`` would have, found without running state-dict hooks (the expert-parallel gather
    hook does not take FSDP's DTensors)."""
    out: dict[str, tuple[nn.Module, str]] = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        pre = f"{prefix}." if prefix else ""
        for n, p in mod._parameters.items():
            if p is not None:
                out[pre + n] = (mod, n)
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                out[pre + n] = (mod, n)
    return out


def _sharded_training_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: MoEMesh) -> dict:
    """The :func:`full_training_state` layout (minus ``optim_groups``) for an FSDP model, as DTensors with
    global shapes that view this rank's shards (no gather): dense parameters and moments are FSDP's own
    DTensors; an expert shard becomes a ``(Shard(0), Shard(0))`` DTensor on ``mesh.expert_mesh``."""
    from torch.distributed.tensor import DTensor, Shard

    experts = set(expert_parameter_names(model))

    def view(name: str, t: Any) -> Any:
        if name not in experts or not isinstance(t, DTensor):
            return t.detach() if torch.is_tensor(t) else t
        full = (t.shape[0] * mesh.ep, *t.shape[1:])  # (E, ...): FSDP's global shape is the ep shard's
        return DTensor.from_local(
            t.to_local().detach(),
            mesh.expert_mesh,
            (Shard(0), Shard(0)),
            run_check=False,
            shape=torch.Size(full),
            stride=torch.empty(full, device="meta").stride(),
        )

    entries = _state_entries(model)
    state: dict[str, Any] = {"model": {k: view(k, getattr(m, a)) for k, (m, a) in entries.items()}}
    if optimizer is not None:
        by_param = {p: n for n, p in model.named_parameters()}
        state["optim"] = {
            by_param[p]: {k: view(by_param[p], v) for k, v in s.items()} for p, s in optimizer.state.items()
        }
    return state


def _check_mesh(model: nn.Module, mesh: MoEMesh | None) -> bool:
    fsdp = _is_fsdp(model)
    if fsdp and (mesh is None or mesh.expert_mesh is None):
        raise ValueError("a model parallelized with fsdp=True needs mesh= (the MoEMesh that parallelized it)")
    return fsdp


def save_distributed(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ep_group: dist.ProcessGroup | None = None,
    *,
    mesh: MoEMesh | None = None,
) -> None:
    """Write the training state with ``torch.distributed.checkpoint`` to the folder ``path`` (every rank calls
    it; replicated entries are written once).

    Args:
        path: the checkpoint folder.
        model: replicated (``ep_group``, or ``mesh``, names its ep group) or FSDP (``mesh`` required).
        optimizer: its per-parameter state is saved too.
        ep_group: the ep group of a replicated model (ignored when ``mesh`` is given).
        mesh: the :class:`MoEMesh` that parallelized ``model``.
    """
    import torch.distributed.checkpoint as dcp

    if _check_mesh(model, mesh):
        state = _sharded_training_state(model, optimizer, mesh)
    else:
        state = full_training_state(model, optimizer, mesh.ep_group if mesh is not None else ep_group)
        state.pop("optim_groups", None)  # plain Python values: kept in the optimizer config, not in DCP
    dcp.save(state, checkpoint_id=path)
    log.info("distributed checkpoint written to %s", path)


def load_distributed(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ep_group: dist.ProcessGroup | None = None,
    *,
    mesh: MoEMesh | None = None,
) -> None:
    """Load a :func:`save_distributed` folder at any world size and in either mode (a collective).

    A replicated model reads full tensors and slices its expert shards (model and optimizer moments); an FSDP
    model reads only its own shards (DCP reshards). The optimizer must have taken no step yet or have state
    for every parameter; missing state is created by a zero-learning-rate dry step first.

    Args:
        path: the checkpoint folder.
        model, optimizer, ep_group, mesh: as in :func:`save_distributed`.
    """
    import torch.distributed.checkpoint as dcp

    if optimizer is not None and not optimizer.state:
        _init_optimizer_state(model, optimizer)
    if _check_mesh(model, mesh):
        _load_sharded(path, model, optimizer, mesh)
        return
    ep_group = mesh.ep_group if mesh is not None else ep_group
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


@torch.no_grad()
def _load_sharded(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None, mesh: MoEMesh
) -> None:
    """DCP-load into views of this rank's shards, then copy them into the FSDP parameters and moments."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    template = _sharded_training_state(model, optimizer, mesh)
    dcp.load(template, checkpoint_id=path)

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    for key, (mod, attr) in _state_entries(model).items():
        local(getattr(mod, attr)).copy_(local(template["model"][key]))
    if optimizer is None:
        return
    params = dict(model.named_parameters())
    for name, s in template["optim"].items():
        target = optimizer.state[params[name]]
        for k, v in s.items():
            if torch.is_tensor(v):
                local(target[k]).copy_(local(v))
            else:
                target[k] = v


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
