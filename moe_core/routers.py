"""Routers: map tokens ``(N, D)`` to a :class:`~moe_core.types.RouterOutput`.

Top-k softmax gating: GShard (arXiv 2006.16668), Switch (arXiv 2101.03961), Mixtral (arXiv 2401.04088).
Routing math runs in float32 whatever the activation dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_core.types import RouterOutput


class TopKRouter(nn.Module):
    """Token-choice softmax top-k router.

    Args:
        dim: model width D.
        num_experts: routed experts E.
        top_k: experts per token K (``1 <= K <= E``).
        renormalize: renormalise the selected probabilities to sum to 1 (Mixtral) or keep the raw
            softmax probabilities (Switch, Qwen2-MoE ``norm_topk_prob=False``).
        jitter: multiplicative input jitter ``U(1-eps, 1+eps)`` applied in training only (0 disables).
    """

    def __init__(
        self, *, dim: int, num_experts: int, top_k: int, renormalize: bool = True, jitter: float = 0.0
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.renormalize, self.jitter = renormalize, jitter
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens.

        Args:
            x: ``(N, D)`` tokens.

        Returns:
            RouterOutput with ``weights``/``indices`` of shape ``(N, K)``.
        """
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (N, dim={self.dim}), got {tuple(x.shape)}")
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = nn.functional.linear(x.float(), self.gate.weight.float())  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        weights, indices = probs.topk(self.top_k, dim=-1)  # (N, K), (N, K)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits=logits, probs=probs, weights=weights, indices=indices)
