"""CGC and PLE: Customized Gate Control levels, stacked into Progressive Layered Extraction (Tang et al.,
RecSys 2020, DOI 10.1145/3383313.3412236)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moe_core.multigate.experts import Activation, DenseMLPExperts, Norm, check_input
from moe_core.multigate.gates import MultiGateOutput, SoftmaxGate, mix, mix_tasks, stacked_gates

__all__ = ["PLE", "CGCLevel"]


class CGCLevel(nn.Module):
    """One Customized Gate Control level [P: PLE §4.2-4.3].

    Task k's gate reads task k's stream and mixes ``[task-k experts ; shared experts]``; the shared gate
    (every level but the last [P]) reads the shared stream and mixes all experts. Task-k experts read
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
            x_sh, x_task, same_input = streams, None, True  # (B, D): every stream is this one
        else:
            # split (its backward is one cat), not ``streams[:, k]`` reads: each of those would zero-fill a
            # full-size gradient buffer in backward (measured: 5 such fills were ~12 % of a PLE step)
            x_task, x_sh = streams.split([m, 1], dim=1)  # (B, M, D), (B, 1, D)
            x_sh = x_sh.squeeze(1)  # (B, D)
        b = x_sh.shape[0]
        ex_sh = self.shared(x_sh)  # (B, S_sh, H)
        experts = {"shared": ex_sh}
        # every task gate at once: gate k reads task k's stream (on the first level all streams are x_sh)
        gate_in = x_sh if x_task is None else x_task.transpose(0, 1)  # (B, D) or (M, B, D)
        w = stacked_gates(self.task_gates, gate_in)  # (B, M, S+S_sh): [task-k experts ; shared experts]
        outs = mix_tasks(w[:, :, s:], ex_sh)  # (B, M, H) the shared experts' part of every task
        if self.specific is not None:
            if same_input or x_task is None:  # all experts read the shared stream
                ex_sp = self.specific(x_sh)  # (B, M*S, H)
            else:
                per_expert_in = x_task.repeat_interleave(s, dim=1) if s > 1 else x_task  # (B, M*S, D)
                ex_sp = self.specific(per_expert_in)  # (B, M*S, H)
            experts["specific"] = ex_sp
            w_sp = w[:, :, :s].to(ex_sp.dtype).unsqueeze(-1)  # (B, M, S, 1)
            outs = outs + (w_sp * ex_sp.view(b, m, s, -1)).sum(2)  # (B, M, H) + task k's own experts
        gates = {f"task{k}": g for k, g in enumerate(w.unbind(1))}
        if self.shared_gate is not None:
            all_ex = ex_sh if self.specific is None else torch.cat([experts["specific"], ex_sh], dim=1)
            gates["shared"] = self.shared_gate(x_sh)
            outs = torch.cat([outs, mix(gates["shared"], all_ex).unsqueeze(1)], dim=1)  # (B, M+1, H)
        return outs, gates, experts


class PLE(nn.Module):
    """Progressive Layered Extraction: stacked CGC levels [P]. Level j's task gate reads task k's level
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
        self.dim = dim
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
        check_input(v, self.dim, "PLE")
        streams = v  # (B, D): the first level's streams are all v
        gates_all, experts_all = {}, {}
        for j, level in enumerate(self.levels):
            streams, gates, experts = level(streams)  # (B, M+1, H)
            gates_all.update({(k if j == len(self.levels) - 1 else f"l{j}/{k}"): g for k, g in gates.items()})
            experts_all.update({f"l{j}/{k}": e for k, e in experts.items()})
        return MultiGateOutput(streams, gates_all, experts_all)  # streams: (B, M, H)
