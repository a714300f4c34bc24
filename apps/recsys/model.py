"""Multi-task recommendation networks: embeddings -> multi-gate backbone -> per-task towers -> logits.

The backbone is injected (``class_path``/``init_args`` in YAML, the way LightningCLI takes optimizers): any
``nn.Module`` built as ``backbone(dim=D, num_tasks=M)`` that returns a ``MultiGateOutput``. The shipped ones:
Shared-Bottom, MMoE (DOI 10.1145/3219819.3220007) and PLE (DOI 10.1145/3383313.3412236) from
``moe_core.multigate``, and :class:`HoMEBackbone` (HoME, arXiv 2408.05430, taking the task count like the
others). Networks return logits and gate information, never probabilities or losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from moe_core.multigate import HoME, MultiGateOutput


class BackboneFactory(Protocol):
    """Builds a multi-gate backbone once the data fix its input width and task count.

    In YAML: ``backbone: {class_path: moe_core.multigate.MMoE, init_args: {num_experts: 8, expert_hidden:
    [128, 64]}}``; ``dim`` and ``num_tasks`` are supplied by :class:`MultiTaskNet`. In Python: a class or
    ``functools.partial(MMoE, num_experts=8, expert_hidden=(128, 64))``.
    """

    def __call__(self, *, dim: int, num_tasks: int) -> nn.Module: ...


class HoMEBackbone(HoME):
    """:class:`moe_core.multigate.HoME` built like the other backbones, from ``dim`` and ``num_tasks``.

    Args:
        dim: D, input width (from the embedding).
        num_tasks: M (from the data's task names).
        categories: task groups, e.g. ``[[0], [1]]``; default one category per task.
        **kwargs: the other :class:`~moe_core.multigate.HoME` arguments (``levels``, ``num_shared``,
            ``num_per_category``, ``num_per_task``, ``meta_num_shared``, ``meta_num_per_category``,
            ``expert_hidden``, ``expert_norm``, ``activation``, ``hierarchy_mask``, ``feature_gate_rank``,
            ``self_gate``, ``dropout``).
    """

    def __init__(
        self,
        *,
        dim: int,
        num_tasks: int,
        categories: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        cats = [[t] for t in range(num_tasks)] if categories is None else [list(c) for c in categories]
        if sum(len(c) for c in cats) != num_tasks:
            n = sum(len(c) for c in cats)
            raise ValueError(f"categories {cats} group {n} tasks, the data has {num_tasks}")
        super().__init__(dim=dim, categories=cats, **kwargs)


@dataclass
class MultiTaskOutput:
    """Per-task logits plus the backbone's gate information.

    Attributes:
        logits: ``(B, M)`` one logit per task.
        gates: per gate name ``(B, E_candidates)`` float32 weights (``task{k}`` = task k's last-level gate).
        expert_outputs: per expert group ``(B, E_group, H)`` activations.
    """

    logits: torch.Tensor
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_outputs: dict[str, torch.Tensor] = field(default_factory=dict)


class FeatureEmbedding(nn.Module):
    """Embeds categorical indices and concatenates standardised numeric values: ``v = [e_1..e_C, x_num]``.

    All C tables live in one ``(sum of cardinalities, d)`` matrix addressed through per-column row offsets, so
    a batch is one embedding lookup (and one backward) instead of C: measured [M] on census (38 columns), the
    C separate backward passes were ~10 % of a PLE training step. Column ``j`` reads only its own rows:
    indices outside ``[0, cardinality_j)`` raise ``ValueError`` instead of reading a neighbour's rows.

    Args:
        cardinalities: table size per categorical column (index 0 = out-of-vocabulary).
        num_numeric: F numeric inputs.
        embed_dim: width of every categorical embedding.
    """

    def __init__(self, *, cardinalities: Sequence[int], num_numeric: int, embed_dim: int) -> None:
        super().__init__()
        self.cardinalities = [int(c) for c in cardinalities]
        if any(c < 1 for c in self.cardinalities):
            raise ValueError(f"every cardinality must be >= 1, got {self.cardinalities}")
        self.num_numeric, self.embed_dim = num_numeric, embed_dim
        card = torch.tensor(self.cardinalities, dtype=torch.long)
        self.register_buffer("offsets", torch.cumsum(card, 0) - card, persistent=False)  # (C,)
        self.register_buffer("sizes", card, persistent=False)  # (C,)
        self.table = nn.Embedding(int(card.sum()), embed_dim)
        nn.init.normal_(self.table.weight, std=0.05)
        self.out_dim = len(self.cardinalities) * embed_dim + num_numeric

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        """``cat (B, C)`` int64, ``num (B, F)`` -> ``v (B, C*d + F)``."""
        c = len(self.cardinalities)
        if cat.shape[-1] != c or num.shape[-1] != self.num_numeric:
            raise ValueError(
                f"expected {c} categorical and {self.num_numeric} numeric columns, "
                f"got cat {tuple(cat.shape)} and num {tuple(num.shape)}"
            )
        bad = (cat < 0) | (cat >= self.sizes)  # (B, C)
        if bad.any():
            j = int(bad.any(0).nonzero()[0])
            raise ValueError(
                f"categorical column {j} has index {int(cat[:, j][bad[:, j]][0])} outside its table "
                f"[0, {self.cardinalities[j]}); was the data encoded with another preprocessor?"
            )
        emb = self.table(cat + self.offsets).flatten(1)  # (B, C*d)
        return torch.cat([emb, num.to(emb.dtype)], dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # checkpoints from before the fused table stored one ``tables.<j>.weight`` per column
        old = [f"{prefix}tables.{j}.weight" for j in range(len(self.cardinalities))]
        if old and all(k in state_dict for k in old):
            state_dict[f"{prefix}table.weight"] = torch.cat([state_dict.pop(k) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def tower(in_dim: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    """Per-task tower ``in_dim -> hidden... -> 1`` (ReLU), ending in a logit."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = h
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


class MultiTaskNet(nn.Module):
    """Embedding + injected backbone + towers.

    Args:
        cardinalities: categorical table sizes (from the fitted preprocessor).
        num_numeric: numeric input count.
        num_tasks: M.
        backbone: builds the backbone as ``backbone(dim=D, num_tasks=M)`` (see :class:`BackboneFactory`).
        embed_dim: categorical embedding width.
        tower_hidden: tower widths.
        tower_dropout: dropout inside towers.
    """

    def __init__(
        self,
        *,
        cardinalities: Sequence[int],
        num_numeric: int,
        num_tasks: int,
        backbone: BackboneFactory,
        embed_dim: int = 8,
        tower_hidden: Sequence[int] = (32,),
        tower_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.embedding = FeatureEmbedding(
            cardinalities=cardinalities, num_numeric=num_numeric, embed_dim=embed_dim
        )
        self.backbone = backbone(dim=self.embedding.out_dim, num_tasks=num_tasks)
        self.towers = nn.ModuleList(
            tower(self.backbone.out_dim, tower_hidden, tower_dropout) for _ in range(num_tasks)
        )

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> MultiTaskOutput:
        """``cat (B, C)``, ``num (B, F)`` -> logits ``(B, M)`` and gate information."""
        v = self.embedding(cat, num)  # (B, D)
        out: MultiGateOutput = self.backbone(v)
        logits = torch.cat([t(out.task_outputs[:, k]) for k, t in enumerate(self.towers)], dim=-1)  # (B, M)
        return MultiTaskOutput(logits, out.gates, out.expert_outputs)
