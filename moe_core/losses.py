"""Auxiliary router losses as pure functions of :class:`~moe_core.types.RouterOutput`.

Papers (arXiv ids): Switch 2101.03961 (balance), ST-MoE 2202.08906 (z-loss), DeepSeekMoE 2401.06066 and
DeepSeek-V2/V3 2405.04434 / 2412.19437 (expert/device-level and sequence-wise balance), AdaMoE 2406.13233
(null experts), dynamic top-p 2403.07652 (entropy loss), Shazeer 2017 1701.06538 (importance/load CV^2).
Each function's docstring gives its formula; ``docs/moe_core.md`` compares our normalisation with other
implementations' (values at perfect balance) and explains the provenance tags ([P], [U], [D], [M], ...).

Every function returns an unweighted scalar (the caller, e.g. an app's ``task.py``, multiplies it by its
coefficient), computes in float32, and nothing is stored anywhere. Hard assignment counts ``f`` carry no
gradient; soft probabilities ``P`` do. Functions taking ``token_mask`` ``(N,)`` bool (True = real token)
ignore padded tokens in both ``f`` and ``P`` (HF passes ``attention_mask`` the same way).

Declared losses: every router in ``moe_core.routers`` has ``aux_losses(routing, *, batch_size=None,
token_mask=None) -> dict[str, Tensor]`` returning the unweighted terms its paper defines, keyed by
:data:`AUX_LOSS_KEYS` (``"balance"``: the paper's load-balance loss; ``"entropy"``: the dynamic top-p
router's entropy loss). :func:`sum_aux_losses` sums them over many routing decisions; the caller weights each
key (``w_balance * balance + w_entropy * entropy``). The ST-MoE z-loss is never declared: it is a generic
regulariser the task adds itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Protocol, get_args, runtime_checkable

import torch

from moe_core.types import RouterOutput
from moe_core.validation import check_choice, check_router_output

BalanceLevel = Literal["expert", "device"]
AUX_LOSS_KEYS: tuple[str, ...] = ("balance", "entropy")
"""The fixed vocabulary of declared auxiliary losses (keys of ``aux_losses`` / :func:`sum_aux_losses`)."""


@runtime_checkable
class DeclaresAuxLosses(Protocol):
    """A router that declares its paper's auxiliary losses (every router of ``moe_core.routers``)."""

    def aux_losses(
        self, routing: RouterOutput, *, batch_size: int | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]: ...


