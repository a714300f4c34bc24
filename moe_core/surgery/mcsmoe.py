"""MC-SMoE: merge experts, then compress (arXiv 2310.01334; code UNITES-Lab/MC-SMoE).

From the paper/code [C]: usage frequencies from calibration data; weight-matching permutation alignment
(``scipy.optimize.linear_sum_assignment``); dominant experts = the most used; every other expert joins the
dominant expert with the most similar router-logit column; usage-frequency-weighted merge; router
unchanged; LoSparse compression ``W ~ U V + S`` with SVD init and importance pruning of S on a cubic
schedule. Our reading [D]: usage counts every selected (token, slot) pair (the paper's Switch models are
top-1); a group whose members were never used is merged with uniform weights; merged experts are stored
once and shared through :class:`~moe_core.blocks.RemappedExperts`.

Compression as the official code runs it [C: ``mcsmoe/pruning/losparse.py`` ``LoSparsePruner``]:
:func:`compress_and_finetune` starts from ``U V + S`` with all of S kept, fine-tunes with the distillation
loss, and after every optimiser step updates the importance ``EMA_{0.85}(|S * grad S|)`` (PLATON with the
uncertainty term off, ``beta2 = 1``); on the cubic schedule :func:`cubic_keep_ratio` it prunes whole rows of
S (output units: ``structured_direction="row"``, ``structured_method="mean"`` on ``nn.Linear`` weights,
i.e. a column of our ``x @ W`` layout) against one threshold shared by every compressed matrix of the
model. Distillation [C: ``SwitchTransformersWrapperForDistillation``]: ``mlm_lambda * CE +
kd_lambda * KL(softmax(t/T) || softmax(s/T))`` with ``KLDivLoss(reduction="batchmean")`` on the unflattened
logits (sum over tokens / batch size) and no ``T²`` factor; :func:`kd_loss` ``weighting="official"``.
:func:`compress_model` remains the one-shot variant (element-wise magnitude at init) [D].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from moe_core.blocks import (
    BlockRef,
    RemappedExperts,
    bank_activation,
    find_moe_blocks,
    get_expert_weights,
    router_logits,
    router_selection,
    router_weight,
    set_expert_weights,
    unwrap_bank,
)
from moe_core.surgery.bank import ComputedWeightExperts
from moe_core.validation import check_choice

KDWeighting = Literal["official", "convex"]


# ---------------------------------------------------------------------------------------- statistics
@dataclass
class RoutingStats:
    """Calibration statistics of one MoE block.

    Attributes:
        counts: ``(E,)`` selected (token, slot) pairs per expert (slots a router masks out, such as null
            picks, dropped or top-p padding slots, are not counted).
        logits: ``(N, E)`` router logits of the calibration tokens (float32, at most ``max_tokens`` rows);
            for a null-expert router (``NullExpertRouter``) the E real experts' columns of its ``(N, E + m)``
            logits.
    """

    counts: torch.Tensor
    logits: torch.Tensor

    @property
    def freq(self) -> torch.Tensor:
        """``(E,)`` usage frequency ``count_e / sum(count)``."""
        return self.counts.float() / self.counts.sum().clamp_min(1)


def collect_routing_stats(
    model: nn.Module,
    batches: Iterable,
    *,
    forward: Callable[[nn.Module, object], object] | None = None,
    max_tokens: int = 65536,
) -> list[RoutingStats]:
    """Run calibration batches through ``model`` and record each MoE block's router usage and logits.

    Args:
        model: a model containing moekit or HF MoE blocks.
        batches: calibration inputs; each is passed to ``forward(model, batch)`` (default ``model(batch)``).
        forward: how to call the model.
        max_tokens: keep at most this many logit rows per block.

    Returns:
        One :class:`RoutingStats` per block, in :func:`find_moe_blocks` order.
    """
    refs = find_moe_blocks(model)
    if not refs:
        raise ValueError("model has no MoE blocks")
    counts: list[torch.Tensor | None] = [None] * len(refs)
    logits: list[list[torch.Tensor]] = [[] for _ in refs]
    kept = [0] * len(refs)

    # E of each router: a null-expert router's logits have E + m columns (null experts last); the first E
    # are the real experts', which are what the merge groups
    widths = [router_weight(r.router).shape[0] for r in refs]

    def hook(i: int):
        def fn(_m, _inp, out):
            _, idx = router_selection(out)
            z = router_logits(out).detach()[:, : widths[i]]  # (N, E)
            mask = getattr(out, "mask", None)  # masked slots (null picks, drops, top-p padding) are not used
            used = idx if mask is None else idx[mask]
            c = torch.bincount(used.reshape(-1), minlength=widths[i]).cpu()
            counts[i] = c if counts[i] is None else counts[i] + c
            if kept[i] < max_tokens:
                take = z[: max_tokens - kept[i]].cpu()
                logits[i].append(take)
                kept[i] += take.shape[0]

        return fn

    handles = [r.router.register_forward_hook(hook(i)) for i, r in enumerate(refs)]
    try:
        with torch.no_grad():
            for b in batches:
                (forward or (lambda m, x: m(x)))(model, b)
    finally:
        for h in handles:
            h.remove()
    if counts[0] is None:
        raise ValueError("batches was empty: no routing statistics collected")
    return [RoutingStats(counts=c, logits=torch.cat(z)) for c, z in zip(counts, logits)]


# ----------------------------------------------------------------------------------------- alignment
def permute_expert(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Permute the hidden units of one SwiGLU expert (the function is unchanged).

    Args:
        gate, up: ``(D, H)``; down: ``(H, D)``; perm: ``(H,)`` new hidden unit j = old unit ``perm[j]``.
    """
    return gate[:, perm], up[:, perm], down[perm, :]


