"""MoELayer: router + routed experts (+ optional always-on shared experts). DeepSeekMoE: arXiv 2401.06066."""

from __future__ import annotations

import torch
from torch import nn

from moe_core.types import MoEOutput


class MoELayer(nn.Module):
    """Sparse mixture-of-experts FFN.

    Args:
        router: a moe_core router ``(N, D) -> RouterOutput``.
        experts: an expert bank ``(x, indices, weights, mask) -> (N, D)``.
        shared_experts: optional module ``(N, D) -> (N, D)`` applied to every token.
        shared_gate: multiply the shared path by ``sigmoid(x @ w)`` (Qwen2-MoE).
    """

    def __init__(
        self, *, router: nn.Module, experts: nn.Module, shared_experts: nn.Module | None = None,
        shared_gate: bool = False,
    ) -> None:
        super().__init__()
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        self.shared_gate = nn.Linear(router.dim, 1, bias=False) if shared_gate and shared_experts else None

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """x ``(B, T, D)`` or ``(N, D)`` -> MoEOutput with output of the same shape."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        routing = self.router(flat)
        out = self.experts(flat, routing.indices, routing.weights.to(x.dtype), routing.mask)
        if self.shared_experts is not None:
            shared = self.shared_experts(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        return MoEOutput(output=out.reshape(shape), routing=routing)
