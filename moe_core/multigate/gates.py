"""Per-task softmax gates, their mixing and the output of every multi-gate backbone.

The gate of MMoE (Ma et al., KDD 2018, DOI 10.1145/3219819.3220007) and CGC/PLE (Tang et al., RecSys 2020,
DOI 10.1145/3383313.3412236), also HoME's masked gate (arXiv 2408.05430): one linear layer and a softmax
over the candidate experts. Gate math runs in float32 (float64 for float64 inputs, :func:`routing_float`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "MultiGateOutput",
    "SoftmaxGate",
    "mix",
    "mix_tasks",
    "routing_float",
    "stacked_gates",
    "stacked_linear",
]


@dataclass
class MultiGateOutput:
    """What a multi-gate backbone returns.

    Attributes:
        task_outputs: ``(B, M, H)`` one fused representation per task (the towers' inputs).
        gates: per gate name, ``(B, E_candidates)`` float32 (float64 for float64 inputs) combine weights of
            the last level's task gates (masked experts have weight 0); keys are ``task{k}`` plus the other
            gates of the model.
        expert_outputs: per expert group name, ``(B, E_group, H)`` activations (for zero-activation and
            output-scale diagnostics).
    """

    task_outputs: torch.Tensor
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def routing_float(logits: torch.Tensor) -> torch.Tensor:
    """Gate logits in the routing precision: float32 at least (bf16/fp16 -> float32), float64 stays float64.

    ``.float()`` would also *down*-cast float64 activations, so a float64 model (the oracle tests) computed
    its gates in float32: outputs were off by ~1e-7 from a float64 loop oracle.
    """
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of expert outputs: ``(B, E)`` x ``(B, E, H)`` -> ``(B, H)``.

    Broadcast multiply and sum, not ``einsum``/``bmm``: with E ~ 4-16 the batched (1, E) x (E, H) products are
    B tiny GEMMs; measured [M] forward+backward at B=2048, E=4, H=64 on 2 threads: 0.41 ms vs 2.0 ms (einsum).
    """
    return (weights.to(experts.dtype).unsqueeze(-1) * experts).sum(1)


def mix_tasks(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Every task's gate-weighted sum at once: ``(B, G, E)`` x ``(B, E, H)`` -> ``(B, G, H)``, one ``bmm``.

    With G gates the batched products are ``(G, E) x (E, H)`` per row, large enough for ``bmm`` to beat a
    loop of :func:`mix`: measured [M] forward+backward at B=1024, G=8, E=8, H=64 on 1 thread: 6.9 ms vs
    20.8 ms (loop of :func:`mix`) vs 18.3 ms (one broadcast multiply and sum).
    """
    return torch.bmm(weights.to(experts.dtype), experts)


class SoftmaxGate(nn.Module):
    """Linear + softmax gate over E candidates, optionally masked (the MMoE/PLE gate, and HoME's masked gate).

    A masked candidate gets logit −inf, hence weight exactly 0 and no gradient (equal to a softmax over the
    restricted candidate list).

    Args:
        dim: gate input width.
        num_experts: E candidates.
        mask: optional ``(E,)`` bool, True where the candidate is allowed.
    """

    def __init__(self, *, dim: int, num_experts: int, mask: Sequence[bool] | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, num_experts)
        if mask is not None:
            m = torch.as_tensor(list(mask), dtype=torch.bool)
            if m.shape != (num_experts,) or not m.any():
                raise ValueError(
                    f"gate mask must be ({num_experts},) with at least one True, got {m.tolist()}"
                )
            self.register_buffer("mask", m, persistent=False)
        else:
            self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, dim) -> (B, E)`` gate weights summing to 1 per row (float32; float64 for float64 ``x``)."""
        logits = routing_float(self.proj(x))  # (B, E)
        if self.mask is not None:
            logits = logits.masked_fill(~self.mask, float("-inf"))
        return logits.softmax(dim=-1)


def stacked_linear(projs: Sequence[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    """G linear maps of the same shape applied at once: ``(B, D)`` or ``(G, B, D)`` -> ``(B, G, E)``.

    The maps keep their own parameters; their weights are stacked for the call (one ``addmm`` when every map
    reads the same ``(B, D)`` input, one ``baddbmm`` when map g reads ``x[g]``).
    """
    weight = torch.stack([p.weight for p in projs])  # (G, E, D)
    bias = torch.stack([p.bias for p in projs])  # (G, E)
    n, e, d = weight.shape
    if x.dim() == 2:
        return torch.addmm(bias.reshape(-1), x, weight.reshape(n * e, d).t()).view(-1, n, e)  # (B, G, E)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)).transpose(0, 1)  # (B, G, E)


def stacked_gates(gates: Sequence[SoftmaxGate], x: torch.Tensor) -> torch.Tensor:
    """G softmax gates over the same E candidates evaluated at once (one matmul, one softmax).

    The gates keep their own parameters (``gates[g].proj``, so state dicts are those of a loop over
    :class:`SoftmaxGate`); their weights are stacked for the call. Equal to
    ``torch.stack([g(x_g) for g in gates], 1)`` within float rounding.

    Args:
        gates: G gates with the same input width and candidate count E.
        x: ``(B, D)`` input read by every gate, or ``(G, B, D)``: gate g reads ``x[g]``.

    Returns:
        ``(B, G, E)`` gate weights (float32; float64 for float64 ``x``), masked candidates exactly 0.
    """
    logits = routing_float(stacked_linear([g.proj for g in gates], x))  # (B, G, E)
    if any(g.mask is not None for g in gates):
        allow_all = torch.ones(logits.shape[-1], dtype=torch.bool, device=x.device)
        mask = torch.stack([g.mask if g.mask is not None else allow_all for g in gates])  # (G, E)
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(dim=-1)