def align_expert(
    ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    other: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Weight matching: the permutation of ``other`` 's hidden units that best matches ``ref``.

    Maximises ``sum_j <ref unit j, other unit perm[j]>`` over gate, up and down weights with
    ``scipy.optimize.linear_sum_assignment`` (imported here, scipy is optional for moe_core).

    Returns:
        ``(H,)`` long tensor; ``permute_expert(*other, perm)`` is aligned with ``ref``.
    """
    from scipy.optimize import linear_sum_assignment

    (g0, u0, d0), (g1, u1, d1) = ref, other
    sim = g0.t().float() @ g1.float() + u0.t().float() @ u1.float() + d0.float() @ d1.t().float()  # (H, H)
    rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)
    perm = torch.empty(sim.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


# ------------------------------------------------------------------------------------------ grouping
def group_experts(freq: torch.Tensor, logits: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Group experts around the ``num_groups`` most used (dominant) experts.

    Args:
        freq: ``(E,)`` usage frequencies.
        logits: ``(N, E)`` calibration router logits.
        num_groups: G, ``1 <= G <= E``.

    Returns:
        ``(E,)`` group id in ``[0, G)``; group g's dominant expert is the g-th most used expert.
        Similarity ``(cos(z[:, i], z[:, j]) + 1) / 2`` over router-logit columns [C].
    """
    e = freq.numel()
    if not 1 <= num_groups <= e:
        raise ValueError(f"num_groups must be in [1, {e}], got {num_groups}")
    if logits.dim() != 2 or logits.shape[1] != e:
        raise ValueError(f"logits must have shape (N, {e}), got {tuple(logits.shape)}")
    dominant = torch.argsort(freq, descending=True, stable=True)[:num_groups]  # (G,)
    z = torch.nn.functional.normalize(logits.float().t(), dim=1)  # (E, N)
    sim = (z @ z[dominant].t() + 1) / 2  # (E, G)
    group = sim.argmax(dim=1)
    group[dominant] = torch.arange(num_groups)
    return group


def merge_weights(
    members: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Usage-weighted average ``sum_e f_e W_e / sum_e f_e`` of aligned experts (uniform if all f are 0)."""
    f = freq.double()
    f = torch.ones_like(f) if f.sum() <= 0 else f
    f = f / f.sum()
    return tuple(
        sum(f[i].item() * m[j].double() for i, m in enumerate(members)).to(members[0][j].dtype)
        for j in range(3)
    )  # type: ignore[return-value]


def merge_block(ref: BlockRef, stats: RoutingStats, *, num_groups: int, align: bool = True) -> torch.Tensor:
    """Merge one block's experts into ``num_groups`` experts in place (router untouched).

    Returns:
        ``(E,)`` group assignment (also the ``index_map`` of the new :class:`RemappedExperts`).
    """
    bank = unwrap_bank(ref.experts)
    gate, up, down = get_expert_weights(bank)
    group = group_experts(stats.freq, stats.logits, num_groups)
    freq = stats.freq
    new = []
    for g in range(num_groups):
        members = torch.nonzero(group == g).flatten().tolist()
        dom = int(torch.argsort(freq, descending=True, stable=True)[g])
        ws = []
        for e in [dom] + [m for m in members if m != dom]:
            w = (gate[e], up[e], down[e])
            if align and e != dom:
                w = permute_expert(*w, align_expert((gate[dom], up[dom], down[dom]), w))
            ws.append(w)
        order = [dom] + [m for m in members if m != dom]
        new.append(merge_weights(ws, freq[order]))
    set_expert_weights(bank, *(torch.stack([n[j] for n in new]) for j in range(3)))
    ref.experts = RemappedExperts(experts=bank, index_map=group)
    return group


def merge_model(
    model: nn.Module, stats: list[RoutingStats], *, num_groups: int | list[int], align: bool = True
) -> list[torch.Tensor]:
    """MC-SMoE merge of every MoE block (in place): :func:`merge_block` on each block in turn.

    The whole merge of a saved model is ``merge_model(model, collect_routing_stats(model, batches),
    num_groups=G)``, optionally followed by :func:`compress_model`.

    Args:
        model: a model containing moekit or HF MoE blocks (modified in place).
        stats: one :class:`RoutingStats` per block, in :func:`find_moe_blocks` order (from
            :func:`collect_routing_stats`).
        num_groups: merged experts per block: one value for every block or one per block.
        align: permute each member's hidden units onto its dominant expert before averaging.

    Returns:
        Per block, the ``(E,)`` group assignment (the ``index_map`` of its :class:`RemappedExperts`).
    """
    refs = find_moe_blocks(model)
    if len(stats) != len(refs):
        raise ValueError(f"got {len(stats)} RoutingStats for {len(refs)} MoE blocks")
    groups = [num_groups] * len(refs) if isinstance(num_groups, int) else list(num_groups)
    return [merge_block(r, s, num_groups=g, align=align) for r, s, g in zip(refs, stats, groups)]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 2.0,
    kd_lambda: float = 0.2,
    mlm_lambda: float = 1.0,
    weighting: KDWeighting = "official",
) -> torch.Tensor:
    """Distillation loss for fine-tuning a merged/compressed model against the original.

    ``official`` [C: MC-SMoE ``SwitchTransformersWrapperForDistillation``]:
    ``mlm_lambda * CE(student, targets) + kd_lambda * KL(softmax(t / T) || softmax(s / T))`` where the KL is
    ``nn.KLDivLoss(reduction="batchmean")`` on the logits as given (summed over everything, divided by the
    leading (batch) dimension: for ``(B, T, V)`` logits that is the per-token KL times T) and has no ``T²``.
    ``convex`` [D, the earlier reading]: ``(1 - lam) * CE + lam * T² * KL`` with KL averaged per token.
    Defaults ``T = 2, kd_lambda = 0.2, mlm_lambda = 1`` are MC-SMoE's [C].

    Args:
        student_logits, teacher_logits: ``(B, ..., V)``; targets: ``(B, ...)`` class ids.
    """
    check_choice("weighting", weighting, get_args(KDWeighting))
    v = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, v).float(), teacher_logits.reshape(-1, v).float().detach()
    ce = torch.nn.functional.cross_entropy(s, targets.reshape(-1))
    kl_sum = torch.nn.functional.kl_div(
        (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1), log_target=True, reduction="sum"
    )
    if weighting == "official":
        return mlm_lambda * ce + kd_lambda * kl_sum / student_logits.shape[0]
    return (1 - kd_lambda) * ce + kd_lambda * temperature**2 * kl_sum / s.shape[0]


# --------------------------------------------------------------------------------------- compression
def low_rank_plus_sparse(
    w: torch.Tensor, *, rank: int, keep_ratio: float = 1.0, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoSparse init of one matrix: ``W ~ U V + S``.

    Args:
        w: ``(m, n)``.
        rank: r (``0 <= r <= min(m, n)``).
        keep_ratio: fraction of S entries kept (the largest ``importance``; default ``|S|``).
        importance: ``(m, n)`` scores for pruning S (e.g. the EMA of ``|S * grad S|``).

    Returns:
        ``U (m, r) = u sqrt(s)``, ``V (r, n) = sqrt(s) v^T``, ``S (m, n)`` pruned residual.
    """
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D, got shape {tuple(w.shape)}")
    if not 0 <= rank <= min(w.shape):
        raise ValueError(f"rank must be in [0, {min(w.shape)}], got {rank}")
    _check_keep_ratio(keep_ratio)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    big_u = (u[:, :rank] * root).to(w.dtype)  # (m, r)
    big_v = (root[:, None] * vh[:rank]).to(w.dtype)  # (r, n)
    res = w - big_u @ big_v  # (m, n)
    return big_u, big_v, res * _keep_mask(importance if importance is not None else res.abs(), keep_ratio)


def _check_keep_ratio(keep_ratio: float) -> None:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, int | float):
        raise TypeError(f"keep_ratio must be a float in [0, 1], got {keep_ratio!r}")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")


def _keep_mask(score: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    if keep_ratio >= 1.0:
        return torch.ones_like(score)
    k = int(round(keep_ratio * score.numel()))
    mask = torch.zeros(score.numel(), dtype=score.dtype, device=score.device)
    if k > 0:
        mask[score.flatten().topk(k).indices] = 1
    return mask.view_as(score)


def cubic_keep_ratio(
    step: int,
    *,
    total_steps: int,
    initial_warmup: int,
    final_warmup: int,
    initial: float = 1.0,
    final: float = 0.10,
) -> float:
    """LoSparse cubic schedule ``r(s) = r_f + (r_0 - r_f)(1 - (s - w_i)/(total - w_i - w_f))^3`` [C]."""
    if step < initial_warmup:
        return initial
    span = total_steps - initial_warmup - final_warmup
    if span <= 0 or step >= total_steps - final_warmup:
        return final
    return final + (initial - final) * (1 - (step - initial_warmup) / span) ** 3


class LowRankSparseExperts(ComputedWeightExperts):
    """Expert bank stored as ``U V + S`` per matrix (gate, up, down), S masked.

    Built by :meth:`from_weights`. ``count_parameters`` counts U, V and the kept entries of S.
    """

    def __init__(self, *, num_experts: int, dim: int, hidden_dim: int, rank: int, act=None) -> None:
        super().__init__(**({"act": act} if act is not None else {}))
        self.num_experts, self.dim, self.hidden_dim, self.rank = num_experts, dim, hidden_dim, rank
        shapes = {"gate": (dim, hidden_dim), "up": (dim, hidden_dim), "down": (hidden_dim, dim)}
        for n, (m, k) in shapes.items():
            setattr(self, f"{n}_u", nn.Parameter(torch.zeros(num_experts, m, rank)))
            setattr(self, f"{n}_v", nn.Parameter(torch.zeros(num_experts, rank, k)))
            setattr(self, f"{n}_s", nn.Parameter(torch.zeros(num_experts, m, k)))
            self.register_buffer(f"{n}_mask", torch.ones(num_experts, m, k))

    @classmethod
    def from_weights(
        cls,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        *,
        rank: int,
        keep_ratio: float = 1.0,
        act=None,
    ) -> LowRankSparseExperts:
        """Compress ``gate/up (E, D, H)``, ``down (E, H, D)`` with :func:`low_rank_plus_sparse` per expert."""
        e, d, h = gate.shape
        rank = min(rank, d, h)  # a rank above min(D, H) adds nothing
        out = cls(num_experts=e, dim=d, hidden_dim=h, rank=rank, act=act).to(gate.dtype)
        with torch.no_grad():
            for n, w in (("gate", gate), ("up", up), ("down", down)):
                for i in range(e):
                    uu, vv, ss = low_rank_plus_sparse(w[i], rank=rank, keep_ratio=1.0)
                    getattr(out, f"{n}_u")[i].copy_(uu)
                    getattr(out, f"{n}_v")[i].copy_(vv)
                    getattr(out, f"{n}_s")[i].copy_(ss)
        out.prune(keep_ratio)
        return out

    def prune(self, keep_ratio: float, importance: dict[str, torch.Tensor] | None = None) -> None:
        """Keep the ``keep_ratio`` most important S entries of each expert matrix (default ``|S|``)."""
        _check_keep_ratio(keep_ratio)
        with torch.no_grad():
            for n in ("gate", "up", "down"):
                s = getattr(self, f"{n}_s")
                score = importance[n] if importance is not None else s.abs() * getattr(self, f"{n}_mask")
                mask = torch.stack([_keep_mask(score[i], keep_ratio) for i in range(self.num_experts)])
                getattr(self, f"{n}_mask").copy_(mask)
                s.mul_(mask)

    def expert_weights(self):
        return tuple(
            getattr(self, f"{n}_u") @ getattr(self, f"{n}_v")
            + getattr(self, f"{n}_s") * getattr(self, f"{n}_mask")
            for n in ("gate", "up", "down")
        )

    def stored_parameter_correction(self) -> int:
        """Negative count of pruned S entries (they are not stored in a sparse format)."""
        return -int(sum((getattr(self, f"{n}_mask") == 0).sum() for n in ("gate", "up", "down")))


def compress_model(model: nn.Module, *, rank: int, keep_ratio: float) -> None:
    """Replace every MoE block's (possibly merged) bank by a :class:`LowRankSparseExperts` (in place).

    A merged block keeps its :class:`RemappedExperts` wrapper (the router still addresses E slots); the
    stored experts inside it are compressed.

    Args:
        model: a model containing moekit or HF MoE blocks.
        rank: LoSparse rank r of ``U V``, an int ``>= 0`` (capped at ``min(D, H)``).
        keep_ratio: fraction of the residual ``S`` entries kept (largest magnitude), in ``[0, 1]``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int >= 0, got {rank!r}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    _check_keep_ratio(keep_ratio)
    for ref in find_moe_blocks(model):
        holder = ref.block if not isinstance(ref.experts, RemappedExperts) else ref.experts
        bank = unwrap_bank(ref.experts)
        g, u, d = get_expert_weights(bank)
        holder.experts = LowRankSparseExperts.from_weights(
            g, u, d, rank=rank, keep_ratio=keep_ratio, act=bank_activation(bank)
        )


# ------------------------------------------------------------------------- iterative structured pruning
def _losparse_banks(model: nn.Module) -> list[LowRankSparseExperts]:
    banks, seen = [], set()
    for ref in find_moe_blocks(model):
        bank = unwrap_bank(ref.experts)
        if isinstance(bank, LowRankSparseExperts) and id(bank) not in seen:
            seen.add(id(bank))
            banks.append(bank)
    return banks


class LoSparsePruner:
    """Row pruning of the sparse parts ``S`` of every :class:`LowRankSparseExperts` bank of a model.

    Call :meth:`update` after each backward pass (before ``optimizer.zero_grad``) and :meth:`prune` with the
    schedule's keep ratio after the optimiser step. Importance ``EMA_beta(|S * grad S|)`` per entry; a row of
    S (one output unit of the expert matrix: column ``j`` of our ``(m, k)`` layout) scores the mean of its
    entries; rows below one model-wide threshold are zeroed and masked, so the kept fraction of S *entries*
    is ``keep_ratio`` (the official code's ``kthvalue`` over the repeated row scores).

    Args:
        model: a model whose MoE banks were replaced by :class:`LowRankSparseExperts`.
        beta: EMA factor (LoSparse/MC-SMoE ``beta1 = 0.85``).
    """

    def __init__(self, model: nn.Module, *, beta: float = 0.85) -> None:
        self.banks = _losparse_banks(model)
        if not self.banks:
            raise ValueError("model has no LowRankSparseExperts banks (run compress_model first)")
        self.beta = beta
        self.ema = {
            (i, n): torch.zeros_like(getattr(b, f"{n}_s")) for i, b in enumerate(self.banks) for n in _MATS
        }

    def update(self) -> None:
        """Fold ``|S * grad S|`` of the last backward pass into the EMA (entries without a gradient add 0)."""
        for (i, n), ema in self.ema.items():
            s = getattr(self.banks[i], f"{n}_s")
            ipt = (s.detach() * s.grad).abs() if s.grad is not None else torch.zeros_like(ema)
            ema.mul_(self.beta).add_(ipt, alpha=1 - self.beta)

    def row_scores(self) -> dict[tuple[int, str], torch.Tensor]:
        """``(E, m, k)`` per-entry scores equal to the mean EMA importance of their row (output unit)."""
        return {key: ema.mean(dim=1, keepdim=True).expand_as(ema) for key, ema in self.ema.items()}

    def prune(self, keep_ratio: float) -> float:
        """Keep the ``keep_ratio`` highest-scoring rows (by entries) model-wide; returns the threshold."""
        if not 0.0 <= keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
        scores = self.row_scores()
        alive = {key: getattr(self.banks[key[0]], f"{key[1]}_mask") > 0 for key in scores}
        # rows already pruned rank lowest (their importance is 0 from now on anyway)
        flat = torch.cat(
            [torch.where(alive[k], sc, torch.full_like(sc, -1.0)).flatten() for k, sc in scores.items()]
        )
        n_drop = int(round(flat.numel() * (1 - keep_ratio)))
        if n_drop <= 0:
            return float("-inf")
        thr = float(flat.kthvalue(n_drop).values)
        with torch.no_grad():
            for (i, n), sc in scores.items():
                bank = self.banks[i]
                keep = (sc > thr) & alive[(i, n)]
                getattr(bank, f"{n}_mask").copy_(keep.to(bank.gate_mask.dtype))
                getattr(bank, f"{n}_s").mul_(keep)
        return thr

    def kept_fraction(self) -> float:
        """Fraction of S entries still kept over all banks."""
        kept = sum(float(getattr(b, f"{n}_mask").sum()) for b in self.banks for n in _MATS)
        total = sum(getattr(b, f"{n}_mask").numel() for b in self.banks for n in _MATS)
        return kept / total


_MATS = ("gate", "up", "down")


@dataclass
class CompressStats:
    """What :func:`compress_and_finetune` did: the keep ratio and loss at each step."""

    keep_ratios: list[float]
    losses: list[float]
    final_kept_fraction: float


def compress_and_finetune(
    model: nn.Module,
    teacher: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    rank: int,
    final_keep_ratio: float = 0.10,
    total_steps: int,
    initial_warmup: int = 0,
    final_warmup: int = 0,
    lr: float = 1e-3,
    temperature: float = 2.0,
    kd_lambda: float = 0.2,
    mlm_lambda: float = 1.0,
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> CompressStats:
    """MC-SMoE compression as the official code runs it: LoSparse init, KD fine-tuning, iterative row pruning
    of S by gradient importance on the cubic schedule (in place).

    Args:
        model: the (merged) student; its MoE banks are replaced by :class:`LowRankSparseExperts`.
        teacher: the model to distil from (frozen, eval mode).
        batches: yields ``(x, y)``; ``forward(model, x)`` must give logits whose ``[..., V]`` rows match y.
        rank: LoSparse rank.
        final_keep_ratio: fraction of S entries kept at the end (MC-SMoE README 0.10).
        total_steps: optimiser steps (the schedule spans them; ``batches`` must yield at least this many).
        initial_warmup, final_warmup: steps at keep 1.0 first and at ``final_keep_ratio`` last.
        lr: AdamW learning rate.
        temperature, kd_lambda, mlm_lambda: :func:`kd_loss` (``official`` weighting).
        forward: default ``model(x)`` (``.logits`` if present).

    Returns:
        :class:`CompressStats`.
    """
    from moe_core.inference.scmoe import lm_logits  # the shared "logits of an LM forward" helper

    fwd = forward or lm_logits
    compress_model(model, rank=rank, keep_ratio=1.0)
    pruner = LoSparsePruner(model)
    teacher.eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    was_training = model.training
    model.train()
    keeps, losses = [], []
    it = iter(batches)
    for step in range(total_steps):
        try:
            x, y = next(it)
        except StopIteration as e:
            raise ValueError(f"batches ran out after {step} of {total_steps} steps") from e
        with torch.no_grad():
            t_logits = fwd(teacher, x)
        loss = kd_loss(
            fwd(model, x), t_logits, y, temperature=temperature, kd_lambda=kd_lambda, mlm_lambda=mlm_lambda
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        pruner.update()
        opt.step()
        keep = cubic_keep_ratio(
            step + 1,
            total_steps=total_steps,
            initial_warmup=initial_warmup,
            final_warmup=final_warmup,
            final=final_keep_ratio,
        )
        if keep < 1.0:
            pruner.prune(keep)
        keeps.append(keep)
        losses.append(float(loss.detach()))
    model.train(was_training)
    return CompressStats(keep_ratios=keeps, losses=losses, final_kept_fraction=pruner.kept_fraction())
