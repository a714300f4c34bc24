"""HoME: Hierarchy of Multi-Gate Experts (Wang et al., arXiv 2408.05430), every mechanism switchable."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import get_args

import torch
from torch import nn

from moe_core.multigate.experts import Activation, DenseMLPExperts, Norm, NormLayers, check_input
from moe_core.multigate.gates import (
    MultiGateOutput,
    SoftmaxGate,
    mix_tasks,
    routing_float,
    stacked_gates,
    stacked_linear,
)
from moe_core.validation import check_choice

__all__ = ["FeatureGate", "HoME"]


class FeatureGate(nn.Module):
    """HoME feature-gate [S: third-party docstring citing the paper]: ``x_e = v ⊙ 2σ(v B_e A_e)`` per expert.

    ``B_e (D, l)`` starts at 0 so every gate is exactly 1 at initialisation [D]; ``A_e (l, D)`` is random.

    Args:
        dim: D.
        num_experts: E (one low-rank gate per expert).
        rank: l.
    """

    def __init__(self, *, dim: int, num_experts: int, rank: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"feature_gate_rank must be >= 1, got {rank}")
        self.B = nn.Parameter(torch.zeros(num_experts, dim, rank))
        self.A = nn.Parameter(torch.randn(num_experts, rank, dim) / math.sqrt(rank))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """``v (B, D) -> (B, E, D)`` one gated copy of the input per expert."""
        low = torch.einsum("bd,edr->ber", v, self.B)  # (B, E, l)
        gate = 2 * torch.sigmoid(torch.einsum("ber,erd->bed", low, self.A))  # (B, E, D)
        return v.unsqueeze(1) * gate


class HoME(nn.Module):
    """Hierarchy of Multi-Gate Experts (HoME, arXiv 2408.05430) with every mechanism switchable.

    The paper names the mechanisms below; only its abstract and secondary write-ups could be read, so every
    equation is moekit's reading, tagged [R] (legend in ``docs/moe_core.md``).
    ``moe_core.reference.home_reference`` implements the same readings one row and one expert at a time, and
    the tests hold this module to it (float64, 1e-10, forward and gradients). Notation: ``c(t)`` the category
    of task t, ``⊕`` concatenation.

    * Expert normalisation + Swish (``expert_norm``, ``activation``, ``expert_norm_layers``):
      ``E(x) = Swish(BN(MLP_E(x)))`` [S: the equation as quoted by write-ups of the paper]. Reading
      (default ``expert_norm_layers="last"``): ``MLP_E`` is the expert's MLP whose output layer is linear;
      BN and Swish act on that output, i.e. the last layer is ``Swish(BN(h W + b))`` and every hidden
      layer ``Swish(h W + b)`` (the ``activation`` switch sets both). The paper normalises the *output*
      so that the gates mix experts of one scale; it says nothing of BN inside an expert.
      ``expert_norm_layers="all"`` (moekit's earlier reading) also puts BN on every hidden layer.
      BN normalises each expert unit with the batch mean and biased batch variance in training mode and
      with the running statistics in eval mode (``torch.nn.BatchNorm1d``); ``"ln"`` is a LayerNorm over one
      expert's units whose affine parameters are shared by the experts of a bank.
    * Hierarchy (``levels=2``): a meta level whose experts read ``v``; per category c
      ``z_c = Σ softmax(G_c(v)) · [E^meta_shared(v), E^meta_c(v)]`` and one global
      ``z_sh = Σ softmax(G_sh(v)) · [all meta experts](v)``. Task level: shared experts read ``z_sh``,
      category-c experts and the experts of every task in c read ``z_c``;
      ``h_t = Σ softmax(G_t(z_c(t) ⊕ z_sh)) · [E_shared, E_c(t), E_t]`` (reading: the task gate reads its
      category's meta output concatenated with the global one, in that order).
    * Hierarchy mask (``hierarchy_mask``): task t's gate candidates are the shared experts, its own
      category's experts and its own task's experts (not the other tasks' experts of the same category);
      a category gate of the meta level sees the shared meta experts and its category's. Implemented as −inf
      logits, which equals a softmax over the restricted list. Off: every gate sees every expert of its level
      (the global meta gate is never masked).
    * Feature-gate (``feature_gate_rank``) [S]: each expert that reads ``v`` (the meta experts with
      ``levels=2``, every expert with ``levels=1``) reads ``v ⊙ 2σ(v B_e A_e)``, one low-rank gate per expert.
    * Self-gate (``self_gate``; form our reading): a gated residual of task t's own experts,
      ``h_t += Σ_j w_j E_{t,j}`` with ``w = σ(Linear(z_c(t)))`` for one task expert and
      ``softmax(Linear(z_c(t)))`` for several (``levels=1``: ``Linear(v)``). The secondary sources give the
      gate's form (Sigmoid for one expert, Softmax for several, "in a residual manner", to pass gradient to
      the specific experts of sparse tasks) but not where the residual lands; two readings remain open: the
      one implemented (the task's experts stay candidates of its softmax gate *and* enter once more through
      the self-gate), and one where the specific experts enter *only* through the self-gate residual (the
      softmax then mixes shared and category experts). On KuaiRand-Pure the implemented reading lets sparse
      tasks put 0.8-1.0 of their softmax weight on their own expert (``BENCHMARKS.md``).
      ``self_gate_only_specific=True`` selects the second reading: every task expert is left out of every
      task gate's candidates (with or without the hierarchy mask) and reaches ``h_t`` only through the
      self-gate.

    Gate logits are computed in float32, or float64 for float64 inputs (see :func:`routing_float`).

    With ``levels=1`` there is no meta level: every expert reads ``v`` and every gate reads ``v``. Then
    ``expert_norm="none", activation="relu", hierarchy_mask=False, feature_gate_rank=None, self_gate=False``
    is exactly MMoE over the concatenated experts ``[shared, categories..., tasks...]``.

    Args:
        dim: D, input width.
        categories: task groups, e.g. ``[[0], [1]]`` (task indices per category; every task exactly once).
        levels: 1 or 2.
        num_shared: globally shared experts of the task level.
        num_per_category: experts per category at the task level.
        num_per_task: task-specific experts per task.
        meta_num_shared, meta_num_per_category: expert counts of the meta level (``levels=2``).
        expert_hidden: expert widths; the last is H (also the meta level's output width).
        expert_norm: ``"bn"`` | ``"ln"`` | ``"none"``.
        activation: ``"silu"`` | ``"relu"``.
        expert_norm_layers: ``"last"`` (norm on each expert's output layer) | ``"all"`` (every layer).
        hierarchy_mask: restrict gates to their branch.
        feature_gate_rank: rank l of the feature gates, or None for no feature gate.
        self_gate: add the task-expert gated residual.
        self_gate_only_specific: the task experts reach the task output only through the self-gate (not as
            softmax candidates); needs ``self_gate`` and shared or category experts.
        dropout: expert dropout.
    """

    def __init__(
        self,
        *,
        dim: int,
        categories: Sequence[Sequence[int]],
        levels: int = 2,
        num_shared: int = 2,
        num_per_category: int = 2,
        num_per_task: int = 1,
        meta_num_shared: int = 2,
        meta_num_per_category: int = 2,
        expert_hidden: Sequence[int] = (64,),
        expert_norm: Norm = "bn",
        activation: Activation = "silu",
        hierarchy_mask: bool = True,
        feature_gate_rank: int | None = None,
        self_gate: bool = True,
        self_gate_only_specific: bool = False,
        dropout: float = 0.0,
        expert_norm_layers: NormLayers = "last",
    ) -> None:
        super().__init__()
        self.dim = dim
        cats = [list(map(int, c)) for c in categories]
        tasks = sorted(t for c in cats for t in c)
        if not cats or any(not c for c in cats) or tasks != list(range(len(tasks))):
            raise ValueError(f"categories must partition the tasks 0..M-1 into non-empty groups, got {cats}")
        check_choice("levels", levels, (1, 2))
        check_choice("expert_norm", expert_norm, get_args(Norm))
        check_choice("activation", activation, get_args(Activation))
        if self_gate and num_per_task < 1:
            raise ValueError("self_gate needs num_per_task >= 1 (it gates the task-specific experts)")
        if self_gate_only_specific and not self_gate:
            raise ValueError("self_gate_only_specific needs self_gate=True")
        if self_gate_only_specific and num_shared + num_per_category < 1:
            raise ValueError("self_gate_only_specific needs shared or category experts for the softmax gates")
        self.self_gate_only_specific = self_gate_only_specific
        self.categories, self.levels = cats, levels
        self.num_tasks, self.num_cats = len(tasks), len(cats)
        self.cat_of = {t: c for c, ts in enumerate(cats) for t in ts}
        # (M,) category of each task, for one gather of the category outputs (not in the state dict)
        self.register_buffer(
            "task_category", torch.tensor([self.cat_of[t] for t in range(len(tasks))]), persistent=False
        )
        self.num_shared, self.num_per_category, self.num_per_task = num_shared, num_per_category, num_per_task
        self.hierarchy_mask, self.self_gate = hierarchy_mask, self_gate
        kw = dict(
            hidden_dims=expert_hidden, norm=expert_norm, activation=activation, dropout=dropout,
            norm_layers=expert_norm_layers,
        )  # fmt: skip
        h = int(expert_hidden[-1])
        self.out_dim = h
        c, m = self.num_cats, self.num_tasks

        # ---- meta level (levels == 2): reads v
        if levels == 2:
            n_meta = meta_num_shared + c * meta_num_per_category
            if meta_num_shared + meta_num_per_category < 1:
                raise ValueError("the meta level needs at least one expert")
            self.meta_num_shared, self.meta_num_per_category = meta_num_shared, meta_num_per_category
            self.meta_experts = DenseMLPExperts(num_experts=n_meta, dim=dim, **kw)
            self.meta_feature_gate = (
                FeatureGate(dim=dim, num_experts=n_meta, rank=feature_gate_rank)
                if feature_gate_rank
                else None
            )
            self.meta_cat_gates = nn.ModuleList(
                SoftmaxGate(dim=dim, num_experts=n_meta, mask=self._meta_mask(ci) if hierarchy_mask else None)
                for ci in range(c)
            )
            self.meta_shared_gate = SoftmaxGate(dim=dim, num_experts=n_meta)
            task_in, gate_in = h, 2 * h
        else:
            task_in, gate_in = dim, dim

        # ---- task level: one bank per kind so each reads its own stream
        self.shared_experts = DenseMLPExperts(num_experts=num_shared, dim=task_in, **kw)
        self.cat_experts = DenseMLPExperts(num_experts=c * num_per_category, dim=task_in, **kw)
        self.task_experts = DenseMLPExperts(num_experts=m * num_per_task, dim=task_in, **kw)
        n_task_level = num_shared + c * num_per_category + m * num_per_task
        if n_task_level < 1:
            raise ValueError("the task level needs at least one expert")
        self.feature_gate = (
            FeatureGate(dim=dim, num_experts=n_task_level, rank=feature_gate_rank)
            if feature_gate_rank and levels == 1
            else None
        )
        self.task_gates = nn.ModuleList(
            SoftmaxGate(dim=gate_in, num_experts=n_task_level, mask=self._gate_mask(t, hierarchy_mask))
            for t in range(m)
        )
        if self_gate:
            self.self_gates = nn.ModuleList(
                nn.Linear(task_in if levels == 2 else dim, num_per_task) for _ in range(m)
            )

    # candidate masks -------------------------------------------------------------------------------
    def _meta_mask(self, ci: int) -> list[bool]:
        s, p = self.meta_num_shared, self.meta_num_per_category
        return [True] * s + [cj == ci for cj in range(self.num_cats) for _ in range(p)]

    def _gate_mask(self, t: int, hierarchy_mask: bool) -> list[bool] | None:
        """Task t's gate candidates: the hierarchy mask, minus every task expert with
        ``self_gate_only_specific``; None when every expert of the level is a candidate."""
        if not self.self_gate_only_specific:
            return self._task_mask(t) if hierarchy_mask else None
        n_sc = self.num_shared + self.num_cats * self.num_per_category
        allowed = (
            self._task_mask(t) if hierarchy_mask else [True] * (n_sc + self.num_tasks * self.num_per_task)
        )
        return allowed[:n_sc] + [False] * (len(allowed) - n_sc)

    def _task_mask(self, t: int) -> list[bool]:
        ci = self.cat_of[t]
        return (
            [True] * self.num_shared
            + [cj == ci for cj in range(self.num_cats) for _ in range(self.num_per_category)]
            + [tj == t for tj in range(self.num_tasks) for _ in range(self.num_per_task)]
        )

    def expert_groups(self) -> list[tuple[str, int]]:
        """Names and sizes of the task-level candidate list, in gate order."""
        return [
            ("shared", self.num_shared),
            ("category", self.num_cats * self.num_per_category),
            ("task", self.num_tasks * self.num_per_task),
        ]

    def forward(self, v: torch.Tensor) -> MultiGateOutput:
        """``v (B, D)`` -> task outputs ``(B, M, H)``."""
        check_input(v, self.dim, "HoME")
        m = self.num_tasks
        gates: dict[str, torch.Tensor] = {}
        experts: dict[str, torch.Tensor] = {}
        if self.levels == 2:
            gated = self.meta_feature_gate is not None
            x_meta = self.meta_feature_gate(v) if gated else v  # (B, E_meta, D) or (B, D)
            ex_meta = self.meta_experts(x_meta)  # (B, E_meta, H)
            experts["meta"] = ex_meta
            # the C category gates and the global gate read v: one matmul, one softmax, one bmm
            w_meta = stacked_gates([*self.meta_cat_gates, self.meta_shared_gate], v)  # (B, C+1, E_meta)
            for ci, w in enumerate(w_meta.unbind(1)[: self.num_cats]):
                gates[f"meta_cat{ci}"] = w
            gates["meta_shared"] = w_meta[:, -1]
            z = mix_tasks(w_meta, ex_meta)  # (B, C+1, H)
            z_cat, z_sh = z.split([self.num_cats, 1], dim=1)  # (B, C, H), (B, 1, H)
            ex_sh = self.shared_experts(z_sh.squeeze(1))  # (B, S, H)
            p, q = self.num_per_category, self.num_per_task
            cat_in = z_cat.repeat_interleave(p, dim=1) if p > 1 else z_cat  # (B, C*P, H) category c: z_c
            ex_cat = self.cat_experts(cat_in)  # (B, C*P, H)
            task_cat = z_cat.index_select(1, self.task_category)  # (B, M, H): task t's category output
            task_in = task_cat.repeat_interleave(q, dim=1) if q > 1 else task_cat  # (B, M*Q, H)
            ex_task = self.task_experts(task_in)  # (B, M*Q, H) task t's experts read z_c
            gate_in = torch.cat([task_cat, z_sh.expand(-1, m, -1)], dim=-1).transpose(0, 1)  # (M, B, 2H)
            self_in = task_cat.transpose(0, 1)  # (M, B, H)
        else:
            n_sh = self.num_shared
            n_cat = self.num_cats * self.num_per_category
            if self.feature_gate is not None:
                xg = self.feature_gate(v)  # (B, E_task_level, D)
                x_sh, x_cat, x_task = xg.split([n_sh, n_cat, xg.shape[1] - n_sh - n_cat], dim=1)
            else:
                x_sh = x_cat = x_task = v
            ex_sh = self.shared_experts(x_sh)
            ex_cat = self.cat_experts(x_cat)  # (B, C*P, H)
            ex_task = self.task_experts(x_task)  # (B, M*Q, H)
            gate_in = self_in = v  # (B, D): every gate reads v
        experts.update({"shared": ex_sh, "category": ex_cat, "task": ex_task})
        cand = torch.cat([ex_sh, ex_cat, ex_task], dim=1)  # (B, E_task_level, H)
        # every task gate in one matmul and every task's mixture in one bmm
        w = stacked_gates(self.task_gates, gate_in)  # (B, M, E_task_level)
        gates.update({f"task{t}": wt for t, wt in enumerate(w.unbind(1))})
        outs = mix_tasks(w, cand)  # (B, M, H)
        if self.self_gate:  # q >= 1 (checked in __init__)
            q = self.num_per_task
            logits = routing_float(stacked_linear(self.self_gates, self_in))  # (B, M, Q)
            sw = torch.sigmoid(logits) if q == 1 else logits.softmax(dim=-1)
            gates.update({f"self{t}": swt for t, swt in enumerate(sw.unbind(1))})
            own = ex_task.view(ex_task.shape[0], m, q, -1)  # (B, M, Q, H): task t's experts
            outs = outs + (sw.to(own.dtype).unsqueeze(-1) * own).sum(2)
        return MultiGateOutput(outs, gates, experts)  # (B, M, H)
