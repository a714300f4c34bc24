"""Shared types of moe_core and the dimension glossary.

Glossary (used in every shape comment of the package):
    B  batch                     T  time / sequence length
    D  model width (``dim``)     H  expert hidden width (``hidden_dim``)
    E  routed experts            K  experts per token (slots; ``top_k``)
    N  routed tokens (B*T)       M  tasks (multi-gate mixtures)
    V  vocabulary                F  raw features

Every router returns a :class:`RouterOutput`; every expert bank consumes ``(x, indices, weights, mask)``;
``MoELayer`` returns a :class:`MoEOutput`. Auxiliary losses are pure functions of ``RouterOutput`` in
``moe_core.losses``; nothing is collected in globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RouterOutput:
    """What a router decided for N tokens.

    Attributes:
        logits: ``(N, E)`` raw router scores, float32. For routers with null experts the null columns
            are appended: ``(N, E + num_null)``.
        probs: ``(N, E)`` scores after the router's activation (softmax or sigmoid), float32. Same width as
            ``logits``.
        weights: ``(N, K)`` combine weights for the selected slots, float32 (the layer casts them to the
            activation dtype). A masked slot has weight 0.
        indices: ``(N, K)`` int64 expert ids in ``[0, E)`` for every slot (masked slots hold a valid
            placeholder id, never a null-expert id).
        mask: ``(N, K)`` bool, True where the slot is really used, or ``None`` when every slot is used
            (fixed top-k without dropping). Variable-k routers (top-p, null experts, DTS, expert choice)
            and capacity dropping set it.
        aux: extra per-router tensors used by specific losses (e.g. noisy top-k load probabilities,
            null-expert counts); documented by the router that writes them.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    mask: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_experts(self) -> int:
        """Number of routed (real) experts E."""
        return int(self.aux["num_experts"]) if "num_experts" in self.aux else self.probs.shape[-1]

    def slot_mask(self) -> torch.Tensor:
        """``(N, K)`` bool mask of used slots (all True when ``mask`` is None)."""
        if self.mask is None:
            return torch.ones_like(self.indices, dtype=torch.bool)
        return self.mask

    def dense_weights(self) -> torch.Tensor:
        """``(N, E)`` combine-weight matrix (zeros for unselected experts; duplicate slots summed)."""
        n = self.indices.shape[0]
        w = self.weights * self.slot_mask().to(self.weights.dtype)  # (N, K)
        out = w.new_zeros(n, self.num_experts)  # (N, E)
        return out.scatter_add(1, self.indices, w)

    def counts(self) -> torch.Tensor:
        """``(E,)`` number of (token, slot) pairs sent to each expert (no gradient)."""
        idx = self.indices[self.slot_mask()]
        return torch.bincount(idx.reshape(-1), minlength=self.num_experts)


@dataclass
class MoEOutput:
    """Output of an MoE layer.

    Attributes:
        output: same shape as the layer input, ``(B, T, D)`` or ``(N, D)``.
        routing: the router's decision for the flattened ``(N, D)`` tokens; a list with one entry per
            iteration for Chain-of-Experts layers; an empty list for a layer that routes nothing (a dense
            FFN, ``moe_core.layer.DenseLayer``).
    """

    output: torch.Tensor
    routing: RouterOutput | list[RouterOutput]

    def routings(self) -> list[RouterOutput]:
        """The routing decisions as a list (one element for ordinary layers, none for dense ones)."""
        return self.routing if isinstance(self.routing, list) else [self.routing]
