"""Expert parallelism: experts sharded across ranks, tokens moved with all-to-all. GShard: arXiv 2006.16668.

The layer follows GShard / DeepSpeed-MoE expert parallelism [P]: every rank of the expert-parallel (EP)
group owns a contiguous block of ``E / W`` experts; each rank routes its own tokens, sends every (token, slot)
pair to the rank that owns the chosen expert with ``all_to_all_single`` (uneven split sizes, counts exchanged
first), the owner runs the same grouped dispatch as the single-process layer (the expert bank's ``forward``
on the received rows), and a second all-to-all returns the results, which are weighted and summed at the
source. Our reading / choices:

* Combine weights never travel: results are multiplied by the routing weights on the source rank, so routing
  gradients stay local and only activations cross the wire (2 all-to-alls forward, 2 backward).
* Gradient convention: an expert's gradient on its owner is the **sum** of the contributions of every rank's
  loss. Dense parameters under DDP are **averaged** over ranks; to train exactly like one process on the
  concatenated batch, scale expert gradients by ``1 / W`` (see :func:`scale_expert_grads`).
* ``state_dict()`` gathers the expert shards and returns the same keys and full ``(E, ...)`` shapes as a
  single-process :class:`~moe_core.layer.MoELayer`; ``load_state_dict`` accepts full tensors and keeps this
  rank's slice. So checkpoints move freely between world sizes. Every rank must call ``state_dict()``
  (it is a collective).
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
from torch import nn

from moe_core.types import MoEOutput

log = logging.getLogger(__name__)

__all__ = [
    "ExpertParallelMoELayer",
    "convert_to_expert_parallel",
    "dedicated_group",
    "expert_parameter_names",
    "scale_expert_grads",
    "shard_expert_bank",
]


def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group")
    return dist.get_rank(group), dist.get_world_size(group)


def stacked_parameter_names(bank: nn.Module, num_experts: int) -> list[str]:
    """Names of the bank's parameters stacked over experts (leading dimension ``num_experts``)."""
    names = [n for n, p in bank.named_parameters() if p.dim() >= 1 and p.shape[0] == num_experts]
    if not names:
        raise ValueError(
            f"expert bank {type(bank).__name__} has no parameter with leading dim E={num_experts}"
        )
    return names


def shard_expert_bank(bank: nn.Module, *, rank: int, world_size: int) -> nn.Module:
    """Copy of ``bank`` holding only experts ``[rank*E/W, (rank+1)*E/W)``.

    Works for any bank whose per-expert parameters are stacked on dim 0 and whose ``num_experts`` attribute
    is the number of experts it dispatches to (``SwiGLUExperts``, ``MLPExperts``).

    Args:
        bank: the full expert bank (E experts), identical on every rank.
        rank: this rank in the EP group.
        world_size: W, the EP group size; must divide E.

    Returns:
        A new bank with ``num_experts = E / W`` and sliced parameters (copies, not views).
    """
    num_experts = int(bank.num_experts)
    if num_experts % world_size:
        raise ValueError(f"num_experts={num_experts} must be divisible by the EP world size {world_size}")
    local = num_experts // world_size
    names = stacked_parameter_names(bank, num_experts)
    shard = copy.deepcopy(bank)
    for name in names:
        mod_name, _, attr = name.rpartition(".")
        mod = shard.get_submodule(mod_name) if mod_name else shard
        full = getattr(mod, attr)
        setattr(mod, attr, nn.Parameter(full.detach()[rank * local : (rank + 1) * local].clone()))
    shard.num_experts = local
    return shard


