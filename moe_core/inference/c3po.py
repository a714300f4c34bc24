"""C3PO test-time re-mixing of routing weights (arXiv 2504.07964; code tianyi-lab/C3PO olmoe_optimizer.py).

From the code [C]: a reference set of (input, pathway) pairs the model gets right; for a test input, the
k = 3 nearest references by cosine similarity of an embedding; kernel regression
``w_hat = sum_i sim_i w_i / sum_i sim_i`` replaces the pre-top-k routing distribution of the last token in
the last 5 MoE layers, then the usual top-k and renormalisation apply. The paper adds neighbourhood
gradient descent (NGD) on the neighbours' loss; "core experts" restrict re-mixing to the top experts [S].
Our reading [D]: the embedder is a caller-supplied function (no sentence encoder is downloaded); NGD
parameterises the pathway as logits (stays on the simplex) with the model frozen; core-expert restriction
keeps the non-core entries and rescales the core entries to the same mass.

Mode finding [P: the paper's second method; details ours, D]: neighbours are searched among the reference
*pathways* (not input embeddings) and the pathway moves towards their kernel-weighted mean,
``omega <- alpha * omega + (1 - alpha) * sum_i K(omega_i, omega) omega_i / sum_i K``, repeated ``steps``
times (a mean-shift towards a mode of the reference pathways). Generation [C: ``custom_moe_forward``
replaces the routing of the last token of every forward call inside ``model.generate``, which with a KV
cache is the prompt's last token and then every generated token]: :func:`c3po_generate` re-runs the window
at every step (no KV cache) and overrides the same tokens, ``positions="generated"`` (the prompt's last
token and every generated one; identical to the cached run because an override on a token changes only that
token's MoE output); ``"all"`` (every token, prompt included) and ``"last"`` (only the newest token of the
re-run window; earlier generated tokens keep their own routing) are variants [D].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.inference.override import RoutingOverride, collect_router_probs, last_token_index
from moe_core.inference.scmoe import lm_logits
from moe_core.validation import check_choice

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Kernel = Literal["cosine", "gaussian"]
Positions = Literal["generated", "all", "last"]


def critical_blocks(num_blocks: int, num_critical: int = 5) -> list[int]:
    """Positions of the last ``num_critical`` MoE blocks (C3PO: last 5 of OLMoE's 16)."""
    return list(range(max(0, num_blocks - num_critical), num_blocks))


def collect_pathways(model: nn.Module, ids: torch.Tensor, *, blocks: list[int] | None = None) -> torch.Tensor:
    """Last-token pre-top-k routing distributions of a batch.

    Args:
        ids: ``(B, T)`` token ids.
        blocks: MoE block positions to keep (default all).

    Returns:
        ``(B, L, E)`` pathways.
    """
    probs = collect_router_probs(model, ids, forward=lm_logits)
    rows = last_token_index(*ids.shape).to(probs[0].device)
    keep = range(len(probs)) if blocks is None else blocks
    return torch.stack([probs[b][rows] for b in keep], dim=1)  # (B, L, E)


def kernel_regression(
    query: torch.Tensor,
    refs: torch.Tensor,
    ref_pathways: torch.Tensor,
    *,
    k: int = 3,
    kernel: Kernel = "cosine",
    bandwidth: float = 1.0,
) -> torch.Tensor:
    """Kernel-weighted average of the k nearest references' pathways.

    Args:
        query: ``(Q, F)`` test embeddings.
        refs: ``(S, F)`` reference embeddings.
        ref_pathways: ``(S, L, E)`` reference pathways (rows on the simplex).
        k: neighbours.
        kernel: ``cosine`` (C3PO code; similarities clamped at a tiny positive value) or ``gaussian``.

    Returns:
        ``(Q, L, E)`` pathways on the simplex (for k = 1 equal to the nearest reference's pathway).
    """
    check_choice("kernel", kernel, get_args(Kernel))
    if not 1 <= k <= refs.shape[0]:
        raise ValueError(f"k must be in [1, {refs.shape[0]}], got {k}")
    if kernel == "cosine":
        sim = F.normalize(query.float(), dim=-1) @ F.normalize(refs.float(), dim=-1).t()  # (Q, S)
        top, idx = sim.topk(k, dim=-1)  # (Q, k)
        kw = top.clamp_min(1e-6)
    else:
        dist = torch.cdist(query.float(), refs.float())  # (Q, S)
        top, idx = (-dist).topk(k, dim=-1)
        kw = torch.exp(-(top**2) / (2 * bandwidth**2)).clamp_min(1e-30)
    kw = kw / kw.sum(-1, keepdim=True)  # (Q, k)
    out = torch.einsum("qk,qkle->qle", kw.to(ref_pathways.dtype), ref_pathways[idx])  # (Q, L, E)
    return out / out.sum(-1, keepdim=True)


def remix(
    omega: torch.Tensor, omega_hat: torch.Tensor, *, alpha: float = 0.0, core_experts: int | None = None
) -> torch.Tensor:
    """``alpha * omega + (1 - alpha) * omega_hat``, optionally only on the ``core_experts`` largest entries
    of ``omega_hat`` (other entries keep ``omega``; the core entries are rescaled to keep the row sum).

    Shapes ``(..., E)``.
    """
    mixed = alpha * omega + (1 - alpha) * omega_hat
    if core_experts is None:
        return mixed
    core = torch.zeros_like(omega, dtype=torch.bool).scatter(
        -1, omega_hat.topk(core_experts, -1).indices, True
    )
    mass = (omega * core).sum(-1, keepdim=True)
    scaled = mixed * core * mass / (mixed * core).sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.where(core, scaled, omega)


def remixed_logits(
    model: nn.Module,
    ids: torch.Tensor,
    pathways: torch.Tensor,
    *,
    blocks: list[int],
    forward: Forward = lm_logits,
) -> torch.Tensor:
    """Logits ``(B, T, V)`` with the last token's routing in ``blocks`` replaced by ``pathways (B, L, E)``."""
    if pathways.shape[1] != len(blocks):
        raise ValueError(f"pathways has {pathways.shape[1]} layers for {len(blocks)} blocks")
    rows = last_token_index(*ids.shape).to(ids.device)
    omegas = {b: pathways[:, i] for i, b in enumerate(blocks)}
    with RoutingOverride(model, omegas=omegas, token_index=rows):
        return forward(model, ids)


def mode_finding(
    omega: torch.Tensor,
    ref_pathways: torch.Tensor,
    *,
    k: int = 3,
    alpha: float = 0.0,
    steps: int = 1,
    kernel: Kernel = "gaussian",
    bandwidth: float = 0.5,
) -> torch.Tensor:
    """C3PO mode finding: move each pathway towards the kernel-weighted mean of its nearest reference
    pathways.

    Args:
        omega: ``(Q, L, E)`` the test inputs' own pathways.
        ref_pathways: ``(S, L, E)`` reference pathways.
        k: neighbours (searched in pathway space, flattened over layers).
        alpha: weight kept on the current pathway each step.
        steps: repetitions (mean-shift iterations).
        kernel, bandwidth: as :func:`kernel_regression`.

    Returns:
        ``(Q, L, E)`` pathways on the simplex; ``alpha = 0, steps = 1, k = 1`` gives the nearest reference.
    """
    if omega.shape[1:] != ref_pathways.shape[1:]:
        raise ValueError(f"omega {tuple(omega.shape)} and ref_pathways {tuple(ref_pathways.shape)} disagree")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    refs = ref_pathways.flatten(1)  # (S, L*E)
    for _ in range(steps):
        hat = kernel_regression(omega.flatten(1), refs, ref_pathways, k=k, kernel=kernel, bandwidth=bandwidth)
        omega = remix(omega, hat, alpha=alpha)
    return omega


def c3po_override(
    model: nn.Module,
    pathways: torch.Tensor,
    *,
    blocks: list[int],
    seq_len: int,
    positions: Positions = "generated",
    start: int | None = None,
) -> RoutingOverride:
    """The routing override for one forward call over ``(B, seq_len)`` ids with one pathway per sequence.

    Args:
        pathways: ``(B, L, E)``; blocks: the L block positions.
        seq_len: T of the forward call (the router sees ``(B*T, D)`` rows, batch-major).
        positions: ``generated`` (window positions ``start ..  T-1``), ``all`` rows, or the ``last`` one.
        start: for ``generated``: the window position of the prompt's last token (default ``T - 1``);
            negative (the prompt slid out of the window) means 0.
    """
    check_choice("positions", positions, get_args(Positions))
    if pathways.dim() != 3 or pathways.shape[1] != len(blocks):
        raise ValueError(f"pathways must have shape (B, {len(blocks)}, E), got {tuple(pathways.shape)}")
    b = pathways.shape[0]
    first = {"all": 0, "last": seq_len - 1, "generated": seq_len - 1 if start is None else start}[positions]
    first = min(max(first, 0), seq_len - 1)
    cols = torch.arange(first, seq_len, device=pathways.device)  # (n,) overridden positions
    rows = (torch.arange(b, device=pathways.device)[:, None] * seq_len + cols).reshape(-1)  # (B*n,)
    omegas = {blk: pathways[:, i].repeat_interleave(cols.numel(), dim=0) for i, blk in enumerate(blocks)}
    return RoutingOverride(model, omegas=omegas, token_index=rows)


@torch.no_grad()
def c3po_generate(
    model: nn.Module,
    ids: torch.Tensor,
    pathways: torch.Tensor,
    *,
    blocks: list[int],
    max_new_tokens: int,
    positions: Positions = "generated",
    forward: Forward = lm_logits,
) -> torch.Tensor:
    """Greedy generation with C3PO routing applied at every decoding step (no KV cache: each step re-runs
    the prefix, so the override reaches every token it should).

    Args:
        ids: ``(B, T0)`` prompts.
        pathways: ``(B, L, E)`` one re-mixed pathway per sequence for the ``blocks`` (e.g. from
            :func:`kernel_regression` or :func:`mode_finding`).
        blocks: MoE block positions the pathway covers.
        max_new_tokens: tokens to append.
        positions: ``generated`` (the official code's tokens: the prompt's last and every generated one),
            ``all`` (prompt included) or ``last`` (only the newest token of each re-run window).

    Returns:
        ``(B, T0 + max_new_tokens)`` ids.
    """
    if pathways.shape[:2] != (ids.shape[0], len(blocks)):
        raise ValueError(
            f"pathways must have shape ({ids.shape[0]}, {len(blocks)}, E), got {tuple(pathways.shape)}"
        )
    start = ids.shape[1] - 1  # the prompt's last token
    for _ in range(max_new_tokens):
        t = ids.shape[1]
        with c3po_override(model, pathways, blocks=blocks, seq_len=t, positions=positions, start=start):
            nxt = forward(model, ids)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def neighbourhood_gd(
    model: nn.Module,
    omega0: torch.Tensor,
    neighbours: torch.Tensor,
    targets: torch.Tensor,
    *,
    kernel_weights: torch.Tensor | None = None,
    blocks: list[int],
    steps: int = 10,
    lr: float = 0.1,
    forward: Forward = lm_logits,
) -> tuple[torch.Tensor, list[float]]:
    """NGD: optimise one pathway on the neighbours' next-token loss with the model frozen.

    Args:
        omega0: ``(L, E)`` starting pathway (e.g. the test input's own or the kernel-regression one).
        neighbours: ``(S, T)`` neighbour token ids; targets: ``(S,)`` their next tokens.
        kernel_weights: ``(S,)`` K(x_i, x) (default uniform).
        blocks: MoE block positions the pathway covers.
        steps, lr: gradient steps on the logits ``theta`` with ``omega = softmax(theta)``.

    Returns:
        ``(L, E)`` optimised pathway and the loss before each step (plus the final loss).
    """
    kw = torch.ones(neighbours.shape[0]) if kernel_weights is None else kernel_weights.float()
    kw = (kw / kw.sum()).to(omega0.device)
    theta = omega0.detach().clamp_min(1e-12).log().clone().requires_grad_(True)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    losses = []
    try:
        for step in range(steps + 1):
            omega = theta.softmax(-1)  # (L, E)
            path = omega.unsqueeze(0).expand(neighbours.shape[0], *omega.shape)  # (S, L, E)
            logits = remixed_logits(model, neighbours, path, blocks=blocks, forward=forward)[:, -1]  # (S, V)
            loss = (F.cross_entropy(logits.float(), targets, reduction="none") * kw).sum()
            losses.append(float(loss.detach()))
            if step == steps:
                break
            (grad,) = torch.autograd.grad(loss, theta)
            with torch.no_grad():
                theta -= lr * grad
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return theta.detach().softmax(-1), losses


def mean_embedding(model_embedding: nn.Embedding) -> Callable[[torch.Tensor], torch.Tensor]:
    """A cheap embedder for neighbour search: mean input embedding of the tokens, ``(B, T) -> (B, D)``."""

    def embed(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model_embedding(ids).float().mean(1)

    return embed
