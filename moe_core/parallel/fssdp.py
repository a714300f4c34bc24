"""Fully sharded sparse data parallelism (FSSDP). Hecate: arXiv 2502.02581.

From the paper [P: abstract; S: summaries; no public code]: every MoE layer's expert parameters and
their optimizer states are fully sharded over all devices (as ZeRO-3 / FSDP), but each iteration only the
experts a device will run are materialised on it (``SparseAllGather``), with a placement chosen from that
iteration's load in which hot experts get replicas; ``SparseReduceScatter`` sends each materialised expert's
gradient from exactly its hosts back to the owning shards.

Our reading / choices [D]:

* Sharding is *within* each expert: the flattened parameters of expert ``e`` (``P`` numbers) are split into
  ``W`` equal chunks (zero-padded), rank ``r`` holds chunk ``r`` of every expert: a ``(E, C)`` shard with
  ``C = ceil(P / W)``. The optimizer therefore only ever sees the shard (optimizer state fully sharded).
* :class:`FSSDPMoELayer` uses the *local-need* placement: a device hosts exactly the experts its own tokens
  select, so no token moves, hot experts are replicated on every device that uses them and cold ones are
  gathered nowhere. :func:`plan_placement` computes Hecate's load-driven placement with a slot budget
  (tokens would then be dispatched to replica hosts as in expert parallelism); it is used by the
  single-process reference and by ``moe_core.parallel.simulate``.
* The materialised experts are kept for backward by default; ``rematerialize=True`` re-gathers them in
  backward through activation checkpointing (less memory, twice the gather traffic), as Hecate does.
* Gradient convention as in expert parallelism: the reduce-scatter **sums** the contributions of all ranks;
  scale by ``1 / W`` (hooks from :func:`scale_fssdp_grads`) to match DDP-averaged dense gradients.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from moe_core.parallel.expert_parallel import _group_info, dedicated_group, stacked_parameter_names
from moe_core.types import MoEOutput

__all__ = [
    "FSSDPMoELayer",
    "PlacementPlan",
    "convert_to_fssdp",
    "ep_plan",
    "fsdp_plan",
    "plan_placement",
    "scale_fssdp_grads",
    "sparse_all_gather",
    "sparse_all_gather_reference",
    "sparse_reduce_scatter",
    "sparse_reduce_scatter_reference",
]


# ----------------------------------------------------------------------------------------------- placement


@dataclass
class PlacementPlan:
    """Which devices materialise which expert in one iteration.

    Attributes:
        hosts: ``hosts[e]`` the sorted device ids that hold a replica of expert ``e`` (empty: not needed).
        share: ``share[e]`` the fraction of expert ``e``'s tokens each of its hosts processes (``1/len``).
        device_load: ``(num_devices,)`` tokens processed per device under the plan.
    """

    hosts: list[list[int]]
    share: list[float]
    device_load: torch.Tensor

    @property
    def num_experts(self) -> int:
        return len(self.hosts)

    @property
    def num_devices(self) -> int:
        return int(self.device_load.numel())

    def replicas(self) -> torch.Tensor:
        """``(E,)`` number of hosts per expert."""
        return torch.tensor([len(h) for h in self.hosts], dtype=torch.long)

    def experts_on(self, device: int) -> list[int]:
        """Sorted expert ids materialised on ``device``."""
        return [e for e, h in enumerate(self.hosts) if device in h]

    def need_mask(self) -> torch.Tensor:
        """``(num_devices, E)`` bool: device ``d`` materialises expert ``e``."""
        m = torch.zeros(self.num_devices, self.num_experts, dtype=torch.bool)
        for e, h in enumerate(self.hosts):
            m[h, e] = True
        return m


def plan_placement(load: torch.Tensor, num_devices: int, slots: int) -> PlacementPlan:
    """Hecate-style heterogeneous placement of experts for one iteration [D: greedy reading].

    Every expert with load > 0 gets one replica; extra replicas go, one at a time, to the expert with the
    largest load per replica while that exceeds the mean device load and slots remain. Replicas are then
    assigned longest-first to the least-loaded device with a free slot that does not hold that expert yet.

    Args:
        load: ``(E,)`` tokens (or (token, slot) pairs) routed to each expert this iteration, >= 0.
        num_devices: number of devices.
        slots: how many experts a device may materialise at once.

    Returns:
        The plan. Uniform load with ``E = num_devices * slots`` gives one replica per expert (expert
        parallelism); :func:`fsdp_plan` is the other extreme.
    """
    load = torch.as_tensor(load, dtype=torch.float64).reshape(-1)
    if num_devices < 1 or slots < 1:
        raise ValueError(f"num_devices and slots must be >= 1, got num_devices={num_devices}, slots={slots}")
    if (load < 0).any() or not torch.isfinite(load).all():
        raise ValueError("load must be finite and non-negative")
    e_total = load.numel()
    active = [e for e in range(e_total) if load[e] > 0]
    if len(active) > num_devices * slots:
        raise ValueError(
            f"{len(active)} experts have load but only num_devices*slots = {num_devices * slots} slots exist"
        )
    reps = {e: 1 for e in active}
    free = num_devices * slots - len(active)
    target = float(load.sum()) / num_devices
    while free > 0 and active:
        e = max((x for x in active if reps[x] < num_devices), key=lambda x: load[x] / reps[x], default=None)
        if e is None or load[e] / reps[e] <= target:
            break
        reps[e] += 1
        free -= 1
    items = sorted(
        ((float(load[e]) / reps[e], e) for e in active for _ in range(reps[e])), key=lambda t: (-t[0], t[1])
    )
    dev_load = [0.0] * num_devices
    dev_used = [0] * num_devices
    hosts: list[list[int]] = [[] for _ in range(e_total)]
    for w, e in items:
        cands = [d for d in range(num_devices) if dev_used[d] < slots and d not in hosts[e]]
        d = min(cands, key=lambda d: (dev_load[d], d))
        hosts[e].append(d)
        dev_load[d] += w
        dev_used[d] += 1
    return PlacementPlan(
        hosts=[sorted(h) for h in hosts],
        share=[1.0 / len(h) if h else 0.0 for h in hosts],
        device_load=torch.tensor(dev_load, dtype=torch.float64),
    )


def ep_plan(load: torch.Tensor, num_devices: int) -> PlacementPlan:
    """Plain expert parallelism: expert ``e`` lives on device ``e // (E / n)`` (E divisible by n)."""
    load = torch.as_tensor(load, dtype=torch.float64).reshape(-1)
    e_total = load.numel()
    if e_total % num_devices:
        raise ValueError(f"E={e_total} must be divisible by num_devices={num_devices}")
    per = e_total // num_devices
    hosts = [[e // per] for e in range(e_total)]
    dev = torch.zeros(num_devices, dtype=torch.float64).index_add_(0, torch.arange(e_total) // per, load)
    return PlacementPlan(hosts=hosts, share=[1.0] * e_total, device_load=dev)


def fsdp_plan(load: torch.Tensor, num_devices: int) -> PlacementPlan:
    """FSDP over experts: every expert materialised on every device (tokens stay where they are)."""
    load = torch.as_tensor(load, dtype=torch.float64).reshape(-1)
    hosts = [list(range(num_devices)) for _ in range(load.numel())]
    dev = torch.full((num_devices,), float(load.sum()) / num_devices, dtype=torch.float64)
    return PlacementPlan(hosts=hosts, share=[1.0 / num_devices] * load.numel(), device_load=dev)


# ----------------------------------------------------------------------------- flattening and sharding


def flatten_experts(bank: nn.Module) -> tuple[torch.Tensor, list[tuple[str, torch.Size]]]:
    """Stack each expert's parameters into one row.

    Returns:
        ``flat (E, P)`` and the layout ``[(name, per-expert shape), ...]`` to undo it.
    """
    e_total = int(bank.num_experts)
    names = stacked_parameter_names(bank, e_total)
    params = dict(bank.named_parameters())
    layout = [(n, params[n].shape[1:]) for n in names]
    flat = torch.cat([params[n].detach().reshape(e_total, -1) for n in names], dim=1)  # (E, P)
    return flat, layout


def unflatten_experts(flat: torch.Tensor, layout: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """``flat (S, >=P)`` -> ``{name: (S, *shape)}`` (views; padding beyond P is ignored)."""
    out, start = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = flat[:, start : start + size].reshape(flat.shape[0], *shape)  # (S, *shape)
        start += size
    return out


def chunk_size(p: int, world_size: int) -> int:
    """Shard width ``C = ceil(P / W)``."""
    return -(-p // world_size)


def shard_rows(flat: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """``flat (E, P)`` -> this rank's ``(E, C)`` chunk (zero padded)."""
    c = chunk_size(flat.shape[1], world_size)
    padded = torch.nn.functional.pad(flat, (0, c * world_size - flat.shape[1]))  # (E, W*C)
    return padded[:, rank * c : (rank + 1) * c].clone()


# ---------------------------------------------------------------------------- single-process reference


def sparse_all_gather_reference(
    shards: list[torch.Tensor], hosts: list[list[int]]
) -> list[dict[int, torch.Tensor]]:
    """Reference SparseAllGather on lists of tensors.

    Args:
        shards: per device ``(E, C)`` its chunk of every expert.
        hosts: ``hosts[e]`` devices that materialise expert ``e`` (e.g. ``PlacementPlan.hosts``).

    Returns:
        Per device ``{e: (W*C,) full flat expert}`` for the experts it hosts.
    """
    out: list[dict[int, torch.Tensor]] = [{} for _ in shards]
    for e, hs in enumerate(hosts):
        full = torch.cat([s[e] for s in shards])  # (W*C,)
        for d in hs:
            out[d][e] = full.clone()
    return out


def sparse_reduce_scatter_reference(
    grads: list[dict[int, torch.Tensor]], n_experts: int, chunk: int
) -> list[torch.Tensor]:
    """Reference SparseReduceScatter: sum each expert's replica gradients and slice per owner.

    Args:
        grads: per device ``{e: (W*C,) gradient of its replica}``.
        n_experts: E.
        chunk: C.

    Returns:
        Per device ``(E, C)`` gradient of its shard (zero for experts nobody materialised).
    """
    w = len(grads)
    total = torch.zeros(
        n_experts, w * chunk, dtype=next((g.dtype for d in grads for g in d.values()), torch.float32)
    )
    for per_dev in grads:
        for e, g in per_dev.items():
            total[e] += g
    return [total[:, r * chunk : (r + 1) * chunk].clone() for r in range(w)]


# ------------------------------------------------------------------------------- distributed (gloo/nccl)


def _exchange_need(need: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-gather every rank's ``(E,)`` bool need mask -> ``(W, E)``."""
    _, world = _group_info(group)
    parts = [torch.empty_like(need, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(parts, need.to(torch.uint8), group=group)
    return torch.stack(parts).bool()  # (W, E)


def sparse_all_gather(shard: torch.Tensor, need_all: torch.Tensor, group: dist.ProcessGroup | None = None):
    """Materialise the experts this rank needs from everybody's shards (no autograd).

    Args:
        shard: ``(E, C)`` this rank's chunk of every expert.
        need_all: ``(W, E)`` bool, identical on all ranks: rank ``q`` needs expert ``e``.
        group: process group.

    Returns:
        ``(S, W*C)`` the full flat rows of the ``S`` experts with ``need_all[rank]`` (ascending ids).
    """
    rank, world = _group_info(group)
    ids = [need_all[q].nonzero().flatten() for q in range(world)]
    send = torch.cat([shard[i] for i in ids])  # (sum_q S_q, C): rank q gets our chunk of its experts
    s = int(ids[rank].numel())
    recv = shard.new_empty(world * s, shard.shape[1])  # (W*S, C)
    dist.all_to_all_single(recv, send, [s] * world, [int(i.numel()) for i in ids], group=group)
    c = shard.shape[1]
    return recv.reshape(world, s, c).transpose(0, 1).reshape(s, world * c)  # (S, W*C)


def sparse_reduce_scatter(
    grads: torch.Tensor, need_all: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Send each materialised expert's gradient chunks to their owners and sum them there (no autograd).

    Args:
        grads: ``(S, W*C)`` gradients of the experts this rank materialised (ids ``need_all[rank]``).
        need_all: ``(W, E)`` bool need masks of all ranks.
        group: process group.

    Returns:
        ``(E, C)`` gradient of this rank's shard: the sum over the ranks that materialised each expert.
    """
    rank, world = _group_info(group)
    ids = [need_all[q].nonzero().flatten() for q in range(world)]
    s = int(ids[rank].numel())
    c = grads.shape[1] // world
    send = grads.reshape(s, world, c).transpose(0, 1).reshape(world * s, c).contiguous()  # (W*S, C)
    counts = [int(i.numel()) for i in ids]
    recv = grads.new_empty(sum(counts), c)  # (sum_q S_q, C)
    dist.all_to_all_single(recv, send, counts, [s] * world, group=group)
    return grads.new_zeros(need_all.shape[1], c).index_add_(0, torch.cat(ids), recv)  # (E, C)


class _SparseAllGatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard, need_all, group):
        ctx.need_all, ctx.group = need_all, group
        return sparse_all_gather(shard, need_all, group)

    @staticmethod
    def backward(ctx, grad):
        return sparse_reduce_scatter(grad.contiguous(), ctx.need_all, ctx.group), None, None


class FSSDPMoELayer(nn.Module):
    """MoE layer with fully sharded experts that materialises only the experts its tokens select.

    Args:
        router: any moe_core router (replicated, dense: train it with DDP).
        experts: the full expert bank as a *template*; its weights are flattened, sharded and kept as the
            ``expert_shard`` parameter ``(E, C)``; the template keeps no storage and only supplies forward.
        shared_experts: optional module applied locally to every token (replicated, dense).
        shared_gate: optional ``nn.Linear(D, 1)`` sigmoid gate of the shared path.
        group: the sharding process group (``None``: world).
        rematerialize: re-gather experts in backward instead of keeping them (Hecate).

    ``last_stats`` after each forward: experts materialised, bytes received and sent by one sparse all-gather,
    bytes sent + received per training step (gathers and the reduce-scatter), bytes of the resident shard
    (parameters; optimizer states scale with it) and of the materialised experts (peak, per layer).
    """

    def __init__(
        self,
        *,
        router: nn.Module,
        experts: nn.Module,
        shared_experts: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        group: dist.ProcessGroup | None = None,
        rematerialize: bool = False,
    ) -> None:
        super().__init__()
        rank, world = _group_info(group)
        self.router, self.shared_experts, self.shared_gate = router, shared_experts, shared_gate
        self.group, self.rank, self.world_size, self.rematerialize = group, rank, world, rematerialize
        self.num_experts = int(experts.num_experts)
        flat, self.layout = flatten_experts(experts)  # (E, P)
        self.flat_size = flat.shape[1]
        self.chunk = chunk_size(self.flat_size, world)
        self.expert_shard = nn.Parameter(shard_rows(flat, rank, world))  # (E, C)
        template = copy.deepcopy(experts)
        for name, _ in self.layout:
            mod_name, _, attr = name.rpartition(".")
            mod = template.get_submodule(mod_name) if mod_name else template
            setattr(mod, attr, nn.Parameter(torch.empty(0), requires_grad=False))
        self._template = (template,)  # a tuple keeps it out of the module tree (no parameters, no state)
        self.last_stats: dict[str, float] = {}
        self._warmed: set[tuple[str, torch.dtype]] = set()
        self.register_state_dict_post_hook(_fssdp_full_state)
        self.register_load_state_dict_pre_hook(_fssdp_load_full_state)

    @classmethod
    def from_layer(cls, layer: nn.Module, *, group=None, rematerialize: bool = False) -> FSSDPMoELayer:
        """Shard a single-process ``MoELayer`` (identical weights on every rank)."""
        return cls(
            router=layer.router,
            experts=layer.experts,
            shared_experts=layer.shared_experts,
            shared_gate=getattr(layer, "shared_gate", None),
            group=group,
            rematerialize=rematerialize,
        )

    def _compute(self, shard, x, local_idx, weights, mask, need_all):
        rows = _SparseAllGatherFn.apply(shard, need_all, self.group)  # (S, W*C)
        params = unflatten_experts(rows, self.layout)  # {name: (S, ...)}
        template = self._template[0]
        if rows.shape[0] == 0:
            # nothing materialised here: stay in the graph so this rank joins the backward reduce-scatter
            # (square saves ``rows`` so that activation checkpointing recomputes, and re-gathers, here too)
            return x.new_zeros(x.shape) + rows.square().sum().to(x.dtype) * 0  # (N, D)
        template.num_experts = rows.shape[0]
        return functional_call(template, params, (x, local_idx, weights, mask))

    def _warm_up(self, x: torch.Tensor) -> None:
        """Run the bank once on one token outside the checkpointed region.

        Banks may probe kernels or cache decisions on their first call; inside the checkpoint that would
        make the recomputation save a different set of tensors than the original forward.
        """
        key = (x.device.type, x.dtype)
        if key in self._warmed or x.shape[0] == 0:
            return
        rows = torch.zeros(1, self.world_size * self.chunk, dtype=x.dtype, device=x.device)
        template = self._template[0]
        template.num_experts = 1
        idx = torch.zeros(1, 1, dtype=torch.long, device=x.device)
        with torch.no_grad():
            functional_call(template, unflatten_experts(rows, self.layout), (x[:1], idx, x.new_ones(1, 1)))
        self._warmed.add(key)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """x ``(B, T, D)`` or ``(N, D)`` (this rank's tokens) -> MoEOutput of the same shape (collective)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        routing = self.router(flat)
        used = routing.indices[routing.slot_mask()]
        need = torch.zeros(self.num_experts, dtype=torch.bool, device=x.device)
        need[used] = True
        need_all = _exchange_need(need, self.group)  # (W, E)
        remap = torch.cumsum(need.long(), 0) - 1  # global id -> row among materialised experts
        local_idx = remap[routing.indices].clamp_min(0)  # (N, K); masked placeholders may point anywhere
        weights = routing.weights.to(x.dtype)
        args = (self.expert_shard, flat, local_idx, weights, routing.mask, need_all)
        if self.rematerialize and torch.is_grad_enabled():
            self._warm_up(flat)
            out = checkpoint(self._compute, *args, use_reentrant=False)
        else:
            out = self._compute(*args)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        elt = self.expert_shard.element_size()
        s = int(need.sum())
        others = int(need_all.sum()) - s  # experts other ranks materialise: we send each our chunk
        gathers = 2 if self.rematerialize else 1
        recv_b = float(s * (self.world_size - 1) * self.chunk * elt)
        sent_b = float(others * self.chunk * elt)
        self.last_stats = {
            "experts_materialised": float(s),
            "bytes_gather_received": recv_b,  # one sparse all-gather
            "bytes_gather_sent": sent_b,
            # per training step: gathers (1, or 2 with re-materialisation) plus the reduce-scatter, which
            # moves the gather's bytes in the opposite direction; sent + received
            "bytes_step": (gathers + 1) * (recv_b + sent_b),
            "shard_bytes": float(self.expert_shard.numel() * elt),
            "materialised_bytes": float(s * self.world_size * self.chunk * elt),
        }
        return MoEOutput(output=out.reshape(shape), routing=routing)


def _fssdp_full_state(module: FSSDPMoELayer, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: gather the shards and emit full ``experts.<name>`` tensors (MoELayer keys)."""
    shard = state_dict.pop(f"{prefix}expert_shard").contiguous()
    parts = [torch.empty_like(shard) for _ in range(module.world_size)]
    dist.all_gather(parts, shard, group=module.group)
    flat = torch.cat(parts, dim=1)[:, : module.flat_size]  # (E, P)
    for name, t in unflatten_experts(flat, module.layout).items():
        state_dict[f"{prefix}experts.{name}"] = t.clone()


def _fssdp_load_full_state(
    module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
) -> None:
    """load_state_dict pre-hook: full ``experts.<name>`` tensors -> this rank's ``expert_shard``."""
    keys = [f"{prefix}experts.{name}" for name, _ in module.layout]
    if all(k in state_dict for k in keys):
        flat = torch.cat([state_dict.pop(k).reshape(module.num_experts, -1) for k in keys], dim=1)  # (E, P)
        state_dict[f"{prefix}expert_shard"] = shard_rows(flat, module.rank, module.world_size)


def scale_fssdp_grads(module: nn.Module, factor: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Multiply the gradient of every ``expert_shard`` by ``factor`` (``1 / W`` to match DDP averaging)."""
    return [
        m.expert_shard.register_hook(lambda g, f=factor: g * f)
        for m in module.modules()
        if isinstance(m, FSSDPMoELayer)
    ]


def convert_to_fssdp(module: nn.Module, *, group=None, rematerialize: bool = False) -> list[str]:
    """Replace every ``MoELayer`` inside ``module`` (in place) by an :class:`FSSDPMoELayer`.

    All ranks must hold identical weights before the call. ``group=None`` creates a dedicated group over all
    ranks (a collective). Returns the converted layers' names.
    """
    from moe_core.layer import MoELayer

    group = dedicated_group(group)  # not DDP's group: see dedicated_group
    converted = []
    for name, child in list(module.named_modules()):
        if isinstance(child, MoELayer):
            parent_name, _, attr = name.rpartition(".")
            if not attr:
                raise ValueError("convert_to_fssdp needs a container module, got a bare MoELayer")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, FSSDPMoELayer.from_layer(child, group=group, rematerialize=rematerialize))
            converted.append(name)
    return converted