class _AllToAllNoGrad:
    """Helpers for the non-differentiable metadata exchange."""

    @staticmethod
    def counts(send: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        return recv

    @staticmethod
    def rows(
        send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None
    ) -> torch.Tensor:
        recv = send.new_empty((sum(recv_splits), *send.shape[1:]))
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
        return recv


class _AllToAllRows(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` over rows with uneven splits; backward swaps the splits.

    (``torch.distributed.nn.functional.all_to_all_single`` does the same but is deprecated in torch 2.13.)
    """

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _AllToAllNoGrad.rows(x.contiguous(), send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return (
            _AllToAllNoGrad.rows(grad.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group),
            None,
            None,
            None,
        )


class ExpertParallelMoELayer(nn.Module):
    """MoE layer whose routed experts are sharded over an expert-parallel process group.

    Args:
        router: any moe_core router ``(N, D) -> RouterOutput`` (replicated; a dense parameter).
        experts: this rank's expert bank holding ``E / W`` experts (see :func:`shard_expert_bank`).
        num_experts: E, the global number of routed experts.
        shared_experts: optional module applied locally to every token (replicated, dense).
        shared_gate: optional ``nn.Linear(D, 1)`` sigmoid gate of the shared path (Qwen2-MoE).
        group: the EP process group (``None``: the default world group).

    After each forward, ``last_stats`` holds this rank's bytes sent/received by the token all-to-alls in
    forward, the bytes sent + received per training step (backward moves the same rows back) and the rows
    it computed.
    """

    def __init__(
        self,
        *,
        router: nn.Module,
        experts: nn.Module,
        num_experts: int,
        shared_experts: nn.Module | None = None,
        shared_gate: nn.Module | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        rank, world = _group_info(group)
        if num_experts % world:
            raise ValueError(f"num_experts={num_experts} must be divisible by the EP world size {world}")
        if int(experts.num_experts) != num_experts // world:
            raise ValueError(
                f"experts must hold num_experts / world = {num_experts // world} experts, "
                f"got {experts.num_experts}"
            )
        self.router, self.experts, self.shared_experts, self.shared_gate = (
            router,
            experts,
            shared_experts,
            shared_gate,
        )
        self.num_experts, self.group, self.rank, self.world_size = num_experts, group, rank, world
        self.local_experts = num_experts // world
        self.stacked_parameter_names = stacked_parameter_names(experts, self.local_experts)
        self.last_stats: dict[str, float] = {}
        self.register_state_dict_post_hook(_gather_expert_state)
        self.register_load_state_dict_pre_hook(_slice_expert_state)

    @classmethod
    def from_layer(
        cls, layer: nn.Module, *, group: dist.ProcessGroup | None = None
    ) -> ExpertParallelMoELayer:
        """Shard a single-process :class:`~moe_core.layer.MoELayer` (same weights on every rank).

        The router, shared experts and shared gate are reused (not copied); the expert bank is sliced.
        """
        rank, world = _group_info(group)
        return cls(
            router=layer.router,
            experts=shard_expert_bank(layer.experts, rank=rank, world_size=world),
            num_experts=int(layer.experts.num_experts),
            shared_experts=layer.shared_experts,
            shared_gate=getattr(layer, "shared_gate", None),
            group=group,
        )

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """x ``(B, T, D)`` or ``(N, D)`` (this rank's tokens) -> MoEOutput of the same shape.

        All ranks of the group must call forward the same number of times (it is a collective).
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        routing = self.router(flat)
        out = self.routed(flat, routing.indices, routing.weights.to(x.dtype), routing.mask)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        return MoEOutput(output=out.reshape(shape), routing=routing)

    def routed(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Expert-parallel equivalent of ``experts(x, indices, weights, mask)`` for the global bank.

        Args:
            x: ``(N, D)`` this rank's tokens.
            indices: ``(N, K)`` global expert ids.
            weights: ``(N, K)`` combine weights.
            mask: ``(N, K)`` bool used slots, or None.

        Returns:
            ``(N, D)`` sum over used slots of ``weights * expert(x)``.
        """
        n, k = indices.shape
        flat = indices.reshape(-1)  # (N*K,)
        w = weights.reshape(-1).to(x.dtype)  # (N*K,)
        tok = torch.arange(n, device=x.device).repeat_interleave(k)  # (N*K,)
        if mask is not None:
            keep = mask.reshape(-1)
            flat, w, tok = flat[keep], w[keep], tok[keep]
        # sorting by global expert id also groups the pairs by destination rank (contiguous ownership)
        order = flat.argsort(stable=True)
        flat, w, tok = flat[order], w[order], tok[order]
        dest = torch.div(flat, self.local_experts, rounding_mode="floor")  # (P,)
        send_counts = torch.bincount(dest, minlength=self.world_size)  # (W,)
        recv_counts = _AllToAllNoGrad.counts(send_counts, self.group)  # (W,)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        local_ids = _AllToAllNoGrad.rows(
            flat - dest * self.local_experts, send_splits, recv_splits, self.group
        )
        xs = x[tok]  # (P, D) pairs grouped by destination rank
        recv_x = _AllToAllRows.apply(xs, send_splits, recv_splits, self.group)  # (R, D)
        ones = recv_x.new_ones(recv_x.shape[0], 1)  # (R, 1): every received row is its own 1-slot token
        ys = self.experts(recv_x, local_ids[:, None], ones)  # (R, D)
        if recv_x.requires_grad and recv_x.shape[0] == 0:
            # no row arrived: keep the graph connected so that this rank joins the backward all-to-alls
            # (a rank that skipped them would deadlock the others)
            ys = ys + recv_x.sum() * 0
        back = _AllToAllRows.apply(ys, recv_splits, send_splits, self.group)  # (P, D) in the order sent
        elt = x.element_size() * x.shape[1]
        sent = sum(c for r, c in enumerate(send_splits) if r != self.rank)
        received = sum(c for r, c in enumerate(recv_splits) if r != self.rank)
        self.last_stats = {
            "bytes_sent": float((sent + received) * elt),  # forward: dispatch sends + combine sends
            "bytes_received": float((received + sent) * elt),
            # per training step: backward moves the same rows in the opposite directions
            "bytes_step": float(4 * (sent + received) * elt),
            "rows_computed": float(sum(recv_splits)),
        }
        return x.new_zeros(n, x.shape[1]).index_add_(0, tok, back * w[:, None])


def _gather_expert_state(
    module: ExpertParallelMoELayer, state_dict: dict, prefix: str, local_metadata
) -> None:
    """state_dict post-hook: replace this rank's expert shards by the full ``(E, ...)`` tensors."""
    for name in module.stacked_parameter_names:
        key = f"{prefix}experts.{name}"
        shard = state_dict[key].contiguous()
        parts = [torch.empty_like(shard) for _ in range(module.world_size)]
        dist.all_gather(parts, shard, group=module.group)
        state_dict[key] = torch.cat(parts, dim=0)  # (E, ...)


def _slice_expert_state(
    module: ExpertParallelMoELayer,
    state_dict: dict,
    prefix: str,
    local_metadata,
    strict,
    missing,
    unexpected,
    errors,
) -> None:
    """load_state_dict pre-hook: accept full ``(E, ...)`` expert tensors and keep this rank's slice."""
    lo, hi = module.rank * module.local_experts, (module.rank + 1) * module.local_experts
    for name in module.stacked_parameter_names:
        key = f"{prefix}experts.{name}"
        if key in state_dict and state_dict[key].shape[0] == module.num_experts != module.local_experts:
            state_dict[key] = state_dict[key][lo:hi]


def dedicated_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``group``, or a new process group over all ranks when ``None`` (a collective call).

    The all-to-alls of backward must not share a process group with DDP's gradient all-reduce: DDP launches
    its bucketed all-reduces from autograd hooks, so the two kinds of collectives can be issued in different
    orders on different ranks and deadlock (observed with gloo). A dedicated group keeps them apart.
    """
    return dist.new_group(ranks=list(range(dist.get_world_size()))) if group is None else group


def convert_to_expert_parallel(module: nn.Module, *, group: dist.ProcessGroup | None = None) -> list[str]:
    """Replace every ``MoELayer`` inside ``module`` (in place) by an :class:`ExpertParallelMoELayer`.

    All ranks must hold identical weights before the call (same seed or a loaded checkpoint).

    Args:
        module: the model holding ``MoELayer`` children.
        group: the EP process group; ``None`` creates a new group over all ranks (see
            :func:`dedicated_group`; every rank must make the call).

    Returns:
        The qualified names of the converted layers.
    """
    from moe_core.layer import MoELayer

    group = dedicated_group(group)
    converted = []
    for name, child in list(module.named_modules()):
        if isinstance(child, MoELayer):
            parent_name, _, attr = name.rpartition(".")
            if not attr:
                raise ValueError("convert_to_expert_parallel needs a container module, got a bare MoELayer")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, ExpertParallelMoELayer.from_layer(child, group=group))
            converted.append(name)
    log.info("expert parallel: converted %d MoE layers", len(converted))
    return converted


def expert_parameter_names(module: nn.Module) -> list[str]:
    """Qualified names of all expert-sharded parameters (those that DDP must not all-reduce)."""
    names = []
    for mod_name, mod in module.named_modules():
        if isinstance(mod, ExpertParallelMoELayer):
            for p in mod.stacked_parameter_names:
                names.append(f"{mod_name}.experts.{p}" if mod_name else f"experts.{p}")
    return names


def scale_expert_grads(module: nn.Module, factor: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Register gradient hooks multiplying every expert-sharded gradient by ``factor`` (e.g. ``1 / W``).

    With DDP averaging the dense gradients, ``factor = 1 / W`` makes expert gradients match one process
    training on the concatenation of all ranks' batches with a mean loss.
    """
    params = dict(module.named_parameters())
    return [params[n].register_hook(lambda g, f=factor: g * f) for n in expert_parameter_names(module)]
