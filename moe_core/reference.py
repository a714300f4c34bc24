"""Slow, obviously correct oracles for the MoE dispatch (tests only). Semantics: Mixtral, arXiv 2401.04088.

Nothing here is fast; each function loops in Python over tokens and slots so that it can be read line by line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ExpertFn = Callable[[int, torch.Tensor], torch.Tensor]


def reference_moe(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    expert_fn: ExpertFn,
) -> torch.Tensor:
    """``out[t] = sum_k [mask[t, k]] * weights[t, k] * expert_fn(indices[t, k], x[t])``, one slot at a time.

    Args:
        x: ``(N, D)`` tokens.
        indices: ``(N, K)`` expert ids.
        weights: ``(N, K)`` combine weights (multiply the expert output).
        mask: optional ``(N, K)`` bool; False slots contribute nothing.
        expert_fn: ``(e, x_row (1, D)) -> (1, D)`` output of expert ``e``.

    Returns:
        ``(N, D)``.
    """
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t : t + 1])  # (1, D)
        for k in range(indices.shape[1]):
            if mask is not None and not bool(mask[t, k]):
                continue
            acc = acc + weights[t, k].to(x.dtype) * expert_fn(int(indices[t, k]), x[t : t + 1])
        rows.append(acc)
    return torch.cat(rows) if rows else x.new_zeros(0, x.shape[1])


def dense_mixture(x: torch.Tensor, probs: torch.Tensor, expert_fn: ExpertFn) -> torch.Tensor:
    """Soft mixture over all E experts: ``out[t] = sum_e probs[t, e] * expert_fn(e, x[t])``.

    Args:
        x: ``(N, D)``.
        probs: ``(N, E)`` mixture weights.
        expert_fn: as in :func:`reference_moe`.

    Returns:
        ``(N, D)``.
    """
    out = torch.zeros_like(x)  # (N, D)
    for e in range(probs.shape[1]):
        out = out + probs[:, e : e + 1].to(x.dtype) * expert_fn(e, x)
    return out


def swiglu_expert_fn(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ExpertFn:
    """Expert function of stacked SwiGLU weights ``gate/up (E, D, H)``, ``down (E, H, D)``."""
    act = act or torch.nn.functional.silu
    return lambda e, xr: (act(xr @ gate[e]) * (xr @ up[e])) @ down[e]


def fused_swiglu_expert_fn(
    gate_up: torch.Tensor, down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> ExpertFn:
    """:func:`swiglu_expert_fn` of a bank's parameters as stored: ``gate_up (E, D, 2H)`` (gate columns first),
    ``down (E, H, D)``; gradients reach ``gate_up`` through its two halves."""
    gate, up = gate_up.chunk(2, dim=-1)  # (E, D, H) views
    return swiglu_expert_fn(gate, up, down, act)


def mlp_expert_fn(
    up: torch.Tensor, down: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
) -> ExpertFn:
    """Expert function of stacked plain MLP weights ``up (E, D, H)``, ``down (E, H, D)``."""
    return lambda e, xr: act(xr @ up[e]) @ down[e]


# ---------------------------------------------------------------------------------------------- HoME
# HoME (Wang et al., arXiv 2408.05430): one row and one expert at a time, from the equations as moekit reads
# them. Only the module's parameters (and BatchNorm buffers) are read; the candidate lists, the gate inputs,
# the hierarchy mask and every nonlinearity are rebuilt here from the equations.


def _swish(x: torch.Tensor) -> torch.Tensor:
    """``Swish(x) = x · σ(x)`` (β = 1)."""
    return x / (1 + torch.exp(-x))


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return _swish(x)
    if name == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    raise ValueError(f"unknown activation {name!r}")


def _softmax(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """Softmax over a Python list of scalar logits (the candidate list)."""
    top = torch.stack(logits).max().detach()  # for stability only: softmax is shift-invariant
    exps = [torch.exp(z - top) for z in logits]
    total = sum(exps)
    return [e / total for e in exps]


def _linear_row(linear: torch.nn.Linear, k: int, x: torch.Tensor) -> torch.Tensor:
    """Output unit ``k`` of ``linear`` on one row ``x (D,)``: ``Σ_d W[k, d] x[d] + b[k]``."""
    return (linear.weight[k] * x).sum() + linear.bias[k]


def _bank_expert(bank: torch.nn.Module, e: int, rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Expert ``e`` of a ``DenseMLPExperts`` bank on every row: ``act(norm(x W_e + b_e))`` per layer.

    Expert normalisation (HoME, our reading [R]): BatchNorm of each expert unit between the
    linear map and the activation, on every layer. In training mode the statistics are the batch mean and
    the biased batch variance of that unit over ``rows`` (what BatchNorm normalises with); in eval mode the
    running statistics. ``"ln"``: LayerNorm over one expert's units of one row.
    """
    hs = rows
    for i, (w, b) in enumerate(zip(bank.weights, bank.biases)):
        pre = [(h[:, None] * w[e]).sum(0) + b[e] for h in hs]  # per row (H_i,)
        if bank.norm == "bn":
            bn = bank.norms[i]
            width = pre[0].shape[0]
            unit = slice(e * width, (e + 1) * width)  # this expert's units in the (E*H_i) BatchNorm
            if bn.training or bn.running_mean is None:
                mean = sum(pre) / len(pre)
                var = sum((p - mean) ** 2 for p in pre) / len(pre)
            else:
                mean, var = bn.running_mean[unit], bn.running_var[unit]
            pre = [(p - mean) / torch.sqrt(var + bn.eps) * bn.weight[unit] + bn.bias[unit] for p in pre]
        elif bank.norm == "ln":
            ln = bank.norms[i]
            out = []
            for p in pre:
                mu = p.mean()
                var = ((p - mu) ** 2).mean()
                out.append((p - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias)
            pre = out
        hs = [_act(bank.activation, p) for p in pre]
    return hs


def _feature_gated(fg: torch.nn.Module, e: int, row: torch.Tensor) -> torch.Tensor:
    """HoME feature-gate of expert ``e`` on one row: ``v ⊙ 2σ(v B_e A_e)``, ``B_e (D, l)``, ``A_e (l, D)``."""
    low = (row[:, None] * fg.B[e]).sum(0)  # (l,)
    logits = (low[:, None] * fg.A[e]).sum(0)  # (D,)
    return row * 2 / (1 + torch.exp(-logits))


def _gate_mix(
    gate: torch.nn.Module, x: torch.Tensor, candidates: list[int], outputs: list[list[torch.Tensor]], b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_{k ∈ candidates} softmax_k(Linear(x)) · E_k`` for row ``b``; also the full-length gate row."""
    probs = dict(zip(candidates, _softmax([_linear_row(gate.proj, k, x) for k in candidates])))
    mixed = sum(probs[k] * outputs[k][b] for k in candidates)
    zero = torch.zeros((), dtype=x.dtype)
    return mixed, torch.stack([probs.get(k, zero) for k in range(gate.proj.out_features)])


def home_reference(home: torch.nn.Module, v: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HoME forward, one row and one expert at a time, with the weights of a ``moe_core.multigate.HoME``.

    The equations (``c(t)`` = category of task t; ``⊕`` concatenation; every sum over a softmax runs over the
    gate's candidate list, which the hierarchy mask restricts; without the mask every gate of a level sees
    every expert of that level):

    * Expert: ``E(x) = Swish(BN(x W + b))`` per layer (``expert_norm``/``activation`` switch BN/LN/none and
      Swish/ReLU).
    * Feature-gate (``feature_gate_rank``): an expert that reads ``v`` reads ``v ⊙ 2σ(v B_e A_e)`` instead.
    * Meta level (``levels=2``), experts read ``v``:
      ``z_c = Σ softmax(G_c(v)) · [E^meta_shared(v), E^meta_c(v)]`` per category,
      ``z_sh = Σ softmax(G_sh(v)) · [E^meta_shared(v), E^meta_c(v) ∀c]``.
    * Task level: shared experts read ``z_sh``, category-c experts and the experts of every task of c read
      ``z_c``; ``h_t = Σ softmax(G_t(z_c(t) ⊕ z_sh)) · [E_shared, E_c(t), E_t]``.
      With ``levels=1`` every expert and every gate reads ``v``.
    * Self-gate (``self_gate``): ``h_t += Σ_j w_j · E_{t,j}`` with ``w = σ(Linear(z_c(t)))`` for one task
      expert, ``softmax(Linear(z_c(t)))`` for several (``levels=1``: ``Linear(v)``).

    BatchNorm uses batch statistics over ``v``'s rows when the module is in training mode, running statistics
    in eval mode (see :func:`_bank_expert`). Dropout must be off (``dropout=0`` or eval mode).

    Args:
        home: the module whose parameters are read (nothing in it is called).
        v: ``(B, D)`` input.

    Returns:
        ``(B, M, H)`` task outputs and gate rows ``{"task{t}", "self{t}", "meta_cat{c}", "meta_shared"}``,
        each ``(B, E_candidates)`` (0 outside the candidate list).
    """
    if home.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in home.modules()):
        raise ValueError("home_reference has no dropout: use dropout=0 or eval mode")
    cats, m = home.categories, home.num_tasks
    cat_of = {t: c for c, ts in enumerate(cats) for t in ts}
    s, p, q = home.num_shared, home.num_per_category, home.num_per_task
    n_rows = v.shape[0]
    rows = [v[b] for b in range(n_rows)]
    gates: dict[str, list[torch.Tensor]] = {}

    def bank_outputs(bank, fg, first: int, inputs: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        # expert e of ``bank`` reads ``inputs[e]`` (one tensor per row), feature-gated when ``fg`` is given
        outs = []
        for e in range(bank.num_experts):
            xs = inputs[e]
            if fg is not None:
                xs = [_feature_gated(fg, first + e, x) for x in xs]
            outs.append(_bank_expert(bank, e, xs))
        return outs

    if home.levels == 2:
        sm, pm = home.meta_num_shared, home.meta_num_per_category
        meta = bank_outputs(
            home.meta_experts, home.meta_feature_gate, 0, [rows] * home.meta_experts.num_experts
        )
        meta_shared = list(range(sm))
        meta_cat = [[sm + c * pm + j for j in range(pm)] for c in range(len(cats))]
        every_meta = list(range(sm + len(cats) * pm))
        z_cat = [[] for _ in cats]  # z_cat[c][b]: (H,)
        z_sh = []
        for c in range(len(cats)):
            cand = meta_shared + meta_cat[c] if home.hierarchy_mask else every_meta
            for b in range(n_rows):
                z, g = _gate_mix(home.meta_cat_gates[c], rows[b], cand, meta, b)
                z_cat[c].append(z)
                gates.setdefault(f"meta_cat{c}", []).append(g)
        for b in range(n_rows):
            z, g = _gate_mix(home.meta_shared_gate, rows[b], every_meta, meta, b)
            z_sh.append(z)
            gates.setdefault("meta_shared", []).append(g)
        # category experts are stored category-major and task experts task-major
        shared_in, cat_in, task_in = (
            [z_sh] * s,
            [z_cat[e // p] for e in range(len(cats) * p)],
            [z_cat[cat_of[e // q]] for e in range(m * q)],
        )
        gate_in = [[torch.cat([z_cat[cat_of[t]][b], z_sh[b]]) for b in range(n_rows)] for t in range(m)]
        self_in = [z_cat[cat_of[t]] for t in range(m)]
        fg = None
    else:
        shared_in, cat_in, task_in = [rows] * s, [rows] * (len(cats) * p), [rows] * (m * q)
        gate_in = [rows] * m
        self_in = [rows] * m
        fg = home.feature_gate

    n_cat = len(cats) * p
    ex = (
        bank_outputs(home.shared_experts, fg, 0, shared_in)
        + bank_outputs(home.cat_experts, fg, s, cat_in)
        + bank_outputs(home.task_experts, fg, s + n_cat, task_in)
    )  # task-level candidate list: shared, categories (category-major), tasks (task-major)
    every = list(range(len(ex)))
    outs = []  # per task, per row (H,)
    for t in range(m):
        c = cat_of[t]
        own = [s + n_cat + t * q + j for j in range(q)]
        cand = list(range(s)) + [s + c * p + j for j in range(p)] + own if home.hierarchy_mask else every
        outs.append([])
        for b in range(n_rows):
            h, g = _gate_mix(home.task_gates[t], gate_in[t][b], cand, ex, b)
            gates.setdefault(f"task{t}", []).append(g)
            if home.self_gate:
                logits = [_linear_row(home.self_gates[t], j, self_in[t][b]) for j in range(q)]
                w = [1 / (1 + torch.exp(-logits[0]))] if q == 1 else _softmax(logits)
                for j, k in enumerate(own):
                    h = h + w[j] * ex[k][b]
                gates.setdefault(f"self{t}", []).append(torch.stack(w))
            outs[t].append(h)
    task_outputs = torch.stack([torch.stack(o) for o in outs], dim=1)  # (B, M, H)
    return task_outputs, {name: torch.stack(g) for name, g in gates.items()}


def loop_mmoe(m: torch.nn.Module, v: torch.Tensor) -> torch.Tensor:
    """MMoE's per-task loop forward (before the stacked gates): each task gate called alone and each task
    mixed alone. ``m``: a :class:`moe_core.multigate.MMoE`; ``v (B, D)`` -> ``(B, M, H)``."""
    from moe_core.multigate.gates import mix

    ex = m.experts(v)  # (B, E, H)
    return torch.stack([mix(g(v), ex) for g in m.gates], dim=1)


def loop_cgc(level: torch.nn.Module, streams: torch.Tensor) -> torch.Tensor:
    """A CGC level's per-task loop forward: task k's gate reads stream k and mixes [task-k experts ; shared].
    ``level``: a :class:`moe_core.multigate.CGCLevel`; ``streams (B, D)`` (one input for every gate) or
    ``(B, M+1, D)`` (one stream per task + the shared one) -> ``(B, M(+1), H)``."""
    from moe_core.multigate.gates import mix

    m, s = level.num_tasks, level.num_specific
    same = streams.dim() == 2
    parts = [streams] * (m + 1) if same else list(streams.unbind(1))
    ex_sh = level.shared(parts[m])
    if s:
        ex_sp = level.specific(
            parts[m] if same else torch.stack([parts[k] for k in range(m) for _ in range(s)], 1)
        )
    outs = []
    for k, g in enumerate(level.task_gates):
        cand = torch.cat([ex_sp[:, k * s : (k + 1) * s], ex_sh], 1) if s else ex_sh
        outs.append(mix(g(parts[k]), cand))
    if level.shared_gate is not None:
        outs.append(mix(level.shared_gate(parts[m]), torch.cat([ex_sp, ex_sh], 1) if s else ex_sh))
    return torch.stack(outs, 1)


def loop_ple(ple: torch.nn.Module, v: torch.Tensor) -> torch.Tensor:
    """PLE's per-task loop forward: :func:`loop_cgc` level by level. ``v (B, D)`` -> ``(B, M, H)``."""
    x = v
    for level in ple.levels:
        x = loop_cgc(level, x)
    return x
