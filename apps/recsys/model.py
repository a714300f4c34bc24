"""Multi-task recommendation networks: embeddings -> multi-gate backbone -> per-task towers -> logits.

The backbone is injected (``class_path``/``init_args`` in YAML, the way LightningCLI takes optimizers): any
``nn.Module`` built as ``backbone(dim=D, num_tasks=M)`` that returns a ``MultiGateOutput``. The shipped ones:
Shared-Bottom, MMoE (DOI 10.1145/3219819.3220007) and PLE (DOI 10.1145/3383313.3412236) from
``moe_core.multigate``, and :class:`HoMEBackbone` (HoME, arXiv 2408.05430, taking the task count like the
others). Networks return logits and gate information, never probabilities or losses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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
            ``expert_hidden``, ``expert_norm``, ``expert_norm_layers``, ``activation``, ``hierarchy_mask``,
            ``feature_gate_rank``, ``self_gate``, ``dropout``).
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

    All C tables of one width live in one ``(sum of cardinalities, d)`` matrix addressed through per-column
    row offsets, so a batch is one embedding lookup (and one backward) per distinct width instead of C:
    measured [M] on census (38 columns), the C separate backward passes were ~10 % of a PLE training step.
    Column ``j`` reads only its own rows: indices outside ``[0, cardinality_j)`` raise ``ValueError`` instead
    of reading a neighbour's rows.

    Args:
        cardinalities: table size per categorical column (index 0 = out-of-vocabulary).
        num_numeric: F numeric inputs.
        embed_dim: width of every categorical embedding not named in ``embed_dims``.
        embed_dims: per-column widths (column name -> width), overriding ``embed_dim``; needs ``names``.
        names: column names in ``cat`` order (for ``embed_dims`` and error messages).
    """

    def __init__(
        self,
        *,
        cardinalities: Sequence[int],
        num_numeric: int,
        embed_dim: int,
        embed_dims: Mapping[str, int] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.cardinalities = [int(c) for c in cardinalities]
        if any(c < 1 for c in self.cardinalities):
            raise ValueError(f"every cardinality must be >= 1, got {self.cardinalities}")
        self.names = list(names) if names is not None else [f"column {j}" for j in range(len(cardinalities))]
        if len(self.names) != len(self.cardinalities):
            raise ValueError(f"{len(self.names)} names for {len(self.cardinalities)} categorical columns")
        embed_dims = dict(embed_dims or {})
        unknown = sorted(set(embed_dims) - set(self.names))
        if unknown:
            raise ValueError(
                f"embed_dims names unknown columns {unknown}; the embedded columns are {self.names}"
            )
        self.num_numeric, self.embed_dim = num_numeric, embed_dim
        self.dims = [int(embed_dims.get(n, embed_dim)) for n in self.names]
        if any(d < 1 for d in self.dims):
            raise ValueError(f"embedding widths must be >= 1, got {dict(zip(self.names, self.dims))}")
        card = torch.tensor(self.cardinalities, dtype=torch.long)
        self.register_buffer("sizes", card, persistent=False)  # (C,)
        # the default width keeps the name `table` (checkpoints of the single-width layout load unchanged)
        widths = [embed_dim] + sorted({d for d in self.dims if d != embed_dim})
        self.groups: list[list[int]] = [[j for j, d in enumerate(self.dims) if d == w] for w in widths]
        self.group_of = [0] * len(self.dims)
        offsets = torch.zeros(len(self.dims), dtype=torch.long)
        for g, cols in enumerate(self.groups):
            start = 0
            for j in cols:
                self.group_of[j] = g
                offsets[j] = start
                start += self.cardinalities[j]
            self.register_buffer(f"cols_{g}", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)  # (C,) row offset inside its group's table
        self.table = nn.Embedding(max(1, sum(self.cardinalities[j] for j in self.groups[0])), embed_dim)
        self.extra_tables = nn.ModuleList(
            nn.Embedding(sum(self.cardinalities[j] for j in cols), widths[g])
            for g, cols in enumerate(self.groups)
            if g > 0
        )
        for t in (self.table, *self.extra_tables):
            nn.init.normal_(t.weight, std=0.05)
        self.out_dim = sum(self.dims) + num_numeric

    def _table(self, g: int) -> nn.Embedding:
        return self.table if g == 0 else self.extra_tables[g - 1]

    def lookup(self, j: int, idx: torch.Tensor) -> torch.Tensor:
        """Embeddings of column ``j``'s vocabulary indices ``idx (...)`` -> ``(..., d_j)`` (sequence items
        share their target column's table)."""
        return self._table(self.group_of[j])(idx + self.offsets[j])

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
        """``cat (B, C)`` int64, ``num (B, F)`` -> ``v (B, sum d_j + F)`` (columns grouped by width)."""
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
                f"categorical {self.names[j]} has index {int(cat[:, j][bad[:, j]][0])} outside its table "
                f"[0, {self.cardinalities[j]}); was the data encoded with another preprocessor?"
            )
        parts = []
        for g in range(len(self.groups)):
            if not self.groups[g]:
                continue
            cols = getattr(self, f"cols_{g}")
            idx = cat[:, cols] + self.offsets[cols]  # (B, C_g)
            parts.append(self._table(g)(idx).flatten(1))  # (B, C_g * d_g)
        return torch.cat([*parts, num.to(parts[0].dtype if parts else num.dtype)], dim=-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # checkpoints from before the fused table stored one ``tables.<j>.weight`` per column
        old = [f"{prefix}tables.{j}.weight" for j in range(len(self.cardinalities))]
        if old and all(k in state_dict for k in old):
            state_dict[f"{prefix}table.weight"] = torch.cat([state_dict.pop(k) for k in old])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


SeqPooling = Literal["mean", "din"]


class SequencePooling(nn.Module):
    """Pools a behaviour sequence into one vector: masked mean, or DIN target attention (Zhou et al., arXiv
    1706.06978): ``a_l = MLP([k_l, q, k_l − q, k_l ⊙ q])``, ``pooled = Σ_l softmax_l(a_l) k_l`` over the
    valid positions (DIN leaves the scores unnormalised; the softmax is moekit's choice, so that pooled
    vectors keep one scale across history lengths). An empty history pools to zeros.

    Args:
        dim: d, width of the item embeddings (and of the query, the target item's embedding).
        mode: ``"mean"`` or ``"din"``.
        attention_hidden: widths of the DIN attention MLP.
    """

    def __init__(
        self, *, dim: int, mode: SeqPooling = "din", attention_hidden: Sequence[int] = (32,)
    ) -> None:
        super().__init__()
        if mode not in ("mean", "din"):
            raise ValueError(f"sequence pooling must be 'mean' or 'din', got {mode!r}")
        self.mode = mode
        if mode == "din":
            layers: list[nn.Module] = []
            d = 4 * dim
            for h in attention_hidden:
                layers += [nn.Linear(d, h), nn.SiLU()]
                d = h
            layers.append(nn.Linear(d, 1))
            self.attention = nn.Sequential(*layers)

    def forward(self, keys: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``keys (B, L, d)``, ``mask (B, L)`` bool, ``query (B, d)`` -> ``(B, d)``."""
        m = mask.to(keys.dtype).unsqueeze(-1)  # (B, L, 1)
        if self.mode == "mean":
            return (keys * m).sum(1) / m.sum(1).clamp_min(1.0)
        q = query.unsqueeze(1).expand_as(keys)  # (B, L, d)
        score = self.attention(torch.cat([keys, q, keys - q, keys * q], dim=-1)).squeeze(-1)  # (B, L)
        score = score.float().masked_fill(~mask, float("-inf"))
        w = torch.softmax(score, dim=-1).nan_to_num(0.0).to(keys.dtype)  # (B, L); all-masked rows -> 0
        return (w.unsqueeze(-1) * keys).sum(1)


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
    """Embedding (+ pooled behaviour sequences) + injected backbone + towers.

    Args:
        cardinalities: categorical table sizes (from the fitted preprocessor).
        num_numeric: numeric input count.
        num_tasks: M.
        backbone: builds the backbone as ``backbone(dim=D, num_tasks=M)`` (see :class:`BackboneFactory`).
        embed_dim: categorical embedding width.
        tower_hidden: tower widths.
        tower_dropout: dropout inside towers.
        embed_dims: per-column embedding widths (name -> width), needs ``feature_names``.
        feature_names: embedded column names in ``cat`` order.
        sequence_targets: per sequence feature, the index of the categorical column whose table it shares
            (its target item is that column's value of the row: the DIN query).
        seq_pooling: ``"din"`` (target attention) or ``"mean"``.
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
        embed_dims: Mapping[str, int] | None = None,
        feature_names: Sequence[str] | None = None,
        sequence_targets: Sequence[int] = (),
        seq_pooling: SeqPooling = "din",
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.embedding = FeatureEmbedding(
            cardinalities=cardinalities, num_numeric=num_numeric, embed_dim=embed_dim, embed_dims=embed_dims,
            names=feature_names,
        )  # fmt: skip
        self.sequence_targets = [int(j) for j in sequence_targets]
        self.pools = nn.ModuleList(
            SequencePooling(dim=self.embedding.dims[j], mode=seq_pooling) for j in self.sequence_targets
        )
        in_dim = self.embedding.out_dim + sum(self.embedding.dims[j] for j in self.sequence_targets)
        self.backbone = backbone(dim=in_dim, num_tasks=num_tasks)
        self.towers = nn.ModuleList(
            tower(self.backbone.out_dim, tower_hidden, tower_dropout) for _ in range(num_tasks)
        )

    def forward(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        seq: torch.Tensor | None = None,
        seq_mask: torch.Tensor | None = None,
    ) -> MultiTaskOutput:
        """``cat (B, C)``, ``num (B, F)``, ``seq``/``seq_mask (B, S, L)`` -> logits ``(B, M)`` and gates."""
        v = self.embedding(cat, num)  # (B, D0)
        if self.sequence_targets:
            if seq is None or seq_mask is None or seq.shape[1] != len(self.sequence_targets):
                got = None if seq is None else tuple(seq.shape)
                raise ValueError(
                    f"the network pools {len(self.sequence_targets)} sequence feature(s): give seq and "
                    f"seq_mask of shape (B, {len(self.sequence_targets)}, L), got {got}"
                )
            pooled = []
            for s, (j, pool) in enumerate(zip(self.sequence_targets, self.pools, strict=True)):
                keys = self.embedding.lookup(j, seq[:, s])  # (B, L, d_j)
                query = self.embedding.lookup(j, cat[:, j])  # (B, d_j) the row's target item
                pooled.append(pool(keys, seq_mask[:, s], query))
            v = torch.cat([v, *pooled], dim=-1)  # (B, D)
        out: MultiGateOutput = self.backbone(v)
        logits = torch.cat([t(out.task_outputs[:, k]) for k, t in enumerate(self.towers)], dim=-1)  # (B, M)
        return MultiTaskOutput(logits, out.gates, out.expert_outputs)
