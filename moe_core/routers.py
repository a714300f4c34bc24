"""Routers: map tokens ``(N, D)`` to a :class:`~moe_core.types.RouterOutput`.

Papers (arXiv ids): top-k softmax gating GShard 2006.16668, Switch 2101.03961, Mixtral 2401.04088; capacity
dropping Switch/DeepSpeed; noisy top-k 1701.06538; expert choice 2202.09368; dynamic top-p 2403.07652; AdaMoE
null experts 2406.13233; MoGE 2505.21411; DeepSeek-V2 2405.04434 / V3 2412.19437 (group-limited, aux-loss-free
bias 2408.15664); EvoMoE dense-to-sparse gate 2112.14397. Each router's docstring gives its formulas and
defaults; ``docs/moe_core.md`` lists the papers and the provenance tags ([P], [C], [U], [D], ...).

Common contract:

* ``forward(x (N, D)) -> RouterOutput``; attributes ``dim`` (D), ``num_experts`` (E) and ``gate`` (an
  ``nn.Linear(D, E, bias=False)`` holding the router weight ``W_g (E, D)``).
* Routing math runs in float32 whatever the activation dtype (``logits``, ``probs``, ``weights`` are float32);
  the MoE layer casts the combine weights back to the activation dtype.
* Fixed-k routers return ``indices``/``weights`` of shape ``(N, K)`` and ``mask=None`` unless slots were
  dropped. Variable-k routers (expert choice, top-p, null experts, DTS in training) return ``(N, K)`` slots
  padded with a bool ``mask`` (False slots hold a valid placeholder id and weight 0; expert banks skip them).
* Input checks: ``x`` must be 2-D of width ``dim`` and finite (no NaN, no +/-inf: ``torch.isfinite(x).all()``,
  which costs one device-to-host sync per call); violations raise ``ValueError`` naming ``x``. Constructor
  arguments are validated and unknown ``Literal`` choices raise ``ValueError`` naming the argument.
* Extreme finite inputs give finite routing: float32 logits that overflow (``x W^T`` beyond the float32 range,
  or NaN from ``inf - inf`` inside the dot product) are guarded (:func:`finite_logits`); renormalised sigmoid
  weights are computed in log space, so scores that underflow to 0 still give weights summing to 1.

Auxiliary losses: every router declares the unweighted auxiliary losses its paper defines with
``aux_losses(routing, *, batch_size=None, token_mask=None) -> dict[str, Tensor]`` (keys from
``moe_core.losses.AUX_LOSS_KEYS``: ``"balance"``, and ``"entropy"`` for dynamic top-p only). Arguments:
``routing`` is what the router returned; ``batch_size`` is the number of sequences B when the N tokens are
B sequences of N / B consecutive tokens (only the sequence-wise DeepSeek loss uses it; the others ignore it);
``token_mask`` ``(N,)`` bool is False for padding tokens. Each value is a scalar float32 tensor computed by a
pure function of ``moe_core.losses``; the caller multiplies ``"balance"`` by its ``w_balance`` and
``"entropy"`` by its ``w_entropy`` (``moe_core.losses.sum_aux_losses`` sums over layers). The ST-MoE z-loss
is not declared (a generic task-level regulariser).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import nn

from moe_core.losses import (
    deepseek_balance_loss,
    dts_balance_loss,
    noisy_load_importance_loss,
    null_expert_balance_loss,
    switch_balance_loss,
    top_p_entropy_loss,
)
from moe_core.types import RouterOutput
from moe_core.validation import check_choice, check_rows

LOGIT_BOUND: float = torch.finfo(torch.float32).max / 4
"""Magnitude bound of guarded float32 logits: the difference of two guarded logits (softmax's max shift, the
noisy gate's ``clean - threshold``) stays finite."""
_MIN_NOISE_STD = 1e-6  # noisy gate std floor: (clean - threshold) / std and its gradient stay finite
_NDTR_RANGE = 40.0  # ndtr(z) is exactly 0 / 1 in float32 for |z| >= 40, so clipping z there changes nothing

DropPolicy = Literal["position", "probs"]
ScoreFunc = Literal["sigmoid", "softmax"]
ScheduleKind = Literal["linear", "exp"]


def _check_x(x: torch.Tensor, dim: int) -> None:
    """``x`` must be ``(N, dim)`` and finite: no NaN, no +/-inf (one host sync)."""
    check_rows(x, dim)


def finite_logits(z: torch.Tensor) -> torch.Tensor:
    """Guard float32 logits computed from finite inputs: ``+/-inf`` and values beyond :data:`LOGIT_BOUND`
    become ``+/-LOGIT_BOUND``; NaN (``inf - inf`` inside an overflowing dot product; sign unknown) becomes 0.

    Ordinary logits pass unchanged; guarded entries get zero gradient (they were not a function of the
    weights in float32 anyway), so the router's gradient stays finite.
    """
    return _FiniteLogits.apply(z)  # type: ignore[no-any-return]


class _FiniteLogits(torch.autograd.Function):
    """``clamp(nan_to_num(z))`` with the gradient of that composition, ``grad * [|z| <= LOGIT_BOUND]``
    (false for NaN and inf), in one ``where`` instead of autograd's five passes (issue 17: each pass over
    ``(N, E)`` is one more parallel region per step)."""

    @staticmethod
    def forward(ctx, z):  # noqa: ANN001, ANN205
        ctx.save_for_backward(z)
        return torch.nan_to_num(z, nan=0.0, posinf=LOGIT_BOUND, neginf=-LOGIT_BOUND).clamp_(
            -LOGIT_BOUND, LOGIT_BOUND
        )

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (z,) = ctx.saved_tensors
        return torch.where(z.abs() <= LOGIT_BOUND, grad, 0.0)


def _check_sizes(dim: int, num_experts: int) -> None:
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")


def _check_top_k(top_k: int, upper: int, bound: str | None = None, name: str = "top_k") -> None:
    """``top_k`` must be an int (not a bool: ``TypeError``) in ``[1, upper]`` (``ValueError``).

    ``bound`` says what ``upper`` counts (default ``num_experts=<upper>``).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"{name} must be an int, got {top_k!r} ({type(top_k).__name__})")
    if not 1 <= top_k <= upper:
        raise ValueError(f"{name} must be in [1, {bound or f'num_experts={upper}'}], got {top_k}")


def _resolve_renormalize(renormalize: bool | None, top_k: int) -> bool:
    """``None`` -> renormalise iff ``top_k > 1``; an explicit ``True`` with ``top_k == 1`` is refused.

    A single renormalised score is the constant 1 (0 when dropped), so the combine weight carries no gradient
    and the task loss would not train the router (only auxiliary losses would).
    """
    if renormalize is None:
        return top_k > 1
    if renormalize and top_k == 1:
        raise ValueError(
            "renormalize=True with top_k=1 makes every combine weight the constant 1, so the router would "
            "get no gradient from the task loss; use renormalize=None (renormalise iff top_k > 1) or False"
        )
    return bool(renormalize)


def _renorm(w: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Divide rows by their sum (clamped at ``eps`` when ``eps > 0``: all-zero rows stay zero)."""
    s = w.sum(dim=-1, keepdim=True)
    return w / (s.clamp_min(eps) if eps > 0 else s)


def _all_slots(n: int, e: int, device: torch.device) -> torch.Tensor:
    """``(N, E)`` int64 ``indices`` with every expert in its own slot (slot j holds expert j)."""
    return torch.arange(e, device=device).expand(n, e)  # (N, E)


class _GateMixin(nn.Module):
    """Holds ``gate = nn.Linear(dim, num_experts, bias=False)`` and computes float32 logits."""

    dim: int
    num_experts: int
    gate: nn.Linear

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return finite_logits(nn.functional.linear(x.float(), self.gate.weight.float()))  # (N, E)


def capacity_positions(indices: torch.Tensor, priority: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of every (token, slot) pair in its expert's buffer, in order of ``priority``.

    Pairs are ranked per expert by ascending ``priority`` (ties broken by the flattened slot-major order
    ``slot * N + token``): the pair with the smallest priority for expert ``e`` gets position 0.

    Args:
        indices: ``(N, K)`` expert ids.
        priority: ``(N, K)`` float ranks (smaller = served first).
        num_experts: E.

    Returns:
        ``(N, K)`` int64 buffer positions (``loc`` of DeepSpeed / flaxformer).
    """
    n, k = indices.shape
    flat = indices.t().reshape(-1)  # (K*N,) slot-major: all first choices, then all second choices, ...
    pri = priority.t().reshape(-1)  # (K*N,)
    order = pri.argsort(stable=True)  # (K*N,) by priority, slot-major order on ties
    order = order[flat[order].argsort(stable=True)]  # (K*N,) grouped by expert, priority order inside
    sorted_ids = flat[order]  # (K*N,)
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    starts = counts.cumsum(0) - counts  # (E,) first sorted row of each expert
    rank = torch.arange(flat.numel(), device=flat.device) - starts[sorted_ids]  # (K*N,)
    loc = torch.empty_like(rank).scatter_(0, order, rank)  # (K*N,) back to slot-major order
    return loc.view(k, n).t()  # (N, K)


class TopKRouter(_GateMixin):
    """Token-choice softmax top-k router, optionally with an expert capacity and token dropping.

    ``s = softmax(x W_g^T)``; each token picks its K largest ``s`` (GShard 2006.16668, Switch 2101.03961,
    Mixtral 2401.04088). Weights are the selected probabilities, renormalised to sum to 1 (Mixtral, GShard,
    DeepSpeed ``topkgating``) or raw (Switch, Qwen2-MoE ``norm_topk_prob=False``), then multiplied by
    ``routed_scaling_factor`` (DeepSeek-V2; 1 by default). By default top-1 is raw (Switch, DeepSpeed
    ``top1gating``) and K > 1 renormalised: a single renormalised probability is the constant 1, which leaves
    the router without task-loss gradient.

    Capacity (Switch, DeepSpeed; ``capacity_factor=None`` is dropless, the default): each expert takes at most
    ``C = max(ceil(N / E * capacity_factor * K), min_capacity)`` (token, slot) pairs (DeepSpeed's
    ``_capacity``). ``drop_policy="position"``: pairs are served in slot-major order, all first choices before
    any second choice, earlier tokens first (DeepSpeed adds the first-choice counts to the second-choice
    locations; flaxformer puts the slot axis first). ``drop_policy="probs"``: each expert keeps its C pairs
    with the highest router probability (DeepSpeed ``drop_policy="probs"``). Dropped slots get ``mask`` False
    and weight 0. With ``renormalize`` the surviving weights of each token are renormalised as DeepSpeed does
    (``w / clamp(sum w, eps)``), so a token that lost every expert gets all-zero weights (MoE output 0; the
    residual carries it). ``aux["drop_fraction"]`` = 1 - kept / (N K) and ``aux["capacity"]`` = C are
    reported. When no capacity is set, ``mask`` is None.

    Args:
        dim: model width D.
        num_experts: routed experts E.
        top_k: experts per token K (``1 <= K <= E``).
        renormalize: renormalise the selected probabilities to sum to 1. None (default): iff ``K > 1``, so
            top-1 routing uses the raw probability (Switch) and the router learns from the task loss;
            ``True`` with ``K = 1`` raises ``ValueError`` (the weight would be the constant 1). The resolved
            bool is stored as ``renormalize``.
        jitter: multiplicative input jitter ``U(1-eps, 1+eps)`` applied in training only (0 disables).
        capacity_factor: None (dropless) or a positive capacity factor.
        eval_capacity_factor: capacity factor in eval mode (None: same as ``capacity_factor``).
        drop_policy: ``"position"`` or ``"probs"`` (see above).
        min_capacity: lower bound on C (DeepSpeed's ``min_capacity``; 0 here by default).
        routed_scaling_factor: constant multiplying the combine weights.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int,
        renormalize: bool | None = None,
        jitter: float = 0.0,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        drop_policy: DropPolicy = "position",
        min_capacity: int = 0,
        routed_scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        _check_sizes(dim, num_experts)
        _check_top_k(top_k, num_experts)
        if jitter < 0 or jitter >= 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        factors = {"capacity_factor": capacity_factor, "eval_capacity_factor": eval_capacity_factor}
        for name, cf in factors.items():
            if cf is not None and not cf > 0:
                raise ValueError(f"{name} must be None or > 0, got {cf}")
        if min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {min_capacity}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.renormalize, self.jitter = _resolve_renormalize(renormalize, top_k), jitter
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.drop_policy = check_choice("drop_policy", drop_policy, get_args(DropPolicy))
        self.min_capacity, self.routed_scaling_factor = min_capacity, routed_scaling_factor
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def capacity(self, num_tokens: int) -> int | None:
        """Expert capacity C for ``num_tokens`` tokens in the current mode (None when dropless)."""
        cf = self.capacity_factor
        if not self.training and self.eval_capacity_factor is not None:
            cf = self.eval_capacity_factor
        if cf is None:
            return None
        return max(math.ceil(num_tokens / self.num_experts * cf * self.top_k), self.min_capacity)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens.

        Args:
            x: ``(N, D)`` tokens.

        Returns:
            RouterOutput with ``weights``/``indices`` of shape ``(N, K)``; ``mask`` set only with a capacity.
        """
        _check_x(x, self.dim)
        if self.training and self.jitter > 0:
            # float32, clamped: a finite x near its dtype's maximum times 1 + jitter must not become inf
            noise = torch.empty(x.shape, device=x.device, dtype=torch.float32)
            noise.uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            fmax = torch.finfo(torch.float32).max
            x = (x.float() * noise).clamp(-fmax, fmax)
        logits = self._logits(x)  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        top, indices = probs.topk(self.top_k, dim=-1)  # (N, K), (N, K)
        cap = self.capacity(x.shape[0])
        mask, aux = None, {}
        if cap is None:
            weights = _renorm(top) if self.renormalize else top
        else:
            if self.drop_policy == "position":
                priority = torch.zeros_like(top)  # ties -> slot-major, token order
            else:
                priority = -top.detach()  # highest probability served first
            loc = capacity_positions(indices, priority, self.num_experts)  # (N, K)
            mask = loc < cap  # (N, K)
            weights = top * mask
            if self.renormalize:
                weights = _renorm(weights, eps=torch.finfo(weights.dtype).eps)
            aux["capacity"] = torch.tensor(cap, device=x.device)
            aux["drop_fraction"] = 1.0 - mask.float().mean()
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return RouterOutput(logits=logits, probs=probs, weights=weights, indices=indices, mask=mask, aux=aux)

    def aux_losses(
        self, routing: RouterOutput, *, batch_size: int | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"balance": switch_balance_loss}`` (Switch/GShard ``E sum_i f_i P_i``; kept pairs only under
        capacity dropping). Arguments: see the module docstring."""
        return {"balance": switch_balance_loss(routing, token_mask=token_mask)}


class NoisyTopKRouter(_GateMixin):
    """Noisily gated top-k (Shazeer et al. 2017, arXiv 1701.06538).

    ``H = x W_g + eps * (softplus(x W_noise) + noise_epsilon)`` with ``eps ~ N(0, 1)`` in training only;
    ``G = softmax(KeepTopK(H, K))``, i.e. the top-K entries of ``softmax(H)`` renormalised. ``logits`` holds
    ``H`` (the clean logits in eval), ``probs = softmax(H)``.

    ``aux["load_probs"]`` ``(N, E)`` holds the paper's ``P(x, i) = Phi((clean_i - kth_excluding(H, K, i)) /
    noise_std_i)``, the probability that expert i would still be selected under a fresh draw of its own noise;
    ``moe_core.losses.noisy_load_importance_loss`` sums it into the smooth load estimator. With ``K = E``
    every expert is always selected and ``P = 1``. Both weight matrices start at zero as in the paper (so the
    initial noise std is ``softplus(0) + noise_epsilon``); ``noise_epsilon = 1e-2`` follows the paper's
    reference code. ``Phi`` is ``torch.special.ndtr``; the std is floored at 1e-6 (only reachable with
    ``noise_epsilon < 1e-6``) so that the ratio and its gradient stay finite.

    Declared loss (:meth:`aux_losses`): ``"balance"`` = ``w_importance CV(Importance)^2 + w_load CV(Load)^2``
    (``moe_core.losses.noisy_load_importance_loss``). The paper sets both weights to 0.1 [U]; only their
    ratio lives here (1 : 1 by default), so a task ``w_balance = 0.1`` reproduces the paper.

    Args:
        dim: D.
        num_experts: E.
        top_k: K.
        noise_epsilon: floor added to the noise std.
        w_importance: relative weight of the importance term in the declared balance loss.
        w_load: relative weight of the load term in the declared balance loss.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int,
        noise_epsilon: float = 1e-2,
        w_importance: float = 1.0,
        w_load: float = 1.0,
    ) -> None:
        super().__init__()
        _check_sizes(dim, num_experts)
        _check_top_k(top_k, num_experts)
        if noise_epsilon < 0:
            raise ValueError(f"noise_epsilon must be >= 0, got {noise_epsilon}")
        for name, value in (("w_importance", w_importance), ("w_load", w_load)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.dim, self.num_experts, self.top_k, self.noise_epsilon = dim, num_experts, top_k, noise_epsilon
        self.w_importance, self.w_load = w_importance, w_load
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.noise = nn.Linear(dim, num_experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens; ``x (N, D)`` -> ``(N, K)`` slots and ``aux["load_probs"] (N, E)``."""
        _check_x(x, self.dim)
        clean = self._logits(x)  # (N, E)
        raw = finite_logits(nn.functional.linear(x.float(), self.noise.weight.float()))  # (N, E)
        std = (nn.functional.softplus(raw) + self.noise_epsilon).clamp(_MIN_NOISE_STD, LOGIT_BOUND)  # (N, E)
        noisy = finite_logits(clean + torch.randn_like(clean) * std) if self.training else clean  # (N, E)
        probs = noisy.softmax(dim=-1)  # (N, E)
        top, indices = probs.topk(self.top_k, dim=-1)  # (N, K)
        weights = _renorm(top)  # softmax over the kept logits
        k, e = self.top_k, self.num_experts
        if k < e:
            top_h = noisy.topk(k + 1, dim=-1).values  # (N, K+1)
            thr_in = top_h[:, k : k + 1]  # (N, 1) k-th largest of the others when i is in the top-k
            thr_out = top_h[:, k - 1 : k]  # (N, 1) k-th largest when i is outside
            is_in = noisy > thr_in  # (N, E)
            lim = _NDTR_RANGE * std  # (N, E) clip (clean - thr) to |z| <= 40: z and its gradient stay finite
            p_in = torch.special.ndtr((clean - thr_in).clamp(min=-lim, max=lim) / std)  # (N, E)
            p_out = torch.special.ndtr((clean - thr_out).clamp(min=-lim, max=lim) / std)  # (N, E)
            load_probs = torch.where(is_in, p_in, p_out)  # (N, E)
        else:
            load_probs = torch.ones_like(clean)
        return RouterOutput(
            logits=noisy, probs=probs, weights=weights, indices=indices, aux={"load_probs": load_probs}
        )

    def aux_losses(
        self, routing: RouterOutput, *, batch_size: int | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"balance": noisy_load_importance_loss}`` with this router's ``w_importance``/``w_load``
        (Shazeer 2017). Arguments: see the module docstring."""
        loss = noisy_load_importance_loss(
            routing, w_importance=self.w_importance, w_load=self.w_load, token_mask=token_mask
        )
        return {"balance": loss}


class ExpertChoiceRouter(_GateMixin):
    """Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368).

    ``S = softmax(X W_g^T) (N, E)``; every expert takes its ``k_e`` highest-scoring tokens of the group with
    ``k_e = min(N, ceil(N * capacity_factor / E))`` (the paper writes ``n c / E``; rounding up is our
    reading), so every expert is exactly full and no balance loss is needed. Output: ``indices (N, E)`` with
    slot j holding expert j, ``mask (N, E)`` True where expert j chose token t, ``weights = S * mask``. A
    token may get zero experts (its MoE output is 0; the residual carries it) or many. ``aux["capacity"] =
    k_e``.

    **Not causal**: the selection looks at the whole group of N tokens, so in a decoder a token's routing
    depends on future tokens. Use it for encoders, recsys rows and other non-autoregressive inputs.

    Args:
        dim: D.
        num_experts: E.
        capacity_factor: c, the average number of experts per token (paper headline c = 2).
    """

    def __init__(self, *, dim: int, num_experts: int, capacity_factor: float = 2.0) -> None:
        super().__init__()
        _check_sizes(dim, num_experts)
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.dim, self.num_experts, self.capacity_factor = dim, num_experts, capacity_factor
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def capacity(self, num_tokens: int) -> int:
        """Tokens per expert ``k_e`` for a group of ``num_tokens``."""
        return min(num_tokens, math.ceil(num_tokens * self.capacity_factor / self.num_experts))

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route a group of tokens; ``x (N, D)`` -> RouterOutput with ``(N, E)`` slots and a mask."""
        _check_x(x, self.dim)
        n, e = x.shape[0], self.num_experts
        logits = self._logits(x)  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        ke = self.capacity(n)
        chosen = probs.topk(ke, dim=0).indices  # (k_e, E) token ids per expert
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, chosen, True)  # (N, E)
        weights = probs * mask  # (N, E)
        return RouterOutput(
            logits=logits, probs=probs, weights=weights, indices=_all_slots(n, e, x.device), mask=mask,
            aux={"capacity": torch.tensor(ke, device=x.device)},
        )

    def aux_losses(
        self, routing: RouterOutput, *, batch_size: int | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{}``: every expert takes exactly ``k_e`` tokens, so the paper uses no balance loss (flaxformer
        sets it to 0). Arguments: see the module docstring."""
        return {}


def top_p_mask(sorted_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Minimal-prefix mask of descending-sorted probabilities (dynamic top-p, arXiv 2403.07652).

    Keeps slot j when the mass strictly before it is ``<= threshold``: the prefix ends at the first slot whose
    cumulative mass is ``> threshold`` (strict; that crossing slot is included); no crossing keeps every slot.

    Args:
        sorted_probs: ``(N, E)`` probabilities sorted descending per row.
        threshold: p.

    Returns:
        ``(N, E)`` bool; slot 0 is always kept.
    """
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (N, E) mass strictly before each slot
    mask = before <= threshold
    mask[:, 0] = True
    return mask


class TopPRouter(_GateMixin):
    """Dynamic top-p routing ("Harder Tasks Need More Experts", arXiv 2403.07652).

    ``P = softmax(x W_g^T)``, sorted descending; the token uses the minimal prefix whose mass is ``>
    threshold`` (the crossing expert included; no crossing uses all E). Weights are the raw probabilities, not
    renormalised (as the paper's code). Output slots: ``indices (N, E)`` = experts in descending-probability
    order, ``mask (N, E)`` True on the prefix, ``weights`` = sorted probabilities times the mask.

    Args:
        dim: D.
        num_experts: E.
        threshold: p in ``[0, 1]`` (paper code default 0.4; 0 keeps only the top expert, 1 every expert).
    """

    def __init__(self, *, dim: int, num_experts: int, threshold: float = 0.4) -> None:
        super().__init__()
        _check_sizes(dim, num_experts)
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1] (a probability mass), got {threshold}")
        self.dim, self.num_experts, self.threshold = dim, num_experts, threshold
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens; ``x (N, D)`` -> RouterOutput with ``(N, E)`` padded slots and a mask."""
        _check_x(x, self.dim)
        logits = self._logits(x)  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        sorted_probs, indices = probs.sort(dim=-1, descending=True)  # (N, E), (N, E)
        mask = top_p_mask(sorted_probs.detach(), self.threshold)  # (N, E)
        weights = sorted_probs * mask  # (N, E) raw probabilities on the prefix
        return RouterOutput(logits=logits, probs=probs, weights=weights, indices=indices, mask=mask)

    def aux_losses(
        self, routing: RouterOutput, *, batch_size: int | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"balance": switch_balance_loss, "entropy": top_p_entropy_loss}``: the paper's ``L_balance``
        and ``L_dyn`` (``L = L_lm + alpha L_balance + beta L_dyn``). Arguments: see the module docstring."""
        return {
            "balance": switch_balance_loss(routing, token_mask=token_mask),
            "entropy": top_p_entropy_loss(routing, token_mask=token_mask),
        }


class NullExpertRouter(_GateMixin):
    """AdaMoE null experts (arXiv 2406.13233).

    ``s = softmax([x W_g^T ; x W_null^T]) (N, E + m)`` over E true and m null experts (a null expert outputs 0
    and has no parameters besides its router row); each token picks its top-``top_k`` (k') entries. Selected
    true experts get ``w_i = s_i / sum_{j selected, true} s_j`` (all-null picks: all weights 0, MoE output 0).
    Null picks are masked out (``mask`` False, placeholder id 0, weight 0), so they never reach the dispatcher
    and cost no FLOPs. The router weight of the true experts is ``gate`` ``(E, D)``; the null rows are
    ``null_gate`` ``(m, D)`` (the paper's Mixtral variant adds exactly this second linear).

    ``logits``/``probs`` have width E + m (null columns last). ``aux``: ``"num_experts"`` = E, ``"num_null"``
    = m, ``"all_indices"`` ``(N, k')`` the raw picks over E + m (ids >= E are null), used by
    ``moe_core.losses.null_expert_balance_loss``.

    Args:
        dim: D.
        num_experts: true experts E.
        num_null: null experts m (>= 0; m = 0 with k' = K is the plain renormalised top-K router).
        top_k: k' picks over the E + m experts.
    """

    def __init__(self, *, dim: int, num_experts: int, num_null: int, top_k: int) -> None:
        super().__init__()
        _check_sizes(dim, num_experts)
        if num_null < 0:
            raise ValueError(f"num_null must be >= 0, got {num_null}")
        _check_top_k(
            top_k, num_experts + num_null,
            f"num_experts + num_null = {num_experts} + {num_null} = {num_experts + num_null}",
        )
        self.dim, self.num_experts, self.num_null, self.top_k = dim, num_experts, num_null, top_k
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.null_gate = nn.Linear(dim, num_null, bias=False) if num_null > 0 else None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens; ``x (N, D)`` -> RouterOutput with ``(N, k')`` slots, null picks masked."""
        _check_x(x, self.dim)
        e = self.num_experts
        logits = self._logits(x)  # (N, E)
        if self.null_gate is not None:
            null = finite_logits(nn.functional.linear(x.float(), self.null_gate.weight.float()))  # (N, m)
            logits = torch.cat([logits, null], dim=-1)  # (N, E + m)
        probs = logits.softmax(dim=-1)  # (N, E + m)
        picks = probs.topk(self.top_k, dim=-1).indices  # (N, k')
        mask = picks < e  # (N, k') true experts
        indices = picks.masked_fill(~mask, 0)  # (N, k') placeholder id for null picks
        # s_i / sum_{selected true} s_j equals the same ratio of the softmax over the E true logits, whose
        # selected entries include the true argmax (>= 1/E): no underflow when null experts dominate
        true_probs = logits[:, :e].softmax(dim=-1)  # (N, E)
        top = true_probs.gather(1, indices) * mask  # (N, k')
        weights = _renorm(top, eps=torch.finfo(top.dtype).tiny)  # (N, k') all-null rows stay 0
        aux = {
            "num_experts": torch.tensor(e, device=x.device),
            "num_null": torch.tensor(self.num_null, device=x.device),
            "all_indices": picks,
        }
        return RouterOutput(logits=logits, probs=probs, weights=weights, indices=indices, mask=mask, aux=aux)

    def aux_losses(
        self, routing: RouterOutput, *, batch_size: int | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"balance": null_expert_balance_loss}`` (AdaMoE's switch form over E + m buckets, null counts
        averaged). Arguments: see the module docstring."""
        return {"balance": null_expert_balance_loss(routing, token_mask=token_mask)}


class GroupedRouter(_GateMixin):
    """Mixture of Grouped Experts (MoGE, Pangu Pro MoE, arXiv 2505.21411).

    ``S = softmax(x W_g^T)`` over all E experts; experts are split into ``num_groups`` contiguous equal groups
    (one per device); each token picks the top ``K' = top_k / num_groups`` experts inside every group, so
    every group (device) receives exactly ``N K'`` pairs for any batch. Weights are the selected
    global-softmax scores (sum <= 1), renormalised when ``renormalize`` (a switch; our reading, no verified
    public code). ``renormalize=True`` with ``top_k = 1`` raises ``ValueError``: the weight would be the
    constant 1 and the router would get no gradient from the task loss.

    Args:
        dim: D.
        num_experts: E (divisible by ``num_groups``).
        top_k: K, total experts per token (divisible by ``num_groups``).
        num_groups: expert groups G (one per device).
        renormalize: renormalise the selected scores to sum to 1 (needs ``top_k > 1``).
        expert_scale: a learned per-expert scale ``s (E,)`` (init 1) multiplies each selected weight:
            ``w_{t,i} = s_i * G'_{t,i}`` after any renormalisation (Pangu Pro MoE's learnable expert-specific
            router scale; [U]: the placement after selection is our reading of the released modelling code,
            not verified here). Off by default; with ``s = 1`` the output equals the unscaled router.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int,
        num_groups: int,
        renormalize: bool = False,
        expert_scale: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(dim, num_experts)
        if num_groups < 1 or num_experts % num_groups:
            raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}")
        _check_top_k(top_k, num_experts)
        if top_k % num_groups:
            raise ValueError(f"top_k must be a multiple of num_groups={num_groups}, got {top_k}")
        self.dim, self.num_experts, self.top_k, self.num_groups = dim, num_experts, top_k, num_groups
        self.renormalize = _resolve_renormalize(renormalize, top_k)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.expert_scale = nn.Parameter(torch.ones(num_experts)) if expert_scale else None

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens; ``x (N, D)`` -> RouterOutput with ``(N, K)`` slots, K' per group in group order."""
        _check_x(x, self.dim)
        logits = self._logits(x)  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        weights, indices = self.select(probs)
        return RouterOutput(logits=logits, probs=probs, weights=weights, indices=indices)

    def select(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The selection of :meth:`forward` on given probabilities ``(N, E)``: top-K' per group, renormalised
        if ``renormalize``, times ``expert_scale`` -> ``(weights, indices)`` ``(N, K)`` (also used by
        :class:`~moe_core.inference.override.RoutingOverride` to re-select from another distribution)."""
        n, g = probs.shape[0], self.num_groups
        size = self.num_experts // g
        top, local = probs.view(n, g, size).topk(self.top_k // g, dim=-1)  # (N, G, K'), (N, G, K')
        offset = torch.arange(g, device=probs.device).view(1, g, 1) * size  # (1, G, 1)
        indices = (local + offset).reshape(n, self.top_k)  # (N, K)
        weights = top.reshape(n, self.top_k)  # (N, K)
        if self.renormalize:
            weights = _renorm(weights)
        if self.expert_scale is not None:
            weights = weights * self.expert_scale.float()[indices]  # (N, K) learned per-expert scale
        return weights, indices

    def aux_losses(
        self, routing: RouterOutput, *, batch_size: int | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"balance": switch_balance_loss}``: the paper's batch-level balance loss ``sum_i f_i p_i`` on
        the global softmax scores, with DeepSeekMoE's ``f_i = E / (K T) count_i`` (equal to the switch
        form; secondary sources, no verified code). Arguments: see the module docstring."""
        return {"balance": switch_balance_loss(routing, token_mask=token_mask)}


class SigmoidTopKRouter(_GateMixin):
    """DeepSeek-V3 gate: sigmoid scores, group-limited selection, auxiliary-loss-free bias (arXiv 2412.19437).

    Paper/code (arXiv 2412.19437, ``deepseek-ai/DeepSeek-V3: inference/model.py`` ``Gate``):

    * ``s = sigmoid(x W_g^T)`` (``score_func="sigmoid"``) or ``softmax`` (DeepSeek-V2, 2405.04434).
    * Selection uses ``s + b`` (b is ``bias``, zeros at start; only with ``use_bias``). With
      ``num_groups > 1`` the E experts form ``num_groups`` contiguous groups scored by ``max_i s_i`` (no
      bias; V2 and V3 without bias) or by the sum of the top-2 ``s_i + b_i`` (V3 with bias); experts outside
      the best ``topk_groups`` groups are set to ``-inf`` (the official fill, not HF's 0.0) before the top-K.
      Without bias the code ranks by the logits, which order experts exactly as ``s`` does but do not tie
      where ``s`` saturates.
    * Weights are the original scores ``s`` of the selected experts (no bias), renormalised to sum to 1 when
      ``renormalize`` (V3 sigmoid; V2 softmax uses ``renormalize=False``), times ``routed_scaling_factor``
      (the name in DeepSeek's HF configs; the official ``Gate`` calls it ``route_scale``). The
      renormalisation is a softmax of the selected log-scores (``logsigmoid`` / ``log_softmax``), so it stays
      exact where every selected sigmoid underflows to 0.

    Auxiliary-loss-free balancing (arXiv 2408.15664): ``bias`` is a buffer (never a parameter, never gets a
    gradient; kept in float32 when the module is cast to a 16-bit dtype); a training callback calls
    :meth:`update_bias` with the step's per-expert counts (all-reduced
    across ranks by the caller), which applies ``b_i += gamma * sign(mean_j load_j - load_i)``. Unlike the
    official code the bias does not depend on the model width.

    Args:
        dim: D.
        num_experts: E.
        top_k: K.
        num_groups: expert groups G (divides E; 1 = ungrouped; the official ``Gate.n_groups``).
        topk_groups: groups each token may use (None: all ``num_groups``).
        score_func: ``"sigmoid"`` (V3) or ``"softmax"`` (V2).
        routed_scaling_factor: constant multiplying the weights (V3 2.5, V2-236B 16.0).
        renormalize: renormalise the selected scores before ``routed_scaling_factor``. None (default): iff
            ``K > 1`` (V3); ``True`` with ``K = 1`` raises ``ValueError`` (the weight would be the constant
            ``routed_scaling_factor``, without gradient). The resolved bool is stored as ``renormalize``.
        use_bias: keep the balancing bias buffer.
        bias_update_speed: gamma of :meth:`update_bias` (paper 1e-3 [U]).
    """

    bias: torch.Tensor | None

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int,
        num_groups: int = 1,
        topk_groups: int | None = None,
        score_func: ScoreFunc = "sigmoid",
        routed_scaling_factor: float = 1.0,
        renormalize: bool | None = None,
        use_bias: bool = True,
        bias_update_speed: float = 1e-3,
    ) -> None:
        super().__init__()
        _check_sizes(dim, num_experts)
        if num_groups < 1 or num_experts % num_groups:
            raise ValueError(
                f"num_groups must be >= 1 and divide num_experts={num_experts}, got {num_groups}"
            )
        topk_groups = num_groups if topk_groups is None else topk_groups
        if not 1 <= topk_groups <= num_groups:
            raise ValueError(f"topk_groups must be in [1, num_groups={num_groups}], got {topk_groups}")
        allowed = topk_groups * (num_experts // num_groups)
        _check_top_k(
            top_k, allowed,
            None if num_groups == 1 else f"{allowed}: the experts in topk_groups={topk_groups} of "
            f"num_groups={num_groups} groups of {num_experts // num_groups}",
        )
        if use_bias and num_groups > 1 and num_experts // num_groups < 2:
            raise ValueError("num_groups: with use_bias each group needs >= 2 experts (top-2 group score)")
        if bias_update_speed < 0:
            raise ValueError(f"bias_update_speed must be >= 0, got {bias_update_speed}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.num_groups, self.topk_groups = num_groups, topk_groups
        self.score_func = check_choice("score_func", score_func, get_args(ScoreFunc))
        self.routed_scaling_factor = routed_scaling_factor
        self.renormalize = _resolve_renormalize(renormalize, top_k)
        self.use_bias, self.bias_update_speed = use_bias, bias_update_speed
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("bias", torch.zeros(num_experts) if use_bias else None)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        # keep the balancing bias in float32 under .to(bfloat16)/.half(): gamma-sized steps vanish in 16 bits
        super()._apply(fn, recurse)
        if self.bias is not None and self.bias.dtype != torch.float32:
            self.bias = self.bias.float()
        return self

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> torch.Tensor:
        """One aux-loss-free balancing step: ``b_i += gamma * sign(mean_j counts_j - counts_i)``.

        Args:
            counts: ``(E,)`` tokens (or pairs) routed to each expert in the step (e.g. ``routing.counts()``,
                summed over micro-batches and ranks by the caller).

        Returns:
            ``(E,)`` the applied change (each entry ``-gamma``, 0 or ``+gamma``).
        """
        if self.bias is None:
            raise ValueError("update_bias needs use_bias=True")
        if counts.shape != (self.num_experts,):
            raise ValueError(f"counts must have shape ({self.num_experts},), got {tuple(counts.shape)}")
        c = counts.to(device=self.bias.device, dtype=torch.float32)
        delta = self.bias_update_speed * torch.sign(c.mean() - c)  # (E,)
        self.bias.add_(delta.to(self.bias.dtype))
        return delta

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens; ``x (N, D)`` -> RouterOutput with ``(N, K)`` slots."""
        _check_x(x, self.dim)
        n, g = x.shape[0], self.num_groups
        sigmoid = self.score_func == "sigmoid"
        logits = self._logits(x)  # (N, E)
        scores = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)  # (N, E)
        if self.bias is not None:
            choice = scores.detach() + self.bias.float()  # (N, E) selection only; b never reaches the weights
        else:
            # logits rank experts exactly as the scores do, without the ties of scores saturated at 0 or 1
            choice = logits.detach()  # (N, E)
        if g > 1:
            grouped = choice.view(n, g, -1)  # (N, G, E/G)
            if self.bias is None:
                group_scores = grouped.amax(dim=-1)  # (N, G)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            keep = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # (N, G)
            choice = grouped.masked_fill(~allowed[..., None], float("-inf")).view(n, -1)  # (N, E)
        indices = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        if self.renormalize:
            # s_i / sum_j s_j over the selected experts as a softmax of log-scores: finite and summing to 1
            # even where every selected sigmoid underflows to 0 (logits below about -104)
            log_scores = nn.functional.logsigmoid(logits) if sigmoid else logits.log_softmax(dim=-1)  # (N, E)
            weights = log_scores.gather(1, indices).softmax(dim=-1)  # (N, K)
        else:
            weights = scores.gather(1, indices)  # (N, K) original scores, no bias
        weights = weights * self.routed_scaling_factor
        return RouterOutput(logits=logits, probs=scores, weights=weights, indices=indices)

    def aux_losses(
        self, routing: RouterOutput, *, batch_size: int | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"balance": deepseek_balance_loss(...)}``, the DeepSeek expert-level form ``sum_i f_i P_i``.

        Sigmoid scores (V3): the complementary sequence-wise loss on normalised scores ``s / sum_j s_j``
        (``batch_size=B``: per sequence, averaged; None: over the whole batch). Softmax scores (V2): the
        expert-level loss on ``probs`` (per sequence with ``batch_size``, as the V2 code's ``seq_aux``).
        V2's device- and communication-level losses need a device layout and are not declared. Use the loss
        with ``use_bias`` only as V3's small complement (paper alpha 1e-4 [U]). Arguments: see the module
        docstring.
        """
        sigmoid = self.score_func == "sigmoid"
        loss = deepseek_balance_loss(
            routing, batch_size=batch_size, normalize_scores=sigmoid, token_mask=token_mask
        )
        return {"balance": loss}


def dts_gate(
    logits: torch.Tensor,
    gumbel: torch.Tensor,
    *,
    temperature: float,
    threshold: float = 1e-3,
    hard: bool = False,
    top_k: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EvoMoE dense-to-sparse activation for given Gumbel noise (arXiv 2112.14397).

    ``gg = softmax((z + g) / temperature)``; soft phase: ``active = gg > threshold``; hard phase: the
    top-``top_k`` of ``gg`` (one-hot for ``top_k=1``, the repo's ``onehot(argmax gg)``).

    Args:
        logits: ``(N, E)`` router logits z.
        gumbel: ``(N, E)`` Gumbel(0, 1) sample g.
        temperature: tau > 0.
        threshold: activation threshold (repo ``GUMBEL_THRESHOLD`` 1e-3).
        hard: hard phase.
        top_k: experts per token in the hard phase.

    Returns:
        ``(active (N, E) bool, gg (N, E) float)``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    gg = finite_logits((logits + gumbel) / temperature).softmax(dim=-1)  # (N, E) guard: a small tau overflows
    if hard:
        active = torch.zeros_like(gg, dtype=torch.bool).scatter_(1, gg.topk(top_k, dim=-1).indices, True)
    else:
        active = gg > threshold
    return active, gg


def sample_gumbel(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel sample ``-log(-log U)`` shaped like ``like`` (float32)."""
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


class DenseToSparseRouter(_GateMixin):
    """EvoMoE Dense-To-Sparse (DTS) gate (arXiv 2112.14397; ``codecaution/EvoMoE`` ``topkgating``).

    Training: ``gg = softmax((z + Gumbel) / temperature)``; soft phase (``hard=False``) activates every expert
    with ``gg > threshold``; hard phase activates the top-``top_k`` of ``gg``. Weights ``= active *
    softmax(z)`` (default) or ``active * gg`` (``use_gumbel_gates``). No capacity limit. Eval: plain
    top-``top_k`` of ``softmax(z)`` with raw (unrenormalised) weights, the repo's non-``dense_validate`` path.

    Output in training: ``indices (N, E)`` (slot j holds expert j) with ``mask = active``; in eval ``(N, K)``
    with ``mask=None``. ``temperature`` and ``hard`` are plain attributes that a schedule/callback sets
    (see :class:`TemperatureSchedule`). ``aux["temperature"]`` records the value used.

    Args:
        dim: D.
        num_experts: E.
        top_k: experts per token in the hard phase and in eval.
        temperature: initial tau.
        threshold: soft-phase activation threshold.
        hard: start in the hard phase.
        use_gumbel_gates: combine with ``gg`` instead of ``softmax(z)``.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        temperature: float = 1.0,
        threshold: float = 1e-3,
        hard: bool = False,
        use_gumbel_gates: bool = False,
    ) -> None:
        super().__init__()
        _check_sizes(dim, num_experts)
        _check_top_k(top_k, num_experts)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= threshold < 1:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.temperature, self.threshold, self.hard = temperature, threshold, hard
        self.use_gumbel_gates = use_gumbel_gates
        self.gate = nn.Linear(dim, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        """Route tokens; ``x (N, D)`` -> RouterOutput (``(N, E)`` masked slots in training)."""
        _check_x(x, self.dim)
        n, e = x.shape[0], self.num_experts
        logits = self._logits(x)  # (N, E)
        probs = logits.softmax(dim=-1)  # (N, E)
        if not self.training:
            weights, indices = probs.topk(self.top_k, dim=-1)  # (N, K)
            return RouterOutput(logits=logits, probs=probs, weights=weights, indices=indices)
        active, gg = dts_gate(
            logits, sample_gumbel(logits), temperature=self.temperature, threshold=self.threshold,
            hard=self.hard, top_k=self.top_k,
        )
        weights = (gg if self.use_gumbel_gates else probs) * active  # (N, E)
        return RouterOutput(
            logits=logits, probs=probs, weights=weights, indices=_all_slots(n, e, x.device), mask=active,
            aux={"temperature": torch.tensor(float(self.temperature), device=x.device)},
        )

    def aux_losses(
        self, routing: RouterOutput, *, batch_size: int | None = None, token_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"balance": ...}`` as the EvoMoE code computes it.

        Training routing (``aux["temperature"]`` present): :func:`moe_core.losses.dts_balance_loss`,
        ``E sum_i mean_t(weights_i) mean_t(active_i)`` on the active mask (the repo's ``topkgating``). Eval
        routing (plain top-k): :func:`moe_core.losses.switch_balance_loss`, which for ``top_k=1`` is the
        repo's eval-path ``top1gating`` loss. Arguments: see the module docstring.
        """
        if "temperature" in routing.aux:
            return {"balance": dts_balance_loss(routing, token_mask=token_mask)}
        return {"balance": switch_balance_loss(routing, token_mask=token_mask)}


class TemperatureSchedule:
    """EvoMoE temperature schedule ``step -> tau`` (arXiv 2112.14397; code ``codecaution/EvoMoE``).

    As ``fairseq_cli/train.py`` computes it: ``linear``: ``tau(u) = max(tau_max - u (tau_max - tau_min) /
    decay_steps, tau_min)``; ``exp``: ``tau(u) = max(tau_max * exp(u ln(tau_min / tau_max) / decay_steps),
    tau_min)``. Defaults follow the repo's CLI (``max_temperature=1.0, min_temperature=0.5``); ``decay_steps``
    (D in the formulas above) has no verified default and must be given. :meth:`is_hard` says whether the hard
    phase has started (``hard_from_step``, the repo's ``switch_to_hard_gumbel_softmax``; None = never, 0 = the
    repo's -1).

    Args:
        tau_max: tau at step 0.
        tau_min: floor.
        decay_steps: steps to reach ``tau_min``.
        kind: ``"linear"`` or ``"exp"``.
        hard_from_step: first step of the hard phase, or None.
    """

    def __init__(
        self,
        *,
        tau_max: float = 1.0,
        tau_min: float = 0.5,
        decay_steps: int,
        kind: ScheduleKind = "linear",
        hard_from_step: int | None = None,
    ) -> None:
        if not 0 < tau_min <= tau_max:
            raise ValueError(f"need 0 < tau_min <= tau_max, got tau_min={tau_min}, tau_max={tau_max}")
        if decay_steps < 1:
            raise ValueError(f"decay_steps must be >= 1, got {decay_steps}")
        self.tau_max, self.tau_min, self.decay_steps = tau_max, tau_min, decay_steps
        self.kind = check_choice("kind", kind, get_args(ScheduleKind))
        self.hard_from_step = hard_from_step

    def __call__(self, step: int) -> float:
        """Temperature at optimizer step ``step`` (>= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.kind == "linear":
            tau = self.tau_max - step * (self.tau_max - self.tau_min) / self.decay_steps
        else:
            tau = self.tau_max * math.exp(step * math.log(self.tau_min / self.tau_max) / self.decay_steps)
        return max(tau, self.tau_min)

    def is_hard(self, step: int) -> bool:
        """Whether ``step`` is in the hard phase."""
        return self.hard_from_step is not None and step >= self.hard_from_step

    def apply(self, router: DenseToSparseRouter, step: int) -> None:
        """Set ``router.temperature`` and ``router.hard`` for ``step`` (what a training callback calls)."""
        router.temperature = self(step)
        router.hard = self.is_hard(step)