def sum_aux_losses(
    pairs: Iterable[tuple[DeclaresAuxLosses, RouterOutput]],
    *,
    batch_size: int | None = None,
    token_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Sum each declared auxiliary loss over many routing decisions (layers, Chain-of-Experts rounds).

    Args:
        pairs: ``(router, routing)`` pairs; ``routing`` is what ``router`` returned.
        batch_size: number of sequences B of the N routed tokens (sequence-wise losses), passed to every
            router; routers without a sequence-wise loss ignore it.
        token_mask: optional ``(N,)`` bool, False for padding tokens, passed to every router.

    Returns:
        ``{key: scalar float32}`` for the keys of :data:`AUX_LOSS_KEYS` that at least one router declared
        (keys declared nowhere are absent; ``{}`` for no pairs). Unweighted: the caller multiplies each key
        by its coefficient.
    """
    total: dict[str, torch.Tensor] = {}
    for router, routing in pairs:
        if not isinstance(router, DeclaresAuxLosses):
            raise TypeError(f"{type(router).__name__} declares no aux_losses (not a moe_core router)")
        for key, value in router.aux_losses(routing, batch_size=batch_size, token_mask=token_mask).items():
            if key not in AUX_LOSS_KEYS:
                raise ValueError(f"{type(router).__name__} declared unknown aux loss {key!r}; "
                                 f"keys must be in {AUX_LOSS_KEYS}")
            total[key] = total[key] + value if key in total else value
    return total


def _token_weights(routing: RouterOutput, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``(N,)`` float32 weights: 1 for real tokens, 0 for padding."""
    n = routing.indices.shape[0]
    if token_mask is None:
        return torch.ones(n, device=routing.indices.device)
    if token_mask.shape != (n,):
        raise ValueError(f"token_mask must have shape (N={n},), got {tuple(token_mask.shape)}")
    return token_mask.to(device=routing.indices.device, dtype=torch.float32)


def assignment_matrix(routing: RouterOutput) -> torch.Tensor:
    """``(N, E)`` float32 number of used slots of each token on each expert (hard counts, no gradient)."""
    check_router_output(routing, "assignment_matrix")
    n, e = routing.indices.shape[0], routing.num_experts
    used = routing.slot_mask().float()  # (N, K)
    return torch.zeros(n, e, device=used.device).scatter_add_(1, routing.indices, used)  # (N, E)


def _masked_mean(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of ``values (N, ...)`` weighted by ``w (N,)`` (0 when no token is real)."""
    shape = (-1,) + (1,) * (values.dim() - 1)
    return (values * w.view(shape)).sum(0) / w.sum().clamp_min(1.0)


def switch_balance_loss(
    routing: RouterOutput, *, token_mask: torch.Tensor | None = None, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, top-k form ``E * sum_i f_i P_i``.

    Normalisation (our choice [D]; other codes' factors are tabulated in ``docs/moe_core.md``): ``f_i`` =
    share of all used (token, slot) pairs that went to expert i (so ``sum_i f_i = 1`` for any k; hard, no
    gradient); ``P_i`` = mean over tokens of ``probs[:, i]`` (soft). This equals Switch's top-1 loss for k =
    1, DeepSpeed's ``topkgating`` loss ``E^2/k * mean(me * ce)`` and the DeepSeekMoE expert-level loss ``sum_i
    f'_i P_i`` with ``f'_i = E/(kT) count_i``. **Value at perfect balance (uniform P and every expert
    receiving ``T k / E`` pairs) is 1 for every k**; complete collapse onto one expert with probability 1
    gives E. (HF Mixtral's ``load_balancing_loss_func`` is k times this.) Only the first E columns of
    ``probs`` are used (null experts have their own loss).

    Global-batch balancing (arXiv 2501.11873): pass ``counts`` ``(E,)`` summed over micro-batches and
    data-parallel ranks (the caller all-reduces, e.g. ``routing.counts()``); ``f`` then comes from those
    counts while ``P`` stays local.

    Args:
        routing: a RouterOutput.
        token_mask: optional ``(N,)`` bool, False for padding tokens.
        counts: optional ``(E,)`` externally accumulated assignment counts (no gradient).

    Returns:
        scalar float32 loss (multiply by the coefficient, e.g. 1e-2 as in Switch).
    """
    check_router_output(routing, "switch_balance_loss")
    e = routing.num_experts
    w = _token_weights(routing, token_mask)  # (N,)
    if counts is None:
        counts = (assignment_matrix(routing) * w[:, None]).sum(0)  # (E,)
    elif counts.shape != (e,):
        raise ValueError(f"counts must have shape ({e},), got {tuple(counts.shape)}")
    counts = counts.detach().float().to(w.device)
    f = counts / counts.sum().clamp_min(1.0)  # (E,)
    p = _masked_mean(routing.probs[:, :e].float(), w)  # (E,)
    return e * (f * p).sum()


def router_z_loss(routing: RouterOutput, *, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss ``(1/T) sum_t (logsumexp_j z_{t,j})^2`` (arXiv 2202.08906).

    Uses ``routing.logits`` (including null-expert columns when present). Gradient
    ``dL/dz_{t,j} = (2/T) logsumexp(z_t) softmax(z_t)_j``; zero logits give ``(log E)^2``.

    Args:
        routing: a RouterOutput.
        token_mask: optional ``(N,)`` bool, False for padding tokens.

    Returns:
        scalar float32 loss (ST-MoE coefficient 1e-3).
    """
    check_router_output(routing, "router_z_loss")
    w = _token_weights(routing, token_mask)  # (N,)
    lse = torch.logsumexp(routing.logits.float(), dim=-1)  # (N,)
    return _masked_mean(lse.square(), w)


def deepseek_balance_loss(
    routing: RouterOutput,
    *,
    level: BalanceLevel = "expert",
    num_devices: int | None = None,
    batch_size: int | None = None,
    normalize_scores: bool = False,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeekMoE balance losses (arXiv 2401.06066 §3.3; DeepSeek-V2 2405.04434, V3 2412.19437).

    Expert level: ``sum_i f_i P_i`` with ``f_i = E / (K T) * count_i`` (K = mean used slots per token, so
    ``f_i = E * count_i / pairs``) and ``P_i = mean_t s_{t,i}``; equals :func:`switch_balance_loss`; 1 at
    perfect balance. Device level (``level="device"``, experts split into ``num_devices`` contiguous equal
    groups): ``sum_d f'_d P'_d`` with ``f'_d = mean_{j in d} f_j`` and ``P'_d = sum_{j in d} P_j``; also 1 at
    balance, and equal to the expert level with one expert per device.

    Sequence-wise (``batch_size=B``, DeepSeek ``seq_aux=True``; V3's complementary loss): the N tokens are
    ``B`` sequences of ``N / B`` consecutive tokens; the loss is computed per sequence and averaged over B.
    ``normalize_scores`` uses ``s' = s / sum_j s_j`` per token (V3 with sigmoid scores) instead of ``probs``.

    Args:
        routing: a RouterOutput.
        level: ``"expert"`` or ``"device"``.
        num_devices: D (needed for ``level="device"``; divides E).
        batch_size: None (whole batch) or the number of sequences B (divides N).
        normalize_scores: renormalise the scores per token before averaging.
        token_mask: optional ``(N,)`` bool, False for padding tokens.

    Returns:
        scalar float32 loss (multiply by alpha_1 / alpha_2).
    """
    check_router_output(routing, "deepseek_balance_loss")
    check_choice("level", level, get_args(BalanceLevel))
    n, e = routing.indices.shape[0], routing.num_experts
    if level == "device" and (num_devices is None or num_devices < 1 or e % num_devices):
        raise ValueError(f"num_devices must divide num_experts={e} for level='device', got {num_devices}")
    b = 1 if batch_size is None else batch_size
    if b < 1 or n % b:
        raise ValueError(f"batch_size must be >= 1 and divide the {n} tokens, got {batch_size}")
    w = _token_weights(routing, token_mask).view(b, n // b, 1)  # (B, T, 1)
    s = routing.probs[:, :e].float()  # (N, E)
    if normalize_scores:
        s = s / s.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    hits = assignment_matrix(routing).view(b, n // b, e) * w  # (B, T, E)
    counts = hits.sum(1)  # (B, E)
    f = e * counts / counts.sum(-1, keepdim=True).clamp_min(1.0)  # (B, E)
    p = (s.view(b, n // b, e) * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, E)
    if level == "device":
        f = f.view(b, num_devices, -1).mean(-1)  # (B, D)
        p = p.view(b, num_devices, -1).sum(-1)  # (B, D)
    return (f * p).sum(-1).mean()


def null_expert_balance_loss(
    routing: RouterOutput, *, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """AdaMoE null-expert-aware balance loss (arXiv 2406.13233, ``CengZihao/AdaMoE: exp_1``).

    Switch form over all ``E + m`` buckets, ``(E + m) * sum_i f_i P_i`` with ``f_i`` = share of the k' picks
    per token that went to bucket i and ``P_i`` = mean of ``probs[:, i]``, except that every null expert's
    ``f`` is replaced by the mean null ``f``: the loss balances the true experts and controls total null usage
    only, without caring which null expert was picked. Normalised like :func:`switch_balance_loss` (1 at
    perfect balance; with m = 0 the two agree). Needs a RouterOutput from ``NullExpertRouter``
    (``aux["all_indices"]``, ``aux["num_null"]``).

    Args:
        routing: output of ``moe_core.routers.NullExpertRouter``.
        token_mask: optional ``(N,)`` bool, False for padding tokens.

    Returns:
        scalar float32 loss.
    """
    check_router_output(routing, "null_expert_balance_loss")
    if "all_indices" not in routing.aux or "num_null" not in routing.aux:
        raise ValueError("routing must come from NullExpertRouter (aux needs 'all_indices' and 'num_null')")
    e, m = routing.num_experts, int(routing.aux["num_null"])
    picks = routing.aux["all_indices"]  # (N, k')
    w = _token_weights(routing, token_mask)  # (N,)
    hits = torch.zeros(picks.shape[0], e + m, device=picks.device)  # (N, E + m)
    hits.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float32))
    counts = (hits * w[:, None]).sum(0)  # (E + m,)
    if m > 0:
        counts = torch.cat([counts[:e], counts[e:].mean().expand(m)])  # (E + m,) nulls share their mean
    f = counts / counts.sum().clamp_min(1.0)  # (E + m,)
    p = _masked_mean(routing.probs.float(), w)  # (E + m,)
    return (e + m) * (f * p).sum()


def top_p_entropy_loss(routing: RouterOutput, *, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic-routing loss ``L_dyn`` of arXiv 2403.07652: mean over tokens of ``-sum_i P_i log P_i``.

    Minimising it sharpens the router so that top-p routing activates fewer experts. Range
    ``[0, log E]``; 0 for one-hot probabilities.

    Args:
        routing: a RouterOutput (any router with ``probs``).
        token_mask: optional ``(N,)`` bool, False for padding tokens.

    Returns:
        scalar float32 loss (paper beta 1e-4 [U]).
    """
    check_router_output(routing, "top_p_entropy_loss")
    w = _token_weights(routing, token_mask)  # (N,)
    p = routing.probs.float()  # (N, E)
    ent = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)  # (N,)
    return _masked_mean(ent, w)


def cv_squared(v: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var(v) / mean(v)^2`` (unbiased variance as in the reference PyTorch
    port of Shazeer's code); 0 for a constant vector or a single element."""
    v = v.float()
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var() / (v.mean().square() + eps)


def noisy_load_importance_loss(
    routing: RouterOutput,
    *,
    w_importance: float = 1.0,
    w_load: float = 1.0,
    token_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shazeer et al. importance and load losses (arXiv 1701.06538), ``w_imp CV(Importance)^2 + w_load
    CV(Load)^2``.

    ``Importance_i = sum_t G(x_t)_i`` (the combine weights), ``Load_i = sum_t P(x_t, i)`` with the smooth
    load probabilities ``aux["load_probs"]`` from ``NoisyTopKRouter``. Both terms are 0 when importance and
    load are uniform. The paper uses ``w_imp = w_load = 0.1`` [U].

    Args:
        routing: output of ``moe_core.routers.NoisyTopKRouter``.
        w_importance: weight of the importance term.
        w_load: weight of the load term.
        token_mask: optional ``(N,)`` bool, False for padding tokens.

    Returns:
        scalar float32 loss.
    """
    check_router_output(routing, "noisy_load_importance_loss")
    if "load_probs" not in routing.aux:
        raise ValueError("routing must come from NoisyTopKRouter (aux needs 'load_probs')")
    w = _token_weights(routing, token_mask)[:, None]  # (N, 1)
    importance = (routing.dense_weights().float() * w).sum(0)  # (E,)
    load = (routing.aux["load_probs"].float() * w).sum(0)  # (E,)
    return w_importance * cv_squared(importance) + w_load * cv_squared(load)


def dts_balance_loss(routing: RouterOutput, *, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """EvoMoE dense-to-sparse gate balance loss as the paper's code computes it (arXiv 2112.14397;
    ``codecaution/EvoMoE: fairseq/modules/moe/topkgate.py`` ``topkgating``).

    GShard/Switch form on the active mask: ``E^2 mean_i(me_i ce_i) = E sum_i me_i ce_i`` with ``me_i`` = mean
    over tokens of the combine weight of expert i (``active * softmax(z)``, or ``active * gg`` with Gumbel
    gates: soft, carries the gradient) and ``ce_i`` = share of tokens on which expert i is active (hard).
    Unlike :func:`switch_balance_loss` it is not normalised by the number of active experts: with every
    expert active (early soft phase) it is the constant E (``sum_i me_i = 1``, no gradient); one expert per
    token with uniform probabilities and equal loads gives ``1 / E``.

    Args:
        routing: a training-mode output of ``moe_core.routers.DenseToSparseRouter`` (``(N, E)`` slots with
            ``mask`` = active); any RouterOutput works (``dense_weights`` and the used slots are read).
        token_mask: optional ``(N,)`` bool, False for padding tokens.

    Returns:
        scalar float32 loss.
    """
    check_router_output(routing, "dts_balance_loss")
    e = routing.num_experts
    w = _token_weights(routing, token_mask)  # (N,)
    me = _masked_mean(routing.dense_weights().float(), w)  # (E,)
    ce = _masked_mean(assignment_matrix(routing).clamp_max(1.0), w)  # (E,) share of tokens with i active
    return e * (me * ce).sum()
