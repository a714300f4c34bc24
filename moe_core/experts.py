"""Expert banks with stacked weights ``(E, D, H)`` and their dispatch backends."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts ``down(silu(x @ gate) * (x @ up))`` with stacked weights.

    Args:
        num_experts: E.
        dim: D.
        hidden_dim: H (per expert).
        backend: dispatch backend; ``auto`` picks the fastest available.

    Weights: ``gate_proj``/``up_proj`` ``(E, D, H)``, ``down_proj`` ``(E, H, D)``.
    """

    def __init__(
        self, *, num_experts: int, dim: int, hidden_dim: int, backend: Literal["auto", "loop"] = "auto"
    ) -> None:
        super().__init__()
        self.num_experts, self.dim, self.hidden_dim, self.backend = num_experts, dim, hidden_dim, backend
        self.gate_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, fan_in in ((self.gate_proj, self.dim), (self.up_proj, self.dim), (self.down_proj, self.hidden_dim)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``out[t] = sum_k weights[t,k] * expert_{indices[t,k]}(x[t])`` over used slots; x ``(N, D)``."""
        n, k = indices.shape
        flat = indices.reshape(-1)  # (N*K,)
        w = weights.reshape(-1).to(x.dtype)  # (N*K,)
        tok = torch.arange(n, device=x.device).repeat_interleave(k)  # (N*K,)
        if mask is not None:
            keep = mask.reshape(-1)
            flat, w, tok = flat[keep], w[keep], tok[keep]
        order = flat.argsort(stable=True)
        flat, w, tok = flat[order], w[order], tok[order]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x[tok]  # (P, D) pairs sorted by expert
        gates, ups, downs = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                xe = xs[start : start + c]
                outs.append((F.silu(xe @ gates[e]) * (xe @ ups[e])) @ downs[e])
            start += c
        ys = torch.cat(outs) if outs else xs.new_zeros(0, self.dim)
        return x.new_zeros(n, self.dim).index_add_(0, tok, ys * w[:, None])
