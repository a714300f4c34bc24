"""Trace-driven cost model of MoE scale-out strategies. Hecate (FSSDP): arXiv 2502.02581.

Given a routing trace — per step, the number of (token, slot) pairs each device sends to each expert — the
model counts, per device and step, the bytes moved, the (token, slot) pairs computed (the slowest device
sets the step time) and the expert parameters materialised, for:

* ``ep``: plain expert parallelism, expert ``e`` lives on device ``e // (E / n)``; tokens move (all-to-all),
  parameters do not.
* ``fsdp``: FSDP / ZeRO-3 over the experts; every device gathers every expert (forward and again for
  backward) and reduce-scatters every gradient; tokens do not move.
* ``sparse``: sparse materialisation with local-need placement (what ``FSSDPMoELayer`` does): a device
  gathers only the experts its own tokens select; tokens do not move.
* ``hecate``: Hecate-style load-driven placement (:func:`~moe_core.parallel.fssdp.plan_placement` with a
  slot budget): hot experts are replicated, tokens go to a host of their expert (kept local when the device
  is itself a host, up to that host's share), parameters are sparsely gathered onto the hosts.

All of this is our reading [D]; the assumptions (bf16 payloads, re-materialisation for backward,
backward token traffic equal to forward, no overlap of communication and compute, a single bandwidth for
every link) are listed in ``docs/scaleout.md``. Nothing here is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from moe_core.parallel.fssdp import plan_placement
from moe_core.validation import check_choice

Strategy = Literal["ep", "fsdp", "sparse", "hecate"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)

__all__ = [
    "CostModel",
    "STRATEGIES",
    "bootstrap_trace",
    "record_router_trace",
    "simulate_step",
    "simulate_trace",
]


@dataclass(frozen=True)
class CostModel:
    """Sizes and machine constants of the model.

    Attributes:
        dim: D, model width (bytes per token activation = ``dim * bytes_per_elem``).
        hidden_dim: H, expert hidden width; a SwiGLU expert has ``3 * D * H`` parameters.
        bytes_per_elem: payload element size (2 for bf16).
        flops_per_param_pair: FLOPs per (token, slot) pair per expert parameter, forward + backward (6).
        device_flops: sustained FLOP/s of one device on expert GEMMs.
        link_bytes_per_s: per-device network bandwidth (each device's sends and receives share it).
        rematerialize: gather parameters again for backward (FSDP and Hecate do; otherwise keep them).
    """

    dim: int = 4096
    hidden_dim: int = 1408
    bytes_per_elem: int = 2
    flops_per_param_pair: float = 6.0
    device_flops: float = 400e12
    link_bytes_per_s: float = 50e9
    rematerialize: bool = True

    @property
    def expert_params(self) -> int:
        return 3 * self.dim * self.hidden_dim

    @property
    def expert_bytes(self) -> float:
        return float(self.expert_params * self.bytes_per_elem)

    @property
    def token_bytes(self) -> float:
        return float(self.dim * self.bytes_per_elem)

    @property
    def gathers_per_step(self) -> int:
        """Parameter transfers per step: forward gather, (backward re-gather), gradient reduce-scatter."""
        return 3 if self.rematerialize else 2


def simulate_step(
    counts: torch.Tensor, strategy: Strategy, model: CostModel, *, slots: int | None = None
) -> dict:
    """Cost of one step.

    Args:
        counts: ``(n, E)`` (token, slot) pairs that device ``d`` routes to expert ``e``.
        strategy: one of :data:`STRATEGIES`.
        model: sizes and machine constants.
        slots: experts a device may host under ``hecate`` (default ``2 * E / n``, at least 1).

    Returns:
        Per-step numbers: ``bytes_max`` / ``bytes_mean`` (bytes each device sends plus receives), ``load_max``
        / ``load_mean`` (pairs computed), ``mem_expert_bytes_max`` (expert parameters materialised at peak on
        one device, resident shard included) and ``est_step_s`` (slowest compute + slowest communication).
    """
    check_choice("strategy", strategy, STRATEGIES)
    counts = counts.to(torch.float64)
    n, e_total = counts.shape
    tok, exp_b = model.token_bytes, model.expert_bytes
    frac = (n - 1) / n  # share of a gathered expert that comes from other devices
    shard_b = e_total * exp_b / n  # resident fully-sharded expert bytes per device
    if strategy == "ep":
        if e_total % n:
            raise ValueError(f"ep needs E={e_total} divisible by n={n}")
        home = torch.arange(e_total) // (e_total // n)  # (E,)
        per_home = torch.zeros(n, n, dtype=torch.float64).index_add_(1, home, counts)  # (src n, dst n)
        remote = per_home * (1 - torch.eye(n, dtype=torch.float64))
        # a remote pair crosses the network 4 times (dispatch and combine, forward and backward); a device
        # counts the rows it sends and the rows it receives
        sent, received = remote.sum(1), remote.sum(0)
        bytes_dev = 4 * (sent + received) * tok
        load = per_home.sum(0)
        mem = torch.full((n,), e_total / n * exp_b, dtype=torch.float64)
    elif strategy == "fsdp":
        bytes_dev = torch.full((n,), 2 * model.gathers_per_step * e_total * exp_b * frac, dtype=torch.float64)
        load = counts.sum(1)
        mem = torch.full((n,), shard_b + e_total * exp_b, dtype=torch.float64)
    elif strategy == "sparse":
        need = (counts > 0).to(torch.float64)  # (n, E)
        s = need.sum(1)  # experts each device gathers
        per_expert_hosts = need.sum(0)  # (E,)
        # device d receives (n-1)/n of each needed expert and sends its 1/n chunk of expert e to every
        # other host of e
        received = s * exp_b * frac
        sent = (per_expert_hosts * exp_b / n).sum() - need.mul(exp_b / n).sum(1)
        bytes_dev = model.gathers_per_step * (received + sent)
        load = counts.sum(1)
        mem = shard_b + s * exp_b
    else:  # "hecate"
        slots = slots if slots is not None else max(1, math.ceil(2 * e_total / n))
        total = counts.sum(0)  # (E,)
        plan = plan_placement(total, n, slots)
        hosts = plan.need_mask().to(torch.float64)  # (n, E)
        reps = hosts.sum(0).clamp_min(1)  # (E,)
        share = total / reps  # pairs each host processes
        kept = torch.minimum(counts, share[None, :]) * hosts  # pairs a host keeps from its own device
        moved = counts - kept  # pairs that cross the network, sent by d
        sent_tok = moved.sum(1)
        recv_tok = (share[None, :] * hosts - kept).sum(1)
        s = hosts.sum(1)
        received = s * exp_b * frac
        sent = (reps * exp_b / n).sum() - hosts.mul(exp_b / n).sum(1)
        bytes_dev = 4 * (sent_tok + recv_tok) * tok + model.gathers_per_step * (received + sent)
        load = plan.device_load
        mem = shard_b + s * exp_b
    flops = load.max() * model.expert_params * model.flops_per_param_pair
    est = float(flops / model.device_flops + bytes_dev.max() / model.link_bytes_per_s)
    return {
        "bytes_max": float(bytes_dev.max()),
        "bytes_mean": float(bytes_dev.mean()),
        "load_max": float(load.max()),
        "load_mean": float(load.mean()),
        "mem_expert_bytes_max": float(mem.max()),
        "est_step_s": est,
    }


def simulate_trace(
    trace: torch.Tensor, strategy: Strategy, model: CostModel, *, slots: int | None = None
) -> dict:
    """Mean of :func:`simulate_step` over ``trace (steps, n, E)``; adds ``imbalance`` (max / mean load)."""
    rows = [simulate_step(step, strategy, model, slots=slots) for step in trace]
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    out["imbalance"] = out["load_max"] / out["load_mean"]
    return out


def record_router_trace(router: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Run a moe_core router on ``tokens (M, D)`` and return the used expert ids per token ``(M, K)``.

    Masked slots are returned as ``-1``.
    """
    with torch.no_grad():
        r = router(tokens)
    return torch.where(r.slot_mask(), r.indices, torch.full_like(r.indices, -1))


def bootstrap_trace(
    recorded: torch.Tensor,
    *,
    num_experts: int,
    num_devices: int,
    tokens_per_device: int,
    steps: int,
    seed: int = 0,
) -> torch.Tensor:
    """Per-device expert counts by resampling recorded routing decisions.

    Args:
        recorded: ``(M, K)`` expert ids of recorded tokens (``-1`` for masked slots).
        num_experts: E.
        num_devices: n.
        tokens_per_device: tokens each device routes per step.
        steps: number of steps.
        seed: sampling seed.

    Returns:
        ``(steps, n, E)`` float counts of (token, slot) pairs.
    """
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(steps, num_devices, num_experts, dtype=torch.float64)
    for s in range(steps):
        rows = torch.randint(0, recorded.shape[0], (num_devices, tokens_per_device), generator=g)  # (n, T)
        ids = recorded[rows]  # (n, T, K)
        dev = torch.arange(num_devices)[:, None, None].expand_as(ids)  # (n, T, K)
        keep = ids >= 0
        flat = dev[keep] * num_experts + ids[keep]
        out[s] = torch.bincount(flat, minlength=num_devices * num_experts).reshape(num_devices, num_experts)
    return out
