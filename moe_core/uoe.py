"""Union-of-Experts MLP experts with data selection and expert selection routing (arXiv 2503.02495; code
YujiaoYang-work/UoE ``language_modeling/model/mlp/UoME_DS.py``, ``UoME_ES.py``).

Equivalent decomposition [P]: a dense MLP ``W2 act(W1 x + b1) + b2`` is cut along its tensor-parallel
seams into E experts: expert e owns the columns ``[e H/E, (e+1) H/E)`` of ``W1`` (and of ``b1``) and the
same rows of ``W2``, so ``sum_e E_e(x) + b2 = MLP(x)`` (:class:`UnionMLP`; ``b2`` is added once).

Routing, from the code [C] with our choices marked [D]:

* **Data selection** (:class:`DataSelectionUoE`, ``UoME_DS.U_MLP``): a softmax gate per token, a per-token
  top-k mask; then each *expert* keeps, in every sequence, the ``C = int(capacity * T)`` tokens with the
  highest masked score (``capacity = 0.5`` in the code), computes on them in their original order, and
  its outputs are scatter-added back. The code does not scale expert outputs by the gate (the gate then
  gets no gradient); ``combine="score"`` multiplies each output by the token's softmax score [D], and
  ``combine="none"`` is the code. The code's per-position renormalisation of the masked scores over the
  batch (``SwitchGate``: ``/ sum over batch * capacity``) is not reproduced: tokens are ranked by their
  masked softmax score [D]. Selection looks at the whole sequence, so it is not causal (as expert choice).
* **Expert selection** (:class:`ExpertSelectionUoE`, ``UoME_ES.U_MLP``): one softmax router over the
  flattened sample ``(T * D)`` picks the top-k experts *per sample*; each chosen expert runs on every token
  of that sample; outputs are summed. ``combine`` as above (the code: ``none``). The router's input width
  fixes the sequence length (``seq_len``), as in the code.

Shapes: x ``(B, T, D)`` -> ``(B, T, D)``; the modules return the MLP part only (add your residual).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.validation import check_choice

__all__ = ["Combine", "DataSelectionUoE", "ExpertSelectionUoE", "UnionMLP"]

Combine = Literal["none", "score"]


class UnionMLP(nn.Module):
    """A dense MLP viewed as E experts (column slices of ``W1``, row slices of ``W2``).

    Args:
        dim: D.
        hidden_dim: H, divisible by ``num_experts``.
        num_experts: E.
        bias: biases on both linears (``b2`` is added once, outside the experts).
    """

    def __init__(self, *, dim: int, hidden_dim: int, num_experts: int, bias: bool = True) -> None:
        super().__init__()
        if hidden_dim % num_experts:
            raise ValueError(f"hidden_dim={hidden_dim} must be divisible by num_experts={num_experts}")
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on ``(..., D)`` tokens -> ``(..., D)`` (no ``b2``)."""
        h = self.hidden_dim // self.num_experts
        sl = slice(e * h, (e + 1) * h)
        b1 = None if self.w1.bias is None else self.w1.bias[sl]
        z = F.gelu(F.linear(x, self.w1.weight[sl], b1))  # (..., H/E)
        return F.linear(z, self.w2.weight[:, sl])  # (..., D)

    def output_bias(self, like: torch.Tensor) -> torch.Tensor:
        """``b2`` broadcastable to ``like`` (zeros without bias)."""
        return torch.zeros_like(like) if self.w2.bias is None else self.w2.bias.expand_as(like)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dense MLP ``W2 gelu(W1 x + b1) + b2`` (all experts on every token)."""
        return self.w2(F.gelu(self.w1(x)))


class DataSelectionUoE(nn.Module):
    """UoE data selection: experts pick the tokens they process (per sequence, top-C by gate score).

    Args:
        mlp: the decomposed MLP (E = ``mlp.num_experts``).
        top_k: experts in each token's mask.
        capacity: fraction of each sequence's tokens every expert processes (code: 0.5).
        combine: ``none`` (the code) or ``score`` (scale outputs by the token's gate probability) [D].
    """

    def __init__(
        self, *, mlp: UnionMLP, top_k: int, capacity: float = 0.5, combine: Combine = "none"
    ) -> None:
        super().__init__()
        check_choice("combine", combine, get_args(Combine))
        if not 1 <= top_k <= mlp.num_experts:
            raise ValueError(f"top_k must be in [1, {mlp.num_experts}], got {top_k}")
        if not 0.0 < capacity <= 1.0:
            raise ValueError(f"capacity must be in (0, 1], got {capacity}")
        self.mlp, self.top_k, self.capacity, self.combine = mlp, top_k, capacity, combine
        self.gate = nn.Linear(mlp.dim, mlp.num_experts)

    def selection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing of a batch.

        Returns:
            ``probs (B, T, E)`` float32 gate probabilities and ``tokens (B, E, C)`` the selected positions of
            each expert in each sequence, ascending.
        """
        probs = self.gate(x).float().softmax(-1)  # (B, T, E)
        top = probs.topk(self.top_k, dim=-1).indices  # (B, T, K)
        masked = torch.zeros_like(probs).scatter(-1, top, probs.gather(-1, top))  # (B, T, E)
        c = max(1, int(self.capacity * x.shape[1]))
        tokens = masked.topk(c, dim=1).indices.transpose(1, 2).sort(dim=-1).values  # (B, E, C)
        return probs, tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        b, t, d = x.shape
        probs, tokens = self.selection(x)
        flat_x = x.reshape(b * t, d)  # (B*T, D)
        rows = (tokens + torch.arange(b, device=x.device).view(b, 1, 1) * t).transpose(0, 1)  # (E, B, C)
        out = torch.zeros_like(flat_x)
        for e in range(self.mlp.num_experts):
            idx = rows[e].reshape(-1)  # (B*C,) flat rows expert e processes
            ye = self.mlp.expert(flat_x[idx], e)  # (B*C, D)
            if self.combine == "score":
                ye = ye * probs.reshape(b * t, -1)[idx, e, None].to(ye.dtype)
            out.index_add_(0, idx, ye)
        out = out.view(b, t, d)
        return out + self.mlp.output_bias(out)


class ExpertSelectionUoE(nn.Module):
    """UoE expert selection: each sample picks its top-k experts from its flattened content.

    Args:
        mlp: the decomposed MLP.
        top_k: experts per sample.
        seq_len: T of every input (the router reads ``T * D`` features, as in the code).
        combine: ``none`` (the code) or ``score`` [D].
    """

    def __init__(self, *, mlp: UnionMLP, top_k: int, seq_len: int, combine: Combine = "none") -> None:
        super().__init__()
        check_choice("combine", combine, get_args(Combine))
        if not 1 <= top_k <= mlp.num_experts:
            raise ValueError(f"top_k must be in [1, {mlp.num_experts}], got {top_k}")
        self.mlp, self.top_k, self.seq_len, self.combine = mlp, top_k, seq_len, combine
        self.switch = nn.Linear(seq_len * mlp.dim, mlp.num_experts)

    def selection(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``probs (B, E)`` float32 and ``experts (B, K)`` chosen per sample."""
        if x.shape[1] != self.seq_len:
            raise ValueError(f"expected sequences of length {self.seq_len}, got {x.shape[1]}")
        probs = self.switch(x.flatten(1)).float().softmax(-1)  # (B, E)
        return probs, probs.topk(self.top_k, dim=-1).indices  # (B, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        probs, experts = self.selection(x)
        out = torch.zeros_like(x)
        for e in range(self.mlp.num_experts):
            rows = (experts == e).any(-1).nonzero().flatten()  # samples that chose e
            if rows.numel() == 0:
                continue
            ye = self.mlp.expert(x[rows], e)  # (b_e, T, D)
            if self.combine == "score":
                ye = ye * probs[rows, e].to(ye.dtype)[:, None, None]
            out = out.index_add(0, rows, ye)
        return out + self.mlp.output_bias(out)
