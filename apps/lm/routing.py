"""Router construction and auxiliary losses for the LM app, on top of ``moe_core``.

Routers, losses and stats come from ``moe_core`` when it provides them. While ``moe_core`` was being written
in parallel, this module carried minimal local versions of the pieces that were not there yet (dynamic top-p,
arXiv 2403.07652; EvoMoE's dense-to-sparse gate, arXiv 2112.14397; switch balance and z-loss, arXiv 2101.03961
/ 2202.08906); they follow ``../shared/spec/moe_core.md`` sections 5, 6, 10 and 12 and are used only as
fallbacks.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from moe_core import routers as _routers
from moe_core.types import RouterOutput

RouterKind = Literal[
    "topk", "noisy_topk", "expert_choice", "top_p", "null_expert", "grouped", "sigmoid_topk", "dts"
]

try:  # moe_core.losses is being written in parallel; fall back to the spec formulas
    from moe_core import losses as _losses
except ImportError:  # pragma: no cover - depends on the state of moe_core
    _losses = None


class LocalTopPRouter(nn.Module):
    """Dynamic top-p routing (spec section 12, fallback): smallest prefix of sorted probs whose mass exceeds
    p.

    Returns all E slots sorted by probability with a mask; weights are the raw probabilities (not
    renormalised).
    """

    def __init__(self, *, dim: int, num_experts: int, threshold: float = 0.4) -> None:
        super().__init__()
        self.dim, self.num_experts, self.threshold = dim, num_experts, threshold
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = nn.functional.linear(x.float(), self.gate.weight.float())  # (N, E)
        probs = logits.softmax(-1)  # (N, E)
        sp, idx = probs.sort(-1, descending=True)  # (N, E), (N, E)
        before = sp.cumsum(-1) - sp  # (N, E) mass strictly before each slot
        mask = before <= self.threshold  # keep until the first slot whose cumulative mass exceeds p
        mask[:, 0] = True
        return RouterOutput(logits=logits, probs=probs, weights=sp * mask, indices=idx, mask=mask)


class LocalDenseToSparseRouter(nn.Module):
    """EvoMoE dense-to-sparse gate (spec section 10, fallback, as in the EvoMoE repo's ``topkgating``).

    Training: ``gg = softmax((z + Gumbel) / temperature)``; soft phase keeps experts with ``gg > threshold``,
    hard phase keeps the top-``top_k`` of ``gg``; weights ``= active * softmax(z)``. Eval: plain top-``top_k``
    of the softmax. ``temperature`` and ``hard`` are attributes a schedule sets.
    """

    def __init__(self, *, dim: int, num_experts: int, top_k: int = 1, temperature: float = 1.0,
                 threshold: float = 1e-3) -> None:
        super().__init__()
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.temperature, self.threshold, self.hard = temperature, threshold, False
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = nn.functional.linear(x.float(), self.gate.weight.float())  # (N, E)
        probs = logits.softmax(-1)  # (N, E)
        n, e = probs.shape
        if not self.training:
            w, idx = probs.topk(self.top_k, -1)  # (N, K)
            return RouterOutput(logits=logits, probs=probs, weights=w, indices=idx)
        u = torch.rand_like(logits).clamp_(1e-10, 1.0 - 1e-7)
        gg = ((logits - torch.log(-torch.log(u))) / self.temperature).softmax(-1)  # (N, E)
        if self.hard:
            active = torch.zeros_like(gg, dtype=torch.bool).scatter_(1, gg.topk(self.top_k, -1).indices, True)
        else:
            active = gg > self.threshold  # (N, E)
        idx = torch.arange(e, device=x.device).expand(n, e)  # (N, E)
        return RouterOutput(logits=logits, probs=probs, weights=probs * active, indices=idx, mask=active)


def build_router(kind: RouterKind, *, dim: int, num_experts: int, top_k: int,
                 kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The one place a router name is resolved. ``kwargs`` go to the router's constructor unchanged."""
    kw = dict(kwargs or {})
    if kind == "topk":
        return _routers.TopKRouter(dim=dim, num_experts=num_experts, top_k=top_k, **kw)
    if kind == "top_p":
        cls = getattr(_routers, "TopPRouter", None)
        if cls is None:
            return LocalTopPRouter(dim=dim, num_experts=num_experts, **kw)
        return cls(dim=dim, num_experts=num_experts, **kw)
    if kind == "dts":
        cls = getattr(_routers, "DenseToSparseRouter", None)
        if cls is None:
            return LocalDenseToSparseRouter(dim=dim, num_experts=num_experts, top_k=top_k, **kw)
        return cls(dim=dim, num_experts=num_experts, top_k=top_k, **kw)
    names = {
        "noisy_topk": "NoisyTopKRouter",
        "expert_choice": "ExpertChoiceRouter",
        "null_expert": "NullExpertRouter",
        "grouped": "GroupedRouter",
        "sigmoid_topk": "SigmoidTopKRouter",
    }
    if kind not in names:
        raise ValueError(f"router must be one of {list(RouterKind.__args__)}, got {kind!r}")
    cls = getattr(_routers, names[kind], None)
    if cls is None:
        raise ValueError(f"router {kind!r} needs moe_core.routers.{names[kind]}, which this moe_core lacks")
    if kind == "expert_choice":
        return cls(dim=dim, num_experts=num_experts, **kw)
    return cls(dim=dim, num_experts=num_experts, top_k=top_k, **kw)


def balance_loss(r: RouterOutput) -> torch.Tensor:
    """Switch-form balance loss ``E * sum_i f_i P_i`` (1 at perfect balance for any k); spec section 5."""
    if _losses is not None and hasattr(_losses, "switch_balance_loss"):
        return _losses.switch_balance_loss(r)
    e = r.num_experts
    counts = r.counts().float()  # (E,)
    f = counts / counts.sum().clamp_min(1.0)
    p = r.probs[:, :e].float().mean(0)  # (E,)
    return e * (f * p).sum()


def z_loss(r: RouterOutput) -> torch.Tensor:
    """Router z-loss ``mean_t logsumexp(z_t)^2`` (ST-MoE); spec section 6."""
    if _losses is not None and hasattr(_losses, "router_z_loss"):
        return _losses.router_z_loss(r)
    return torch.logsumexp(r.logits.float(), dim=-1).pow(2).mean()


def entropy_loss(r: RouterOutput) -> torch.Tensor:
    """Mean router entropy ``-sum_i P_i log P_i`` (top-p paper's dynamic loss); spec section 12."""
    if _losses is not None and hasattr(_losses, "top_p_entropy_loss"):
        return _losses.top_p_entropy_loss(r)
    p = r.probs.float()
    return -(p * torch.log(p.clamp_min(1e-9))).sum(-1).mean()


@torch.no_grad()
def routing_summary(r: RouterOutput) -> dict[str, torch.Tensor]:
    """Per-router statistics: expert load fractions ``(E,)``, load entropy / log E, mean router entropy,
    active experts per token, max load fraction."""
    e = r.num_experts
    counts = r.counts().float()  # (E,)
    load = counts / counts.sum().clamp_min(1.0)
    load_ent = -(load * torch.log(load.clamp_min(1e-12))).sum() / math.log(max(e, 2))
    p = r.probs[:, :e].float()
    router_ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    active = r.slot_mask().float().sum(-1).mean()
    return {"load": load, "load_entropy": load_ent, "router_entropy": router_ent, "active_experts": active,
            "max_load": load.max()}
