"""Slow, obviously correct oracles for the MoE dispatch (tests only). Semantics: Mixtral, arXiv 2401.04088.

Nothing here is fast; each function loops in Python over tokens and slots so that it can be read line by line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def reference_moe(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    expert_fn: ExpertFn,
) -> torch.Tensor:
    """``out[t] = sum_k [mask[t, k]] * weights[t, k] * expert_fn(indices[t, k], x[t])``, one slot at a time.

    Args:
        x: ``(N, D)`` tokens.
        indices: ``(N, K)`` expert ids.
        weights: ``(N, K)`` combine weights (multiply the expert output).
        mask: optional ``(N, K)`` bool; False slots contribute nothing.
        expert_fn: ``(e, x_row (1, D)) -> (1, D)`` output of expert ``e``.

    Returns:
        ``(N, D)``.
    """
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t : t + 1])  # (1, D)
        for k in range(indices.shape[1]):
            if mask is not None and not bool(mask[t, k]):
                continue
            acc = acc + weights[t, k].to(x.dtype) * expert_fn(int(indices[t, k]), x[t : t + 1])
        rows.append(acc)
    return torch.cat(rows) if rows else x.new_zeros(0, x.shape[1])


def dense_mixture(x: torch.Tensor, probs: torch.Tensor, expert_fn: ExpertFn) -> torch.Tensor:
    """Soft mixture over all E experts: ``out[t] = sum_e probs[t, e] * expert_fn(e, x[t])``.

    Args:
        x: ``(N, D)``.
        probs: ``(N, E)`` mixture weights.
        expert_fn: as in :func:`reference_moe`.

    Returns:
        ``(N, D)``.
    """
    out = torch.zeros_like(x)  # (N, D)
    for e in range(probs.shape[1]):
        out = out + probs[:, e : e + 1].to(x.dtype) * expert_fn(e, x)
    return out


def swiglu_expert_fn(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ExpertFn:
    """Expert function of stacked SwiGLU weights ``gate/up (E, D, H)``, ``down (E, H, D)``."""
    act = act or torch.nn.functional.silu
    return lambda e, xr: (act(xr @ gate[e]) * (xr @ up[e])) @ down[e]


def mlp_expert_fn(
    up: torch.Tensor, down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
) -> ExpertFn:
    """Expert function of stacked plain MLP weights ``up (E, D, H)``, ``down (E, H, D)``."""
    return lambda e, xr: act(xr @ up[e]) @ down[e]
