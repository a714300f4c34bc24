"""Dense expert banks of the multi-gate mixtures: E MLP experts with stacked weights, all evaluated.

Every expert sees every row in MMoE, CGC/PLE and HoME, so the bank evaluates all experts with one (batched)
matmul per layer instead of dispatching. (The routed banks in ``moe_core.experts`` dispatch a sparse
``(indices, weights)`` assignment; with ``indices = arange(E)`` for every token they compute the same
mixture, but the dense path is cheaper for E ~ 10.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.validation import check_choice, check_rows

__all__ = ["Activation", "DenseMLPExperts", "Norm", "NormLayers"]

Norm = Literal["none", "bn", "ln"]
Activation = Literal["relu", "silu"]
NormLayers = Literal["all", "last"]


def check_input(v: torch.Tensor, dim: int, who: str) -> None:
    """A multi-gate model's input must be ``(B, dim)`` and finite; ``ValueError`` naming the model otherwise
    (a wrong width used to fail inside a matmul, a 3-D input inside the gates' broadcast, and NaN passed)."""
    check_rows(v, dim, name="v", rows="B", prefix=f"{who}: ")


class DenseMLPExperts(nn.Module):
    """E independent MLP experts with stacked weights, evaluated densely.

    Each layer is ``act(norm(x @ W_e + b_e))`` (``norm_layers="all"``) or, with ``norm_layers="last"``,
    ``act(x @ W_e + b_e)`` on the hidden layers and ``act(norm(x @ W_e + b_e))`` on the output layer only;
    ``W`` is stored stacked as ``(E, D_in, D_out)``. ``norm="bn"`` is a BatchNorm over each expert's units
    (HoME's "expert normalisation" ``Swish(Norm(MLP_E(x)))``: between the linear map and the activation
    [R]); ``"ln"`` a LayerNorm of each expert's output (statistics per expert and row; its affine scale and
    shift are shared by the experts of the bank).

    Args:
        num_experts: E.
        dim: D, input width.
        hidden_dims: widths of the layers; the last one is the expert output width H.
        norm: ``"none"`` | ``"bn"`` | ``"ln"``.
        activation: ``"relu"`` (MMoE/PLE) or ``"silu"`` (HoME's Swish, β = 1).
        dropout: dropout after each layer's activation.
        norm_layers: ``"all"``: every layer is normalised; ``"last"``: only the output layer (HoME's
            ``Swish(Norm(MLP_E(x)))`` read literally: the norm acts on the expert's output). Only the
            normalised layers own norm parameters (the others hold an ``nn.Identity`` placeholder).
    """

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        hidden_dims: Sequence[int],
        norm: Norm = "none",
        activation: Activation = "relu",
        dropout: float = 0.0,
        norm_layers: NormLayers = "all",
    ) -> None:
        super().__init__()
        if num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {num_experts}")
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one layer width")
        self.num_experts, self.dim = num_experts, dim
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.norm = check_choice("norm", norm, get_args(Norm))
        self.activation = check_choice("activation", activation, get_args(Activation))
        self.norm_layers = check_choice("norm_layers", norm_layers, get_args(NormLayers))
        dims = (dim, *self.hidden_dims)
        n_layers = len(self.hidden_dims)
        # layers whose pre-activation is normalised
        self._normed = tuple(
            norm != "none" and (norm_layers == "all" or i == n_layers - 1) for i in range(n_layers)
        )
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, a, b)) for a, b in zip(dims[:-1], dims[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(num_experts, b)) for b in dims[1:])
        if num_experts == 0 or norm == "none":
            self.norms = None
        else:
            make = (lambda b: nn.BatchNorm1d(num_experts * b)) if norm == "bn" else nn.LayerNorm
            self.norms = nn.ModuleList(
                make(b) if on else nn.Identity() for b, on in zip(dims[1:], self._normed)
            )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def out_dim(self) -> int:
        return self.hidden_dims[-1]

    def reset_parameters(self) -> None:
        # nn.Linear's default initialisation (kaiming-uniform, a=sqrt(5)), per expert
        for w, b in zip(self.weights, self.biases):
            bound = 1 / math.sqrt(w.shape[1])
            with torch.no_grad():
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate every expert.

        Args:
            x: ``(B, D)`` input shared by all experts, or ``(B, E, D)`` one input per expert.

        Returns:
            ``(B, E, H)`` expert outputs.
        """
        wrong_e = x.dim() == 3 and self.num_experts > 0 and x.shape[1] != self.num_experts
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim or wrong_e:
            raise ValueError(
                f"expected x of shape (B, D={self.dim}) or (B, E={self.num_experts}, D={self.dim}), got "
                f"{tuple(x.shape)}"
            )
        b = x.shape[0]
        if self.num_experts == 0:
            return x.new_zeros(b, 0, self.out_dim)
        e = self.num_experts
        # the first layer of a shared input is one (B, D) x (D, E*H_0) matmul and stays batch-major through
        # its norm and activation (no layout copy; the output of a one-layer bank is contiguous (B, E, H));
        # later layers run expert-major (E, B, H_i), one batched matmul each
        if x.dim() == 2:
            w_flat = self.weights[0].permute(1, 0, 2).reshape(self.dim, -1)  # (D, E*H_0)
            h = torch.addmm(self.biases[0].reshape(-1), x, w_flat)  # (B, E*H_0)
            if self._normed[0] and self.norm == "bn":
                h = self.norms[0](h)  # BN over every expert unit
            elif self._normed[0]:  # ln
                h = self.norms[0](h.view(b, e, -1))  # (B, E, H_0)
            h = self.dropout(self._act(h)).view(b, e, -1)  # (B, E, H_0)
            if len(self.weights) == 1:
                return h
            h = h.transpose(0, 1)  # (E, B, H_0)
            first = 1
        else:
            h, first = x.transpose(0, 1), 0  # (E, B, D)
        for i in range(first, len(self.weights)):
            h = torch.baddbmm(self.biases[i][:, None, :], h, self.weights[i])  # (E, B, H_i)
            if self._normed[i] and self.norm == "bn":
                hb = h.transpose(0, 1).reshape(b, -1)  # (B, E*H_i): BN over every expert unit
                h = self.norms[i](hb).view(b, e, -1).transpose(0, 1)  # (E, B, H_i)
            elif self._normed[i]:  # ln
                h = self.norms[i](h)
            h = self.dropout(self._act(h))
        return h.transpose(0, 1)  # (B, E, H)

    def _act(self, h: torch.Tensor) -> torch.Tensor:
        """The activation; ReLU in place when ``h`` is a fresh matmul/norm output (not a view).

        In place saves one allocation and pass per layer (measured [M] ~10 % of a layer's forward+backward);
        on a view autograd would add a copy-and-fill of the base in backward, which costs more. SiLU's
        backward needs its input, so it is never in place.
        """
        if self.activation == "relu":
            return F.relu(h, inplace=not h._is_view())
        return F.silu(h)
