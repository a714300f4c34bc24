"""MMoE (Ma et al., KDD 2018, DOI 10.1145/3219819.3220007) and its Shared-Bottom baseline."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moe_core.multigate.experts import Activation, DenseMLPExperts, Norm, check_input
from moe_core.multigate.gates import MultiGateOutput, SoftmaxGate, mix_tasks, stacked_gates

__all__ = ["MMoE", "SharedBottom"]


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts [P]: ``y_k = h_k(Σ_i softmax(W_gk v)_i f_i(v))``.

    Gates are one linear layer + softmax on the input [P]; experts identical MLPs (ReLU by default).
    With ``num_experts=1`` this is Shared-Bottom.

    Args:
        dim: D, input width.
        num_tasks: M.
        num_experts: E.
        expert_hidden: expert layer widths; the last is H.
        norm, activation, dropout: passed to :class:`DenseMLPExperts`.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_tasks: int,
        num_experts: int,
        expert_hidden: Sequence[int],
        norm: Norm = "none",
        activation: Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        if num_experts < 1 or num_tasks < 1:
            raise ValueError(f"num_experts and num_tasks must be >= 1, got {num_experts}, {num_tasks}")
        self.num_tasks = num_tasks
        self.experts = DenseMLPExperts(
            num_experts=num_experts, dim=dim, hidden_dims=expert_hidden, norm=norm, activation=activation,
            dropout=dropout,
        )  # fmt: skip
        self.gates = nn.ModuleList(SoftmaxGate(dim=dim, num_experts=num_experts) for _ in range(num_tasks))
        self.out_dim = self.experts.out_dim

    def forward(self, v: torch.Tensor) -> MultiGateOutput:
        """``v (B, D)`` -> task outputs ``(B, M, H)``."""
        check_input(v, self.dim, "MMoE")
        ex = self.experts(v)  # (B, E, H)
        # all M gates in one matmul and all M mixtures in one bmm (a loop over tasks was ~half a train step)
        w = stacked_gates(self.gates, v)  # (B, M, E)
        outs = mix_tasks(w, ex)  # (B, M, H)
        gates = {f"task{k}": g for k, g in enumerate(w.unbind(1))}
        return MultiGateOutput(outs, gates, {"experts": ex})


class SharedBottom(nn.Module):
    """Shared-Bottom: one shared MLP ``h = f(v)``; every task tower reads ``h`` (MMoE §3 baseline)."""

    def __init__(
        self,
        *,
        dim: int,
        num_tasks: int,
        expert_hidden: Sequence[int],
        norm: Norm = "none",
        activation: Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_tasks = num_tasks
        self.bottom = DenseMLPExperts(
            num_experts=1,
            dim=dim,
            hidden_dims=expert_hidden,
            norm=norm,
            activation=activation,
            dropout=dropout,
        )
        self.out_dim = self.bottom.out_dim

    def forward(self, v: torch.Tensor) -> MultiGateOutput:
        check_input(v, self.dim, "SharedBottom")
        h = self.bottom(v)  # (B, 1, H)
        return MultiGateOutput(h.expand(-1, self.num_tasks, -1), {}, {"bottom": h})
