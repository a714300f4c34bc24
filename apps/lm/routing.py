"""Router construction and auxiliary losses for the LM app, on top of ``moe_core``.

Routers (top-k, noisy top-k, dynamic top-p arXiv 2403.07652, null experts, MoGE groups, DeepSeek-V3 sigmoid,
EvoMoE's dense-to-sparse gate arXiv 2112.14397; expert choice is refused by the causal LM's config) and their
losses (each router declares its own via ``aux_losses``; router z-loss arXiv 2202.08906) all come from
``moe_core``; this module resolves router names in one place and adds the per-router statistics the task logs.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from moe_core import losses as _losses
from moe_core import routers as _routers
from moe_core.types import RouterOutput

RouterKind = Literal[
    "topk", "noisy_topk", "expert_choice", "top_p", "null_expert", "grouped", "sigmoid_topk", "dts"
]

_CLASSES = {"topk": "TopKRouter", "noisy_topk": "NoisyTopKRouter", "expert_choice": "ExpertChoiceRouter",
            "top_p": "TopPRouter", "null_expert": "NullExpertRouter", "grouped": "GroupedRouter",
            "sigmoid_topk": "SigmoidTopKRouter", "dts": "DenseToSparseRouter"}


def build_router(kind: RouterKind, *, dim: int, num_experts: int, top_k: int,
                 kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The one place a router name is resolved. ``kwargs`` go to the router's constructor unchanged; routers
    without a fixed k (expert choice, top-p) get no ``top_k``."""
    if kind not in _CLASSES:
        raise ValueError(f"router must be one of {list(RouterKind.__args__)}, got {kind!r}")
    cls = getattr(_routers, _CLASSES[kind])
    kw = dict(kwargs or {})
    if kind in ("expert_choice", "top_p"):
        return cls(dim=dim, num_experts=num_experts, **kw)
    return cls(dim=dim, num_experts=num_experts, top_k=top_k, **kw)


def z_loss(r: RouterOutput) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(z_t)^2`` (ST-MoE); spec section 6."""
    return _losses.router_z_loss(r)


@torch.no_grad()
def routing_summary(r: RouterOutput) -> dict[str, torch.Tensor]:
    """Per-router statistics: expert load fractions ``(E,)``, load entropy / log E, mean router entropy,
    active experts per token, max load fraction, and max / mean load (1 = perfectly balanced)."""
    e = r.num_experts
    counts = r.counts().float()  # (E,)
    load = counts / counts.sum().clamp_min(1.0)
    load_ent = -(load * torch.log(load.clamp_min(1e-12))).sum() / math.log(max(e, 2))
    p = r.probs[:, :e].float()
    router_ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    active = r.slot_mask().float().sum(-1).mean()
    return {"load": load, "load_entropy": load_ent, "router_entropy": router_ent, "active_experts": active,
            "max_load": load.max(), "max_over_mean_load": load.max() * e}
