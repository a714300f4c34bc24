"""SCMoE self-contrast decoding (arXiv 2405.14507; code DavidFanzz/SCMoE ``decodingmethod/moe_utils.py``).

From the code [C]: a strong pass with the model's top-k routing and a weak pass with "rank-k" routing (only
the expert at sorted position r, weight 1); plausibility set ``logit_s >= log(alpha) + max logit_s``;
score ``(1 + beta) logit_s - beta logit_w`` on that set; defaults alpha = 0.1, beta = 0.5.
Our reading [D]: no KV cache (each step recomputes the prefix; fine for small models), the weak pass
applies rank-k routing in every MoE block.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from moe_core.inference.override import RouterHook

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def lm_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Default forward: ``model(ids)`` -> ``(B, T, V)`` logits (tensor, ``.logits``, or first tuple item)."""
    out = model(ids)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


class RankKRouting(RouterHook):
    """Weak-model routing: each token uses only its expert at sorted position ``rank`` (0-based), weight 1.

    The rank is among the block's ``E`` real experts: a null-expert router's extra probability columns (its
    "no expert" choices, ids ``>= E``) are not experts the bank could run, so they are left out.
    """

    def __init__(self, model: nn.Module, *, rank: int) -> None:
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.rank = rank

        def fn(p, ref, probs, out):
            e = int(getattr(ref.experts, "num_experts", probs.shape[1]))
            real = probs[:, : min(e, probs.shape[1])]  # (N, E)
            if rank >= real.shape[1]:
                raise ValueError(f"rank={rank} >= number of experts {real.shape[1]}")
            idx = real.argsort(dim=-1, descending=True, stable=True)[:, rank : rank + 1]  # (N, 1)
            return torch.ones_like(idx, dtype=probs.dtype), idx

        super().__init__(model, fn)


def contrast_scores(
    strong: torch.Tensor, weak: torch.Tensor, *, alpha: float = 0.1, beta: float = 0.5
) -> torch.Tensor:
    """SCMoE scores ``(1+beta) s - beta w`` on the plausible set ``s >= log(alpha) + max s``, else -inf.

    Args:
        strong, weak: ``(..., V)`` logits (any per-row constant shift leaves the argmax unchanged).
    """
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    s, w = strong.float(), weak.float()
    valid = s >= math.log(alpha) + s.amax(dim=-1, keepdim=True)
    score = (1 + beta) * s - beta * w
    return score.masked_fill(~valid, float("-inf"))


def scmoe_logits(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    alpha: float = 0.1,
    beta: float = 0.5,
    rank: int = 2,
    forward: Forward = lm_logits,
) -> torch.Tensor:
    """Teacher-forced SCMoE scores for every position: ``(B, T, V)``."""
    strong = forward(model, ids)
    with RankKRouting(model, rank=rank):
        weak = forward(model, ids)
    return contrast_scores(strong, weak, alpha=alpha, beta=beta)


@torch.no_grad()
def scmoe_generate(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    max_new_tokens: int,
    alpha: float = 0.1,
    beta: float = 0.5,
    rank: int = 2,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
    forward: Forward = lm_logits,
) -> torch.Tensor:
    """Generate with self-contrast decoding.

    Args:
        model: an MoE causal LM.
        ids: ``(B, T)`` prompt.
        max_new_tokens: tokens to add.
        alpha, beta, rank: SCMoE parameters (beta = 0 gives greedy strong decoding).
        do_sample: sample from ``softmax(score)`` instead of argmax.

    Returns:
        ``(B, T + max_new_tokens)`` token ids.
    """
    for _ in range(max_new_tokens):
        score = scmoe_logits(model, ids, alpha=alpha, beta=beta, rank=rank, forward=forward)[:, -1]  # (B, V)
        if do_sample:
            nxt = torch.multinomial(score.softmax(-1), 1, generator=generator)  # (B, 1)
        else:
            nxt = score.argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
    return ids


@torch.no_grad()
def greedy_generate(
    model: nn.Module, ids: torch.Tensor, *, max_new_tokens: int, forward: Forward = lm_logits
) -> torch.Tensor:
    """Plain greedy decoding with the model's own routing (the baseline)."""
    for _ in range(max_new_tokens):
        nxt = forward(model, ids)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
    return ids
