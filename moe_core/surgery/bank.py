"""Expert banks whose weights are computed on the fly (compressed, quantised), and parameter counting.

:class:`ComputedWeightExperts` is the base of ``mcsmoe.LowRankSparseExperts`` and
``quant.NestedQuantExperts``: a subclass only says how to build ``(gate, up, down)``; dispatch is the
sorted loop of :func:`dispatch_swiglu`. The view of MoE blocks that every tool shares (finding blocks,
reading and writing expert weights, router accessors) is :mod:`moe_core.blocks`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.blocks import ExpertWeights
from moe_core.blocks import find_moe_blocks as find_moe_blocks  # re-export: tests/tools/test_tools_lm_app.py

__all__ = ["ComputedWeightExperts", "count_parameters", "dispatch_swiglu"]


def dispatch_swiglu(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    num_experts: int,
    expert: Callable[[int], ExpertWeights],
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """Sorted-loop SwiGLU dispatch with weights fetched per expert (used by computed-weight banks).

    Args:
        x: ``(N, D)`` tokens.
        indices: ``(N, K)`` expert ids; weights: ``(N, K)`` combine weights; mask: ``(N, K)`` or None.
        num_experts: E.
        expert: ``e -> (gate (D, H), up (D, H), down (H, D))``; called once per expert that has tokens.
        act: gating activation.

    Returns:
        ``(N, D)`` combined expert outputs (Mixtral semantics: weights scale expert outputs).
    """
    n, k = indices.shape
    flat = indices.reshape(-1)  # (N*K,)
    w = weights.reshape(-1).to(x.dtype)  # (N*K,)
    tok = torch.arange(n, device=x.device).repeat_interleave(k)  # (N*K,)
    if mask is not None:
        keep = mask.reshape(-1)
        flat, w, tok = flat[keep], w[keep], tok[keep]
    order = flat.argsort(stable=True)
    flat, w, tok = flat[order], w[order], tok[order]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    xs = x[tok]  # (P, D) pairs sorted by expert
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            g, u, d = expert(e)
            xe = xs[start : start + c]
            outs.append((act(xe @ g) * (xe @ u)) @ d)
        start += c
    ys = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[-1])
    return x.new_zeros(n, x.shape[-1]).index_add_(0, tok, ys * w[:, None])


class ComputedWeightExperts(nn.Module):
    """Base for banks whose weights are computed on the fly (compressed, quantised); subclasses give
    ``expert_weights() -> (gate (E,D,H), up (E,D,H), down (E,H,D))``.

    ``forward(x, indices, weights, mask=None)`` accepts both the moekit and the HF call convention.
    """

    num_experts: int

    def __init__(self, *, act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> None:
        super().__init__()
        self.act_fn = act

    def expert_weights(self) -> ExpertWeights:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        g, u, d = self.expert_weights()
        return dispatch_swiglu(
            x,
            indices,
            weights,
            mask,
            num_experts=self.num_experts,
            expert=lambda e: (g[e], u[e], d[e]),
            act=self.act_fn,
        )


def count_parameters(module: nn.Module) -> int:
    """Unique stored parameters (+ nonzeros of sparse parts of compressed banks)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for m in module.modules():
        extra = getattr(m, "stored_parameter_correction", None)
        if callable(extra):
            total += int(extra())
    return total
