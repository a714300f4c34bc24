"""Routing statistics for logging (no paper; our design): load, drops, active experts, entropy.

The one implementation of these statistics in moekit: apps log what :func:`routing_stats` returns, and
:func:`load_stats` gives the load statistics of counts gathered elsewhere (e.g. summed over the micro-batches
and ranks of an optimizer step). Everything is detached and computed without gradient in float32; the values
are cheap reductions over the RouterOutput (one ``scatter_add`` and a few means), suitable for
``LightningModule.log`` every step.
"""

from __future__ import annotations

import math

import torch

from moe_core.types import RouterOutput
from moe_core.validation import check_router_output


@torch.no_grad()
def load_stats(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Load statistics of per-expert counts.

    Keys (all detached float32 tensors):

    * ``expert_load`` ``(E,)``: ``counts / counts.sum()`` (zeros if nothing was routed).
    * ``max_load``: largest entry of ``expert_load``.
    * ``max_over_mean_load``: ``max_load * E`` (1 = perfectly balanced, E = collapse onto one expert).
    * ``load_entropy``: entropy of ``expert_load`` divided by ``log E`` (1 = balanced, 0 = collapse; 0 when
      E = 1 or nothing was routed).

    Args:
        counts: ``(E,)`` number of (token, slot) pairs per expert (any numeric dtype).

    Returns:
        dict name -> tensor.
    """
    counts = counts.detach().float()  # (E,)
    e = counts.shape[0]
    load = counts / counts.sum().clamp_min(1.0)  # (E,)
    ent = -(load * load.clamp_min(torch.finfo(load.dtype).tiny).log()).sum()
    return {
        "expert_load": load,
        "max_load": load.max(),
        "max_over_mean_load": load.max() * e,
        "load_entropy": ent / math.log(e) if e > 1 else torch.zeros_like(ent),
    }


@torch.no_grad()
def routing_stats(routing: RouterOutput) -> dict[str, torch.Tensor]:
    """Summary statistics of one routing decision.

    Keys (all detached float32 tensors):

    * ``expert_load`` ``(E,)``: fraction of used (token, slot) pairs per expert (sums to 1; zeros if nothing
      was routed). Log its entries individually or as a histogram.
    * ``max_load``, ``max_over_mean_load``, ``load_entropy``: see :func:`load_stats`.
    * ``dropped_fraction``: share of (token, slot) pairs dropped by a capacity limit (router ``aux
      ["drop_fraction"]``; 0 for dropless routers). Variable-k padding is not a drop.
    * ``active_experts``: mean number of used slots per token (K for fixed top-k; variable for top-p, null
      experts, DTS, expert choice).
    * ``zero_expert_tokens``: share of tokens with no used slot (expert choice, null experts, drops).
    * ``entropy``: mean per-token entropy of ``probs`` renormalised per row (a no-op for softmax routers;
      sigmoid scores become a distribution), in nats (``log E`` for uniform probabilities).

    Args:
        routing: a RouterOutput.

    Returns:
        dict name -> tensor.
    """
    check_router_output(routing, "routing_stats")
    e = routing.num_experts
    used = routing.slot_mask()  # (N, K)
    idx = routing.indices[used]  # (P,)
    counts = torch.bincount(idx.reshape(-1), minlength=e)[:e]  # (E,)
    p = routing.probs.detach().float()  # (N, E)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)  # sigmoid scores -> distribution
    ent = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)  # (N,)
    per_token = used.float().sum(-1)  # (N,)
    none = per_token.new_zeros(())
    dropped = routing.aux.get("drop_fraction")
    dropped = torch.zeros((), device=p.device) if dropped is None else dropped.detach().float()
    return {
        **load_stats(counts),
        "dropped_fraction": dropped,
        "active_experts": per_token.mean() if per_token.numel() else none,
        "zero_expert_tokens": (per_token == 0).float().mean() if per_token.numel() else none,
        "entropy": ent.mean() if ent.numel() else none,
    }
