"""Dense multi-gate mixtures: MMoE (Ma et al., KDD 2018, DOI 10.1145/3219819.3220007), CGC/PLE (Tang et al.,
RecSys 2020, DOI 10.1145/3383313.3412236) and HoME (Wang et al., arXiv 2408.05430).

In these models every expert sees every row and each task mixes all (or a masked subset of) experts with
its own softmax gate, so experts are evaluated densely: :class:`DenseMLPExperts` keeps the stacked weights
``(E, D_in, D_out)`` of an expert bank and evaluates all experts with one (batched) matmul per layer. (The
routed banks in ``moe_core.experts`` dispatch a sparse ``(indices, weights)`` assignment; with ``indices =
arange(E)`` for every token they compute the same mixture, but the dense path is cheaper for E ~ 10.)

Shapes (glossary in ``moe_core.types``): B batch, D input width, H expert output width, E experts, M tasks.
Routing math (gate softmax) runs in float32 (float64 for float64 inputs); combine weights are cast back to the
activation dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["none", "bn", "ln"]
Activation = Literal["relu", "silu"]


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


@dataclass
class MultiGateOutput:
    """What a multi-gate backbone returns.

    Attributes:
        task_outputs: ``(B, M, H)`` one fused representation per task (the towers' inputs).
        gates: per gate name, ``(B, E_candidates)`` float32 (float64 for float64 inputs) combine weights of
            the last level's task gates (masked experts have weight 0); keys are ``task{k}`` plus the other
            gates of the model.
        expert_outputs: per expert group name, ``(B, E_group, H)`` activations (for zero-activation and
            output-scale diagnostics).
    """

    task_outputs: torch.Tensor
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_outputs: dict[str, torch.Tensor] = field(default_factory=dict)


class DenseMLPExperts(nn.Module):
    """E independent MLP experts with stacked weights, evaluated densely.

    Each layer is ``act(norm(x @ W_e + b_e))``; ``W`` is stored stacked as ``(E, D_in, D_out)``.
    ``norm="bn"`` is a BatchNorm over each expert's units (HoME's "expert normalisation"; our reading puts
    it between the linear map and the activation [R]); ``"ln"`` a per-expert LayerNorm.

    Args:
        num_experts: E.
        dim: D, input width.
        hidden_dims: widths of the layers; the last one is the expert output width H.
        norm: ``"none"`` | ``"bn"`` | ``"ln"``.
        activation: ``"relu"`` (MMoE/PLE) or ``"silu"`` (HoME's Swish, β = 1).
        dropout: dropout after each layer's activation.
    """

    def __init__(
        self,
        *,
        num_experts: int,
        dim: int,
        hidden_dims: Sequence[int],
        norm: Norm = "none",
        activation: Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {num_experts}")
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one layer width")
        self.num_experts, self.dim = num_experts, dim
        self.hidden_dims = tuple(int(h) for h in hidden_dims)
        self.norm = _check_choice("norm", norm, ("none", "bn", "ln"))
        self.activation = _check_choice("activation", activation, ("relu", "silu"))
        dims = (dim, *self.hidden_dims)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, a, b)) for a, b in zip(dims[:-1], dims[1:])
        )
        self.biases = nn.ParameterList(nn.Parameter(torch.empty(num_experts, b)) for b in dims[1:])
        if num_experts == 0:
            self.norms = None
        elif norm == "bn":
            self.norms = nn.ModuleList(nn.BatchNorm1d(num_experts * b) for b in dims[1:])
        elif norm == "ln":
            self.norms = nn.ModuleList(nn.LayerNorm(b) for b in dims[1:])
        else:
            self.norms = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    @property
    def out_dim(self) -> int:
        return self.hidden_dims[-1]

    def reset_parameters(self) -> None:
        # nn.Linear's default initialisation (kaiming-uniform, a=sqrt(5)), per expert
        for w, b in zip(self.weights, self.biases):
            bound = 1 / math.sqrt(w.shape[1])
            with torch.no_grad():
                w.uniform_(-bound, bound)
                b.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluate every expert.

        Args:
            x: ``(B, D)`` input shared by all experts, or ``(B, E, D)`` one input per expert.

        Returns:
            ``(B, E, H)`` expert outputs.
        """
        if x.dim() not in (2, 3):
            raise ValueError(f"expected x of shape (B, D) or (B, E, D), got {tuple(x.shape)}")
        b = x.shape[0]
        if self.num_experts == 0:
            return x.new_zeros(b, 0, self.out_dim)
        e = self.num_experts
        # expert-major layout (E, B, H_i) between layers, so each layer is one batched matmul
        if x.dim() == 2:
            w0 = self.weights[0]
            w_flat = w0.permute(1, 0, 2).reshape(self.dim, -1)  # (D, E*H_0)
            h = torch.addmm(self.biases[0].reshape(-1), x, w_flat)  # (B, E*H_0)
            h = h.view(b, e, -1).transpose(0, 1)  # (E, B, H_0)
        else:
            h = torch.baddbmm(self.biases[0][:, None, :], x.transpose(0, 1), self.weights[0])  # (E, B, H_0)
        for i in range(len(self.weights)):
            if i > 0:
                h = torch.baddbmm(self.biases[i][:, None, :], h, self.weights[i])  # (E, B, H_i)
            if self.norm == "bn":
                hb = h.transpose(0, 1).reshape(b, -1)  # (B, E*H_i): BN over every expert unit
                h = self.norms[i](hb).view(b, e, -1).transpose(0, 1)  # (E, B, H_i)
            elif self.norm == "ln":
                h = self.norms[i](h)
            h = F.relu(h) if self.activation == "relu" else F.silu(h)
            h = self.dropout(h)
        return h.transpose(0, 1)  # (B, E, H)


def routing_float(logits: torch.Tensor) -> torch.Tensor:
    """Gate logits in the routing precision: float32 at least (bf16/fp16 -> float32), float64 stays float64.

    ``.float()`` would also *down*-cast float64 activations, so a float64 model (the oracle tests) computed
    its gates in float32: outputs were off by ~1e-7 from a float64 loop oracle.
    """
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of expert outputs: ``(B, E)`` x ``(B, E, H)`` -> ``(B, H)``.

    Broadcast multiply and sum, not ``einsum``/``bmm``: with E ~ 4-16 the batched (1, E) x (E, H) products are
    B tiny GEMMs; measured [M] forward+backward at B=2048, E=4, H=64 on 2 threads: 0.41 ms vs 2.0 ms (einsum).
    """
    return (weights.to(experts.dtype).unsqueeze(-1) * experts).sum(1)


class SoftmaxGate(nn.Module):
    """Linear + softmax gate over E candidates, optionally masked (the MMoE/PLE gate, and HoME's masked gate).

    A masked candidate gets logit −inf, hence weight exactly 0 and no gradient (equal to a softmax over the
    restricted candidate list).

    Args:
        dim: gate input width.
        num_experts: E candidates.
        mask: optional ``(E,)`` bool, True where the candidate is allowed.
    """

    def __init__(self, *, dim: int, num_experts: int, mask: Sequence[bool] | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, num_experts)
        if mask is not None:
            m = torch.as_tensor(list(mask), dtype=torch.bool)
            if m.shape != (num_experts,) or not m.any():
                raise ValueError(
                    f"gate mask must be ({num_experts},) with at least one True, got {m.tolist()}"
                )
            self.register_buffer("mask", m, persistent=False)
        else:
            self.mask = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, dim) -> (B, E)`` gate weights summing to 1 per row (float32; float64 for float64 ``x``)."""
        logits = routing_float(self.proj(x))  # (B, E)
        if self.mask is not None:
            logits = logits.masked_fill(~self.mask, float("-inf"))
        return logits.softmax(dim=-1)


# ---------------------------------------------------------------------------------------------- MMoE
class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts [paper]: ``y_k = h_k(Σ_i softmax(W_gk v)_i f_i(v))``.

    Gates are one linear layer + softmax on the input [paper]; experts identical MLPs (ReLU by default).
    With ``num_experts=1`` this is Shared-Bottom.

    Args:
        dim: D, input width.
        num_tasks: M.
        num_experts: E.
        expert_hidden: expert layer widths; the last is H.
        norm, activation, dropout: passed to :class:`DenseMLPExperts`.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_tasks: int,
        num_experts: int,
        expert_hidden: Sequence[int],
        norm: Norm = "none",
        activation: Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 1 or num_tasks < 1:
            raise ValueError(f"num_experts and num_tasks must be >= 1, got {num_experts}, {num_tasks}")
        self.num_tasks = num_tasks
        self.experts = DenseMLPExperts(
            num_experts=num_experts, dim=dim, hidden_dims=expert_hidden, norm=norm, activation=activation,
            dropout=dropout,
        )  # fmt: skip
        self.gates = nn.ModuleList(SoftmaxGate(dim=dim, num_experts=num_experts) for _ in range(num_tasks))
        self.out_dim = self.experts.out_dim

    def forward(self, v: torch.Tensor) -> MultiGateOutput:
        """``v (B, D)`` -> task outputs ``(B, M, H)``."""
        ex = self.experts(v)  # (B, E, H)
        gates = {f"task{k}": g(v) for k, g in enumerate(self.gates)}
        outs = torch.stack([mix(gates[f"task{k}"], ex) for k in range(self.num_tasks)], dim=1)  # (B, M, H)
        return MultiGateOutput(outs, gates, {"experts": ex})


class SharedBottom(nn.Module):
    """Shared-Bottom: one shared MLP ``h = f(v)``; every task tower reads ``h`` (MMoE §3 baseline)."""

    def __init__(
        self,
        *,
        dim: int,
        num_tasks: int,
        expert_hidden: Sequence[int],
        norm: Norm = "none",
        activation: Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.bottom = DenseMLPExperts(
            num_experts=1,
            dim=dim,
            hidden_dims=expert_hidden,
            norm=norm,
            activation=activation,
            dropout=dropout,
        )
        self.out_dim = self.bottom.out_dim

    def forward(self, v: torch.Tensor) -> MultiGateOutput:
        h = self.bottom(v)  # (B, 1, H)
        return MultiGateOutput(h.expand(-1, self.num_tasks, -1), {}, {"bottom": h})


# ---------------------------------------------------------------------------------------------- CGC / PLE
class CGCLevel(nn.Module):
    """One Customized Gate Control level [paper: PLE §4.2-4.3].

    Task k's gate reads task k's stream and mixes ``[task-k experts ; shared experts]``; the shared gate
    (every level but the last [paper]) reads the shared stream and mixes all experts. Task-k experts read
    task k's stream, shared experts the shared stream. The shared-expert count is independent of the
    task-specific count (the DeepCTR-Torch bug builds shared experts with the specific count).

    Args:
        dim: input width of every stream.
        num_tasks: M.
        num_shared: shared experts (>= 1).
        num_specific: experts per task (>= 0; 0 makes a task gate an MMoE gate over the shared experts).
        expert_hidden: expert widths; the last is H.
        shared_gate: build the shared gate (False on the last level).
        norm, activation, dropout: expert options.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_tasks: int,
        num_shared: int,
        num_specific: int,
        expert_hidden: Sequence[int],
        shared_gate: bool,
        norm: Norm = "none",
        activation: Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_shared < 1 or num_specific < 0:
            raise ValueError(f"need num_shared >= 1 and num_specific >= 0, got {num_shared}, {num_specific}")
        self.num_tasks, self.num_shared, self.num_specific = num_tasks, num_shared, num_specific
        kw = dict(dim=dim, hidden_dims=expert_hidden, norm=norm, activation=activation, dropout=dropout)
        self.shared = DenseMLPExperts(num_experts=num_shared, **kw)
        self.specific = DenseMLPExperts(num_experts=num_tasks * num_specific, **kw) if num_specific else None
        self.task_gates = nn.ModuleList(
            SoftmaxGate(dim=dim, num_experts=num_specific + num_shared) for _ in range(num_tasks)
        )
        self.shared_gate = (
            SoftmaxGate(dim=dim, num_experts=num_tasks * num_specific + num_shared) if shared_gate else None
        )
        self.out_dim = self.shared.out_dim

    def forward(self, streams: torch.Tensor, *, same_input: bool = False) -> tuple[torch.Tensor, dict, dict]:
        """Run the level.

        Args:
            streams: ``(B, M+1, D)`` task streams then the shared stream, or ``(B, D)``: one input that every
                stream equals (the first level).
            same_input: the ``(B, M+1, D)`` streams are all equal: all experts read the shared stream.

        Returns:
            ``(B, M+1, H)`` (``(B, M, H)`` on the last level), the gate weights and the expert outputs.
        """
        m, s = self.num_tasks, self.num_specific
        if streams.dim() == 2:
            parts, same_input = [streams] * (m + 1), True  # (B, D) each, no copy
        else:
            # unbind once: its backward is one stack, whereas every ``streams[:, k]`` would zero-fill a
            # full-size gradient buffer in backward (measured: 5 such fills were ~12 % of a PLE step)
            parts = list(streams.unbind(1))  # M+1 x (B, D)
        b = parts[0].shape[0]
        ex_sh = self.shared(parts[m])  # (B, S_sh, H)
        experts = {"shared": ex_sh}
        if self.specific is not None:
            if same_input:
                ex_sp = self.specific(parts[m])  # (B, M*S, H)
            else:
                per_expert_in = torch.stack([parts[k] for k in range(m) for _ in range(s)], 1)  # (B, M*S, D)
                ex_sp = self.specific(per_expert_in)  # (B, M*S, H)
            experts["specific"] = ex_sp
            ex_sp = ex_sp.view(b, m, s, -1)  # (B, M, S, H)
        gates, outs = {}, []
        for k, g in enumerate(self.task_gates):
            cand = (
                ex_sh if self.specific is None else torch.cat([ex_sp[:, k], ex_sh], dim=1)
            )  # (B, S+S_sh, H)
            gates[f"task{k}"] = g(parts[k])
            outs.append(mix(gates[f"task{k}"], cand))
        if self.shared_gate is not None:
            all_ex = ex_sh if self.specific is None else torch.cat([experts["specific"], ex_sh], dim=1)
            gates["shared"] = self.shared_gate(parts[m])
            outs.append(mix(gates["shared"], all_ex))
        return torch.stack(outs, dim=1), gates, experts


class PLE(nn.Module):
    """Progressive Layered Extraction: stacked CGC levels [paper]. Level j's task gate reads task k's level
    j−1 output; the last level has no shared gate.

    Args:
        dim: D.
        num_tasks: M.
        num_levels: CGC levels (1 = CGC).
        num_shared: shared experts per level.
        num_specific: task-specific experts per task per level.
        expert_hidden: expert widths; the last is H (input width of the next level).
        norm, activation, dropout: expert options.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_tasks: int,
        num_levels: int = 2,
        num_shared: int = 2,
        num_specific: int = 2,
        expert_hidden: Sequence[int] = (64,),
        norm: Norm = "none",
        activation: Activation = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.num_tasks = num_tasks
        levels, d = [], dim
        for j in range(num_levels):
            levels.append(
                CGCLevel(
                    dim=d,
                    num_tasks=num_tasks,
                    num_shared=num_shared,
                    num_specific=num_specific,
                    expert_hidden=expert_hidden,
                    shared_gate=j < num_levels - 1,
                    norm=norm,
                    activation=activation,
                    dropout=dropout,
                )  # fmt: skip
            )
            d = levels[-1].out_dim
        self.levels = nn.ModuleList(levels)
        self.out_dim = d

    def forward(self, v: torch.Tensor) -> MultiGateOutput:
        streams = v  # (B, D): the first level's streams are all v
        gates_all, experts_all = {}, {}
        for j, level in enumerate(self.levels):
            streams, gates, experts = level(streams)  # (B, M+1, H)
            gates_all.update({(k if j == len(self.levels) - 1 else f"l{j}/{k}"): g for k, g in gates.items()})
            experts_all.update({f"l{j}/{k}": e for k, e in experts.items()})
        return MultiGateOutput(streams, gates_all, experts_all)  # streams: (B, M, H)


# ---------------------------------------------------------------------------------------------- HoME
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
    equation is moekit's reading (``spec/recsys.md`` §1.3, tags [R]). ``moe_core.reference.home_reference``
    implements the same readings one row and one expert at a time, and the tests hold this module to it
    (float64, 1e-10, forward and gradients). Notation: ``c(t)`` the category of task t, ``⊕`` concatenation.

    * Expert normalisation + Swish (``expert_norm``, ``activation``): ``E(x) = Swish(BN(x W + b))``. Reading:
      BN sits between the linear map and the activation, and on *every* layer of a multi-layer expert (the
      paper's ``Swish(BN(MLP_E(x)))`` does not say what the hidden layers use). BN normalises each expert
      unit with the batch mean and biased batch variance in training mode and with the running statistics
      in eval mode (``torch.nn.BatchNorm1d``); ``"ln"`` is a LayerNorm over one expert's units whose affine
      parameters are shared by the experts of a bank.
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
      ``softmax(Linear(z_c(t)))`` for several (``levels=1``: ``Linear(v)``).

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
        hierarchy_mask: restrict gates to their branch.
        feature_gate_rank: rank l of the feature gates, or None for no feature gate.
        self_gate: add the task-expert gated residual.
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
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        cats = [list(map(int, c)) for c in categories]
        tasks = sorted(t for c in cats for t in c)
        if not cats or any(not c for c in cats) or tasks != list(range(len(tasks))):
            raise ValueError(f"categories must partition the tasks 0..M-1 into non-empty groups, got {cats}")
        if levels not in (1, 2):
            raise ValueError(f"levels must be 1 or 2, got {levels}")
        _check_choice("expert_norm", expert_norm, ("none", "bn", "ln"))
        _check_choice("activation", activation, ("relu", "silu"))
        if self_gate and num_per_task < 1:
            raise ValueError("self_gate needs num_per_task >= 1 (it gates the task-specific experts)")
        self.categories, self.levels = cats, levels
        self.num_tasks, self.num_cats = len(tasks), len(cats)
        self.cat_of = {t: c for c, ts in enumerate(cats) for t in ts}
        self.num_shared, self.num_per_category, self.num_per_task = num_shared, num_per_category, num_per_task
        self.hierarchy_mask, self.self_gate = hierarchy_mask, self_gate
        kw = dict(hidden_dims=expert_hidden, norm=expert_norm, activation=activation, dropout=dropout)
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
            SoftmaxGate(
                dim=gate_in, num_experts=n_task_level, mask=self._task_mask(t) if hierarchy_mask else None
            )
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
        m = self.num_tasks
        gates: dict[str, torch.Tensor] = {}
        experts: dict[str, torch.Tensor] = {}
        if self.levels == 2:
            gated = self.meta_feature_gate is not None
            x_meta = self.meta_feature_gate(v) if gated else v  # (B, E_meta, D) or (B, D)
            ex_meta = self.meta_experts(x_meta)  # (B, E_meta, H)
            experts["meta"] = ex_meta
            # per-category outputs stay a list: indexing a stacked tensor (``z[:, c]``) would zero-fill a
            # full-size gradient buffer in backward for every read (see CGCLevel.forward)
            z_cat = []  # C x (B, H)
            for ci, g in enumerate(self.meta_cat_gates):
                gates[f"meta_cat{ci}"] = g(v)
                z_cat.append(mix(gates[f"meta_cat{ci}"], ex_meta))
            gates["meta_shared"] = self.meta_shared_gate(v)
            z_sh = mix(gates["meta_shared"], ex_meta)  # (B, H)
            ex_sh = self.shared_experts(z_sh)  # (B, S, H)
            p, q = self.num_per_category, self.num_per_task
            cat_in = torch.stack(z_cat, dim=1).repeat_interleave(p, dim=1)  # (B, C*P, H) category c: z_c
            ex_cat = self.cat_experts(cat_in)  # (B, C*P, H)
            task_cat = [z_cat[self.cat_of[t]] for t in range(m)]  # M x (B, H): task t's category output
            task_in = torch.stack(task_cat, dim=1).repeat_interleave(q, dim=1)  # (B, M*Q, H)
            ex_task = self.task_experts(task_in)  # (B, M*Q, H) task t's experts read z_c
            gate_in = [torch.cat([task_cat[t], z_sh], dim=-1) for t in range(m)]  # (B, 2H) each
            self_in = task_cat
        else:
            n_sh = self.num_shared
            n_cat = self.num_cats * self.num_per_category
            if self.feature_gate is not None:
                xg = self.feature_gate(v)  # (B, E_task_level, D)
                x_sh, x_cat, x_task = xg[:, :n_sh], xg[:, n_sh : n_sh + n_cat], xg[:, n_sh + n_cat :]
            else:
                x_sh = x_cat = x_task = v
            ex_sh = self.shared_experts(x_sh)
            ex_cat = self.cat_experts(x_cat)  # (B, C*P, H)
            ex_task = self.task_experts(x_task)  # (B, M*Q, H)
            gate_in = [v] * m
            self_in = [v] * m
        experts.update({"shared": ex_sh, "category": ex_cat, "task": ex_task})
        cand = torch.cat([ex_sh, ex_cat, ex_task], dim=1)  # (B, E_task_level, H)
        q = self.num_per_task
        if self.self_gate:  # q >= 1 (checked in __init__)
            own_all = ex_task.view(ex_task.shape[0], m, q, -1).unbind(1)  # M x (B, Q, H): task t's experts
        outs = []
        for t, g in enumerate(self.task_gates):
            w = g(gate_in[t])  # (B, E_task_level)
            gates[f"task{t}"] = w
            h_t = mix(w, cand)  # (B, H)
            if self.self_gate:
                own = own_all[t]  # (B, Q, H)
                logits = routing_float(self.self_gates[t](self_in[t]))  # (B, Q)
                sw = torch.sigmoid(logits) if q == 1 else logits.softmax(dim=-1)
                gates[f"self{t}"] = sw
                h_t = h_t + mix(sw, own)
            outs.append(h_t)
        return MultiGateOutput(torch.stack(outs, dim=1), gates, experts)  # (B, M, H)
