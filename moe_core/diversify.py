"""Diversification of heads/experts on unlabelled data (DivDis arXiv 2202.03418, D-BAT arXiv 2202.04414;
studied in "Unraveling the Key Components of OOD Generalization via Diversification", arXiv 2312.16313).

Stable API (other apps may call it; keep signatures):

* ``probs`` is always ``(B, H, C)``: B unlabelled rows, H heads (hypotheses / experts), C classes, rows on
  the simplex. Build it from logits ``(B, H, C)`` with ``logits.softmax(-1)``.
* :func:`mutual_information_loss` (DivDis): mean over head pairs ``i < j`` of the mutual information of the
  two heads' predictions, with the joint ``P(y_i, y_j) = mean_b p_i(.|x_b) ⊗ p_j(.|x_b)`` estimated on the
  batch. :func:`pairwise_mutual_information` returns the ``(H, H)`` matrix.
* :func:`marginal_kl_loss` (DivDis regulariser): ``mean_h KL(mean_b p_h || prior)``; keeps heads from the
  degenerate fix of predicting one class on all unlabelled rows.
* :func:`dbat_agreement_loss` (D-BAT): for each pair ``i < j``, with ``y = argmax p_i``,
  ``-log(p_i,y (1 - p_j,y) + (1 - p_i,y) p_j,y)``; earlier heads are detached (sequential D-BAT: head j is
  trained to disagree with fixed heads ``< j``).
* :func:`diversification_loss`: one entry point, ``method in {"divdis", "dbat"}``.
* Selecting one hypothesis after training: :func:`select_head` (accuracy on a small labelled target
  set; DivDis "few labels" and the ICLR 2024 paper's selection by a labelled target validation set),
  :func:`disagreement_queries` (DivDis active querying: the unlabelled rows where heads disagree most, to
  be labelled), :func:`select_head_by_metric` (any per-head score, e.g. RankIC on a validation period).
* :class:`DiversifiedHeads`: ``H`` linear heads on shared features, logits ``(B, H, C)``.

Regression heads (e.g. per-stock scores whose only use is their order) [D, our reading]: a score
``s (B, H)`` over one cross-section becomes a binary prediction "above this cross-section's mean" by
:func:`scores_to_binary_probs`: ``p_up = sigmoid((s - mean_b s) / (temperature * std_b s))``, giving
``(B, H, 2)`` probs for the two losses above (standardising per head makes the loss independent of each
head's score scale). :func:`gaussian_mutual_information` is the closed form ``-0.5 log(1 - rho^2)`` for
jointly Gaussian scores, a smooth alternative penalty on the heads' correlation ``rho``.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.validation import check_choice

__all__ = [
    "DiversifiedHeads",
    "Method",
    "dbat_agreement_loss",
    "disagreement_queries",
    "diversification_loss",
    "gaussian_mutual_information",
    "marginal_kl_loss",
    "mutual_information_loss",
    "pairwise_mutual_information",
    "scores_to_binary_probs",
    "select_head",
    "select_head_by_metric",
]

Method = Literal["divdis", "dbat"]
_EPS = 1e-12


def _check_probs(probs: torch.Tensor) -> None:
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape (B, H, C), got {tuple(probs.shape)}")
    if probs.shape[1] < 1 or probs.shape[2] < 2:
        raise ValueError(f"probs needs H >= 1 heads and C >= 2 classes, got {tuple(probs.shape)}")


def pairwise_mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """Mutual information between every pair of heads' predictions, estimated on the batch (DivDis).

    ``P_ij(a, b) = mean_b p_i(a | x_b) p_j(b | x_b)`` (heads conditionally independent given x),
    ``MI_ij = KL(P_ij || P_i ⊗ P_j)`` with the marginals ``P_i = mean_b p_i``.

    Args:
        probs: ``(B, H, C)`` predictions on the simplex.

    Returns:
        ``(H, H)`` float32 symmetric matrix, nats; the diagonal is each head's own "MI with itself".
    """
    _check_probs(probs)
    p = probs.float()
    joint = torch.einsum("bhc,bgd->hgcd", p, p) / p.shape[0]  # (H, H, C, C)
    marg = p.mean(0)  # (H, C)
    prod = torch.einsum("hc,gd->hgcd", marg, marg)  # (H, H, C, C)
    # 0 * log(0 / x) = 0: clamp inside the log only, so exact zeros contribute nothing
    kl = joint * (joint.clamp_min(_EPS).log() - prod.clamp_min(_EPS).log())  # (H, H, C, C)
    return kl.sum((-1, -2))


def mutual_information_loss(probs: torch.Tensor) -> torch.Tensor:
    """DivDis disagreement loss: mean pairwise MI over head pairs ``i < j`` (0 for one head).

    The official DivDis code divides the upper-triangle sum by ``H²``; we average over the ``H(H-1)/2``
    pairs so the weight does not shrink as heads are added [D].

    Args:
        probs: ``(B, H, C)``.

    Returns:
        Scalar (nats), differentiable in ``probs``.
    """
    h = probs.shape[1]
    if h < 2:
        return probs.sum() * 0.0
    mi = pairwise_mutual_information(probs)  # (H, H)
    iu = torch.triu_indices(h, h, offset=1, device=mi.device)
    return mi[iu[0], iu[1]].mean()


def marginal_kl_loss(probs: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """DivDis regulariser ``mean_h KL(mean_b p_h || prior)``.

    Args:
        probs: ``(B, H, C)``.
        prior: ``(C,)`` class distribution expected on the unlabelled data (default uniform; DivDis uses the
            labelled data's class frequencies).

    Returns:
        Scalar (nats).
    """
    _check_probs(probs)
    c = probs.shape[2]
    q = torch.full((c,), 1.0 / c, device=probs.device) if prior is None else prior.float().to(probs.device)
    if q.shape != (c,):
        raise ValueError(f"prior must have shape ({c},), got {tuple(q.shape)}")
    marg = probs.float().mean(0)  # (H, C)
    return (marg * (marg.clamp_min(_EPS).log() - q.clamp_min(_EPS).log())).sum(-1).mean()


def dbat_agreement_loss(
    probs: torch.Tensor, *, detach_earlier: bool = True, eps: float = 1e-7
) -> torch.Tensor:
    """D-BAT agreement loss on unlabelled rows, averaged over head pairs ``i < j`` and rows.

    With ``y = argmax_c p_i(c|x)`` (head i's predicted class):
    ``-log(p_i,y (1 - p_j,y) + (1 - p_i,y) p_j,y)``, the negative log-probability that exactly one of the
    two heads predicts y. For C = 2 this is the paper's binary form ``-log(p_i,0 p_j,1 + p_i,1 p_j,0)``.
    Small when the heads disagree, large when they agree confidently.

    Args:
        probs: ``(B, H, C)``.
        detach_earlier: stop the gradient into head i of each pair (sequential D-BAT: head j is trained
            against fixed earlier heads). False trains both heads of each pair at once (our variant [D]).
        eps: added inside the log.

    Returns:
        Scalar.
    """
    _check_probs(probs)
    h = probs.shape[1]
    if h < 2:
        return probs.sum() * 0.0
    p = probs.float()
    terms = []
    for j in range(1, h):
        earlier = p[:, :j].detach() if detach_earlier else p[:, :j]  # (B, j, C)
        y = earlier.argmax(-1, keepdim=True)  # (B, j, 1)
        pi = earlier.gather(-1, y).squeeze(-1)  # (B, j)
        pj = p[:, j].unsqueeze(1).expand(-1, j, -1).gather(-1, y).squeeze(-1)  # (B, j)
        terms.append(-torch.log(pi * (1 - pj) + (1 - pi) * pj + eps))  # (B, j)
    return torch.cat(terms, dim=1).mean()


def diversification_loss(
    probs: torch.Tensor,
    *,
    method: Method = "divdis",
    prior: torch.Tensor | None = None,
    reg_weight: float = 1.0,
) -> torch.Tensor:
    """The unlabelled-data term of either method (weight it against the labelled loss yourself).

    Args:
        probs: ``(B, H, C)`` predictions on unlabelled rows.
        method: ``divdis`` -> ``MI + reg_weight * marginal KL``; ``dbat`` -> D-BAT agreement loss
            (sequential, earlier heads detached).
        prior: ``(C,)`` for the DivDis regulariser.
        reg_weight: DivDis regulariser weight (the paper tunes it; 1.0 here).

    Returns:
        Scalar.
    """
    check_choice("method", method, get_args(Method))
    if method == "divdis":
        return mutual_information_loss(probs) + reg_weight * marginal_kl_loss(probs, prior)
    return dbat_agreement_loss(probs)


def scores_to_binary_probs(scores: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Regression scores -> "above this batch's mean" binary predictions (our reading for score heads) [D].

    Args:
        scores: ``(B, H)`` scores of H heads on one cross-section (B rows, e.g. the stocks of one day).
        temperature: softness; each head's centred score is divided by ``temperature * std``.

    Returns:
        ``(B, H, 2)`` probs ``[p_down, p_up]``.
    """
    if scores.dim() != 2 or scores.shape[0] < 2:
        raise ValueError(f"scores must have shape (B >= 2, H), got {tuple(scores.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = scores.float()
    z = (s - s.mean(0)) / (temperature * s.std(0).clamp_min(1e-8))  # (B, H)
    up = torch.sigmoid(z)
    return torch.stack([1 - up, up], dim=-1)  # (B, H, 2)


def gaussian_mutual_information(scores: torch.Tensor) -> torch.Tensor:
    """``(H, H)`` mutual information ``-0.5 log(1 - rho²)`` of jointly Gaussian scores (closed form).

    Args:
        scores: ``(B, H)``.

    Returns:
        ``(H, H)``; the diagonal is set to 0 (the formula diverges there).
    """
    if scores.dim() != 2 or scores.shape[0] < 3:
        raise ValueError(f"scores must have shape (B >= 3, H), got {tuple(scores.shape)}")
    s = scores.float()
    z = (s - s.mean(0)) / s.std(0, unbiased=False).clamp_min(1e-8)  # (B, H)
    rho = (z.t() @ z) / s.shape[0]  # (H, H)
    mi = -0.5 * torch.log((1 - rho**2).clamp_min(1e-6))
    return mi * (1 - torch.eye(s.shape[1], device=s.device))


def select_head(probs: torch.Tensor, labels: torch.Tensor) -> int:
    """The head with the best accuracy on a small labelled target set (ties: lowest cross-entropy).

    Args:
        probs: ``(B, H, C)`` predictions on the labelled rows.
        labels: ``(B,)`` class ids.
    """
    _check_probs(probs)
    if labels.shape != probs.shape[:1]:
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {tuple(labels.shape)}")
    acc = (probs.argmax(-1) == labels[:, None]).float().mean(0)  # (H,)
    nll = -probs.float().clamp_min(_EPS).log().gather(-1, labels[:, None, None].expand(-1, probs.shape[1], 1))
    nll = nll.squeeze(-1).mean(0)  # (H,)
    best = acc == acc.max()
    return int(torch.where(best, nll, torch.full_like(nll, math.inf)).argmin())


def select_head_by_metric(metric: torch.Tensor, *, higher_is_better: bool = True) -> int:
    """Index of the best head under any per-head validation metric ``(H,)`` (e.g. RankIC); NaN never wins."""
    m = metric.float().clone()
    m[torch.isnan(m)] = -math.inf if higher_is_better else math.inf
    return int(m.argmax() if higher_is_better else m.argmin())


def disagreement_queries(probs: torch.Tensor, n: int) -> torch.Tensor:
    """Rows to label for head selection (DivDis active querying): the ``n`` rows with the largest total
    variation between head predictions, ``sum_{i<j} 0.5 |p_i - p_j|_1``.

    Args:
        probs: ``(B, H, C)`` on unlabelled rows.
        n: rows to return.

    Returns:
        ``(n,)`` row indices, most disagreeing first.
    """
    _check_probs(probs)
    if not 1 <= n <= probs.shape[0]:
        raise ValueError(f"n must be in [1, {probs.shape[0]}], got {n}")
    tv = 0.5 * (probs[:, :, None, :] - probs[:, None, :, :]).abs().sum(-1)  # (B, H, H)
    return tv.sum((1, 2)).topk(n).indices


class DiversifiedHeads(nn.Module):
    """``H`` independent linear heads on shared features.

    Args:
        in_dim: feature width F.
        num_heads: H.
        num_classes: C.
    """

    def __init__(self, *, in_dim: int, num_heads: int, num_classes: int) -> None:
        super().__init__()
        if num_heads < 1 or num_classes < 2:
            raise ValueError(f"need num_heads >= 1 and num_classes >= 2, got {num_heads}, {num_classes}")
        self.num_heads, self.num_classes = num_heads, num_classes
        self.proj = nn.Linear(in_dim, num_heads * num_classes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, F)`` features -> ``(B, H, C)`` logits."""
        return self.proj(feats).view(feats.shape[0], self.num_heads, self.num_classes)  # (B, H, C)

    def labelled_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over heads of the cross-entropy on labelled rows (every head must fit the training data)."""
        h = logits.shape[1]
        return F.cross_entropy(logits.reshape(-1, self.num_classes), labels.repeat_interleave(h))
