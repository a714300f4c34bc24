"""Router construction and auxiliary losses for the LM app, on top of ``moe_core``.

Routers (top-k, noisy top-k, dynamic top-p arXiv 2403.07652, null experts, MoGE groups, DeepSeek-V3 sigmoid,
EvoMoE's dense-to-sparse gate arXiv 2112.14397; expert choice is refused by the causal LM's config) and their
losses (each router declares its own via ``aux_losses``; router z-loss arXiv 2202.08906) all come from
``moe_core``; this module resolves router names in one place. Routing statistics are ``moe_core.stats``.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

from moe_core import routers as _routers

RouterKind = Literal[
    "topk", "noisy_topk", "expert_choice", "top_p", "null_expert", "grouped", "sigmoid_topk", "dts"
]

_CLASSES: dict[str, type[nn.Module]] = {
    "topk": _routers.TopKRouter, "noisy_topk": _routers.NoisyTopKRouter,
    "expert_choice": _routers.ExpertChoiceRouter, "top_p": _routers.TopPRouter,
    "null_expert": _routers.NullExpertRouter, "grouped": _routers.GroupedRouter,
    "sigmoid_topk": _routers.SigmoidTopKRouter, "dts": _routers.DenseToSparseRouter,
}


# router arguments renamed to the one vocabulary (moe_core.routers): old name -> new name
RENAMED_ROUTER_KWARGS = {"n_groups": "num_groups", "route_scale": "routed_scaling_factor"}


def check_renamed_kwargs(router_kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` for a router argument under its old name (``n_groups``, ``route_scale``)."""
    for old, new in RENAMED_ROUTER_KWARGS.items():
        if old in router_kwargs:
            raise ValueError(f"router_kwargs.{old} was renamed {new}")


def build_router(kind: RouterKind, *, dim: int, num_experts: int, top_k: int,
                 kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The one place a router name is resolved. ``kwargs`` go to the router's constructor unchanged; routers
    without a fixed k (expert choice, top-p) get no ``top_k``. Renamed arguments (``n_groups``,
    ``route_scale``) raise ``ValueError`` naming the new one."""
    if kind not in _CLASSES:
        raise ValueError(f"router must be one of {list(RouterKind.__args__)}, got {kind!r}")
    kw = dict(kwargs or {})
    check_renamed_kwargs(kw)
    cls = _CLASSES[kind]
    if kind in ("expert_choice", "top_p"):
        return cls(dim=dim, num_experts=num_experts, **kw)
    return cls(dim=dim, num_experts=num_experts, top_k=top_k, **kw)

