"""Bit-nested (matryoshka) expert quantization after D^2MoE (arXiv 2504.15299).

From the paper [P: abstract]: one stored INT8 code per weight serves several bit widths (the b-bit model is
the b most significant bits), each expert gets a bit width from its importance, and a hottest-expert-bit-
first (HEBF) loading order fits a memory budget. No public code exists: the layout below is the project's
reading [D]::

    q = clamp(round(W / s), -128, 127);  u = q + 128 in [0, 255]           (per-group symmetric scale s)
    u_b = u >> (8 - b);  W_b = s * ((u_b << (8 - b)) + 2^(7 - b) - 128)   (b < 8, bucket midpoint)
    W_8 = s * q

Per-expert bit widths come from usage frequencies with a greedy budget planner [D].

Dual routing [P: the paper's title and abstract name it; the rule is our reading, D]: besides the router's
expert choice, each (token, expert) pair gets its own bit width from its combine weight:
``bits = candidates[#{thresholds <= weight}]`` (:func:`bits_from_weights`), capped by the planes of that
expert that are loaded; :class:`DualRoutedQuantExperts` computes each pair at its width from the one nested
code. HEBF [P: abstract]: :func:`hebf_load_order` orders bit-planes coarse-first, hottest expert first within
a plane; :func:`simulate_loading` replays an order through a one-queue I/O + one-queue compute pipeline and
reports the compute stall (the "bubbles" HEBF minimises) and the peak resident bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moe_core.blocks import RemappedExperts, bank_activation, find_moe_blocks, get_expert_weights, unwrap_bank
from moe_core.surgery.bank import ComputedWeightExperts

ExpertWeightsT = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class NestedInt8:
    """A bit-nested INT8 code of one tensor.

    Attributes:
        codes: uint8 ``u = q + 128``, shape ``(..., G, group_size)``.
        scale: float32 ``(..., G, 1)`` per-group scales.
        shape: original tensor shape.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size

    def prefix(self, bits: int) -> torch.Tensor:
        """``u_b = u >> (8 - b)``: the b most significant bits (uint8)."""
        _check_bits(bits)
        return self.codes >> (8 - bits)

    def dequantize(self, bits: int = 8) -> torch.Tensor:
        """Reconstruct the tensor from its top ``bits`` bit-planes (float32)."""
        _check_bits(bits)
        if bits == 8:
            q = self.codes.float() - 128
        else:
            q = (self.prefix(bits).float() * 2 ** (8 - bits)) + 2 ** (7 - bits) - 128
        return (q * self.scale).reshape(self.shape)

    def nbytes(self, bits: int = 8) -> int:
        """Storage of the top ``bits`` planes plus float32 scales."""
        return (self.codes.numel() * bits + 7) // 8 + 4 * self.scale.numel()


def _check_bits(bits: int) -> None:
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")


def quantize_nested(w: torch.Tensor, *, group_size: int | None = None) -> NestedInt8:
    """Symmetric INT8 quantisation with per-group scales along the last dimension.

    Args:
        w: any float tensor ``(..., n)``.
        group_size: elements per scale along the last dim (default: the whole last dim). Must divide n.
    """
    n = w.shape[-1]
    gs = group_size or n
    if n % gs:
        raise ValueError(f"group_size={gs} must divide the last dimension {n}")
    wg = w.detach().float().reshape(*w.shape[:-1], n // gs, gs)  # (..., G, gs)
    scale = wg.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127  # (..., G, 1)
    q = torch.clamp(torch.round(wg / scale), -128, 127)
    return NestedInt8(codes=(q + 128).to(torch.uint8), scale=scale, shape=w.shape)


def plain_int8(w: torch.Tensor, *, group_size: int | None = None) -> torch.Tensor:
    """Reference plain symmetric INT8 fake-quantisation (independent of the nested code path)."""
    n = w.shape[-1]
    gs = group_size or n
    wg = w.float().reshape(*w.shape[:-1], n // gs, gs)
    s = wg.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return (torch.clamp(torch.round(wg / s), -128, 127) * s).reshape(w.shape)


class NestedQuantExperts(ComputedWeightExperts):
    """Expert bank stored as nested INT8 codes; each expert is dequantised at its own bit width.

    Args:
        gate, up: ``(E, D, H)``; down: ``(E, H, D)`` float weights to quantise.
        bits: one width for all experts or ``(E,)`` widths.
        group_size: scale group along each matrix's last dimension.
    """

    def __init__(
        self,
        *,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        bits: int | torch.Tensor = 8,
        group_size: int | None = None,
        act=None,
    ) -> None:
        super().__init__(**({"act": act} if act is not None else {}))
        self.num_experts = gate.shape[0]
        self.dtype = gate.dtype
        codes = {
            n: quantize_nested(w, group_size=group_size)
            for n, w in (("gate", gate), ("up", up), ("down", down))
        }
        self.shapes = {n: c.shape for n, c in codes.items()}
        for n, c in codes.items():  # buffers so .to() moves them; codes stay uint8
            self.register_buffer(f"{n}_codes", c.codes)
            self.register_buffer(f"{n}_scale", c.scale)
        self.register_buffer("bits", torch.zeros(self.num_experts, dtype=torch.long))
        self.set_bits(bits)

    def set_bits(self, bits: int | torch.Tensor) -> None:
        """Set one width or ``(E,)`` per-expert widths (each in [1, 8])."""
        b = torch.as_tensor(bits, dtype=torch.long).expand(self.num_experts).clone()
        if b.min() < 1 or b.max() > 8:
            raise ValueError(f"bits must be in [1, 8], got {b.tolist()}")
        self.bits.copy_(b)

    def _code(self, n: str) -> NestedInt8:
        return NestedInt8(getattr(self, f"{n}_codes"), getattr(self, f"{n}_scale"), self.shapes[n])

    def expert_weights(self):
        out = []
        for n in ("gate", "up", "down"):
            c = self._code(n)
            per_bits = {int(b): c.dequantize(int(b)) for b in self.bits.unique()}
            w = torch.stack([per_bits[int(b)][e] for e, b in enumerate(self.bits)])
            out.append(w.to(self.dtype))
        return tuple(out)

    def expert_errors(
        self, candidates: tuple[int, ...], reference: ExpertWeightsT | None = None
    ) -> torch.Tensor:
        """``(E, C)`` mean squared weight error of each expert at each candidate width.

        Args:
            candidates: widths.
            reference: float ``(gate, up, down)`` to compare with (default: the 8-bit reconstruction).
        """
        ref = reference if reference is not None else self._dequant_all(8)
        out = torch.zeros(self.num_experts, len(candidates))
        for c, b in enumerate(candidates):
            deq = self._dequant_all(b)
            for w, r in zip(deq, ref):
                out[:, c] += ((w.float() - r.float()) ** 2).flatten(1).mean(1).cpu()
        return out

    def _dequant_all(self, bits: int):
        return tuple(self._code(n).dequantize(bits) for n in ("gate", "up", "down"))

    def storage_bytes(self) -> int:
        """Bytes needed at the current per-expert widths (codes + scales)."""
        total = 0
        for n in ("gate", "up", "down"):
            c = self._code(n)
            per = c.codes[0].numel()
            total += sum((per * int(b) + 7) // 8 for b in self.bits) + 4 * c.scale.numel()
        return total


def _check_block_bits(b: int | torch.Tensor, num_experts: int, block: int) -> None:
    """Widths of one block: an int or an integer ``()``/``(E,)`` tensor, every value in ``[1, 8]``."""
    where = f"bits for MoE block {block}"
    if isinstance(b, bool) or not isinstance(b, int | torch.Tensor):
        raise TypeError(f"{where} must be an int or an (E,) integer tensor, got {b!r}")
    t = torch.as_tensor(b)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{where} must hold integers, got dtype {t.dtype}")
    if t.dim() > 1 or (t.dim() == 1 and t.numel() != num_experts):
        raise ValueError(f"{where} must be an int or have shape ({num_experts},), got shape {tuple(t.shape)}")
    if t.numel() and (t.min() < 1 or t.max() > 8):
        raise ValueError(f"{where} must be in [1, 8], got {t.tolist()}")


def quantize_model_experts(
    model: nn.Module, *, bits: int | list[torch.Tensor] = 8, group_size: int | None = None
) -> list[NestedQuantExperts]:
    """Replace every MoE block's expert bank (inside merge wrappers too) by :class:`NestedQuantExperts`.

    In place. ``sum(b.storage_bytes() for b in banks)`` is the experts' storage at the chosen widths.

    Args:
        model: a model containing moekit or HF MoE blocks.
        bits: one int width in ``[1, 8]``, or a list with one entry per MoE block (in
            :func:`find_moe_blocks` order): an int or an integer ``(E,)`` tensor of widths in ``[1, 8]``
            (e.g. from :func:`choose_bits`; E = the experts the block's bank stores). Checked for every block
            before any bank is replaced (``ValueError``; ``TypeError`` for a bool, a float or another type).
        group_size: elements per quantisation scale along each matrix's last dimension (None: the whole
            dimension).

    Returns:
        The new banks, in block order (call ``set_bits`` to switch widths without re-quantising).
    """
    refs = find_moe_blocks(model)
    if isinstance(bits, bool) or not isinstance(bits, int | list | tuple):
        raise TypeError(f"bits must be an int or a list with one entry per MoE block, got {bits!r}")
    if not isinstance(bits, int) and len(bits) != len(refs):
        raise ValueError(f"bits has {len(bits)} entries for {len(refs)} MoE blocks (one per block)")
    for i, ref in enumerate(refs):
        e = get_expert_weights(unwrap_bank(ref.experts))[0].shape[0]
        _check_block_bits(bits if isinstance(bits, int) else bits[i], e, i)
    banks = []
    for i, ref in enumerate(refs):
        holder = ref.experts if isinstance(ref.experts, RemappedExperts) else ref.block
        bank = unwrap_bank(ref.experts)
        g, u, d = get_expert_weights(bank)
        b = bits if isinstance(bits, int) else bits[i]
        q = NestedQuantExperts(gate=g, up=u, down=d, bits=b, group_size=group_size, act=bank_activation(bank))
        holder.experts = q
        banks.append(q)
    return banks


def choose_bits(
    usage: torch.Tensor,
    *,
    expert_numel: int,
    budget_bytes: float,
    candidates: tuple[int, ...] = (2, 4, 6, 8),
    errors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert bit widths from usage under a memory budget (greedy) [D].

    Every expert starts at the smallest candidate and is upgraded one candidate step at a time while the
    budget allows. Without ``errors`` the hottest upgradable expert goes first; with ``errors`` the upgrade
    with the largest usage-weighted error reduction per extra byte goes first.

    Args:
        usage: ``(E,)`` usage frequencies (or router-score mass).
        expert_numel: weights per expert.
        budget_bytes: bytes available for all experts' codes of this set.
        candidates: allowed widths, ascending.
        errors: optional ``(E, C)`` quantisation error of each expert at each candidate width (e.g. from
            :meth:`NestedQuantExperts.expert_errors`).

    Returns:
        ``(E,)`` long widths.
    """
    cands = sorted(candidates)
    e = usage.numel()
    if errors is not None and errors.shape != (e, len(cands)):
        raise ValueError(f"errors must have shape ({e}, {len(cands)}), got {tuple(errors.shape)}")
    level = [0] * e
    cost = sum((expert_numel * cands[0] + 7) // 8 for _ in range(e))
    if cost > budget_bytes:
        raise ValueError(f"budget {budget_bytes} B is below the minimum {cost} B at {cands[0]} bits")

    def extra(i: int) -> int:
        return (expert_numel * (cands[level[i] + 1] - cands[level[i]]) + 7) // 8

    order = torch.argsort(usage, descending=True, stable=True).tolist()
    while True:
        options = [i for i in order if level[i] + 1 < len(cands) and cost + extra(i) <= budget_bytes]
        if not options:
            break
        if errors is None:
            i = options[0]  # hottest first
        else:
            i = max(
                options,
                key=lambda j: (
                    float(usage[j]) * float(errors[j, level[j]] - errors[j, level[j] + 1]) / extra(j)
                ),
            )
        cost += extra(i)
        level[i] += 1
    return torch.tensor([cands[lv] for lv in level], dtype=torch.long)


def hebf_load_order(
    bits: list[torch.Tensor], usage: list[torch.Tensor], *, layerwise: bool = False
) -> list[tuple[int, int, int]]:
    """Hottest-expert-bit-first load order of ``(layer, expert, bit_plane)`` triples.

    Args:
        bits: per layer ``(E,)`` planes to load per expert.
        usage: per layer ``(E,)`` hotness (tokens routed, usage frequency).
        layerwise: False (whole-model preload): every expert's high planes (coarse model) before any
            expert's low planes, hottest experts first within a plane. True (the per-layer I/O pipeline of
            decoding): layer by layer, and within a layer the hottest expert's planes first, so its long
            compute overlaps the loading of colder experts.
    """
    items = []
    for layer, (b, u) in enumerate(zip(bits, usage)):
        for e in range(b.numel()):
            for plane in range(int(b[e])):
                key = (layer, -float(u[e]), e, plane) if layerwise else (plane, -float(u[e]), layer, e)
                items.append((key, (layer, e, plane)))
    items.sort()
    return [triple for _, triple in items]


def bits_from_weights(
    weights: torch.Tensor, *, thresholds: Sequence[float], candidates: Sequence[int]
) -> torch.Tensor:
    """Dual routing's second decision: a bit width per (token, expert) pair from its combine weight [D].

    Args:
        weights: ``(N, K)`` combine weights of the selected experts.
        thresholds: ascending weight thresholds, ``len(candidates) - 1`` of them.
        candidates: ascending widths; a pair with weight ``w`` gets ``candidates[#{t <= w}]``.

    Returns:
        ``(N, K)`` long widths.
    """
    if len(thresholds) != len(candidates) - 1:
        raise ValueError(f"need len(candidates) - 1 thresholds, got {len(thresholds)} for {len(candidates)}")
    if list(thresholds) != sorted(thresholds) or list(candidates) != sorted(candidates):
        raise ValueError(f"thresholds {thresholds} and candidates {candidates} must be ascending")
    for b in candidates:
        _check_bits(b)
    th = torch.tensor(list(thresholds), dtype=torch.float32, device=weights.device)
    level = torch.bucketize(weights.float().contiguous(), th, right=True)  # (N, K) number of t <= w
    return torch.tensor(list(candidates), dtype=torch.long, device=weights.device)[level]


class DualRoutedQuantExperts(NestedQuantExperts):
    """Nested-INT8 bank with dual routing: each (token, expert) pair runs at its own bit width.

    ``self.bits`` (``(E,)``) is the number of planes loaded per expert (a pair never uses more);
    the pair's requested width comes from :func:`bits_from_weights`. With one candidate, every pair runs at
    ``min(candidate, bits[e])`` — the static plan.

    Args:
        gate, up, down, bits, group_size, act: as :class:`NestedQuantExperts`.
        thresholds, candidates: the dual-routing rule (see :func:`bits_from_weights`).
    """

    def __init__(
        self,
        *,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        thresholds: Sequence[float] = (0.5,),
        candidates: Sequence[int] = (4, 8),
        bits: int | torch.Tensor = 8,
        group_size: int | None = None,
        act=None,
    ) -> None:
        super().__init__(gate=gate, up=up, down=down, bits=bits, group_size=group_size, act=act)
        self.set_rule(thresholds=thresholds, candidates=candidates)

    def set_rule(self, *, thresholds: Sequence[float], candidates: Sequence[int]) -> None:
        """Change the dual-routing rule (validated on a dummy weight)."""
        bits_from_weights(torch.zeros(1, 1), thresholds=thresholds, candidates=candidates)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.candidates = tuple(int(c) for c in candidates)

    def pair_bits(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` width each pair runs at: the rule's width capped by the expert's loaded planes."""
        want = bits_from_weights(weights, thresholds=self.thresholds, candidates=self.candidates)
        return torch.minimum(want, self.bits.to(indices.device)[indices])

    def _expert_at(self, e: int, bits: int) -> ExpertWeightsT:
        out = []
        for n in ("gate", "up", "down"):
            codes, scale = getattr(self, f"{n}_codes")[e], getattr(self, f"{n}_scale")[e]
            out.append(NestedInt8(codes, scale, self.shapes[n][1:]).dequantize(bits).to(self.dtype))
        return out[0], out[1], out[2]

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, k = indices.shape
        bits = self.pair_bits(indices, weights).reshape(-1)  # (N*K,)
        flat = indices.reshape(-1)  # (N*K,)
        w = weights.reshape(-1).to(x.dtype)  # (N*K,)
        tok = torch.arange(n, device=x.device).repeat_interleave(k)  # (N*K,)
        keep = torch.ones_like(flat, dtype=torch.bool) if mask is None else mask.reshape(-1)
        out = x.new_zeros(n, x.shape[-1])
        key = flat * 16 + bits  # one group per (expert, width)
        for kk in torch.unique(key[keep]).tolist():
            e, b = divmod(int(kk), 16)
            sel = keep & (key == kk)
            g, u, d = self._expert_at(e, b)
            xe = x[tok[sel]]  # (P, D)
            ye = (self.act_fn(xe @ g) * (xe @ u)) @ d  # (P, D)
            out.index_add_(0, tok[sel], ye * w[sel, None])
        return out


def dual_quantize_model_experts(
    model: nn.Module,
    *,
    thresholds: Sequence[float],
    candidates: Sequence[int],
    bits: int | list[torch.Tensor] = 8,
    group_size: int | None = None,
) -> list[DualRoutedQuantExperts]:
    """Like :func:`quantize_model_experts`, with :class:`DualRoutedQuantExperts` banks (in place).

    Args:
        model: a model containing moekit or HF MoE blocks.
        thresholds, candidates: the dual-routing rule (:func:`bits_from_weights`).
        bits: planes loaded per expert: one width or one ``(E,)`` tensor per block.
        group_size: quantisation group along each matrix's last dimension.

    Returns:
        The new banks, in block order.
    """
    banks = []
    for i, ref in enumerate(find_moe_blocks(model)):
        holder = ref.experts if isinstance(ref.experts, RemappedExperts) else ref.block
        bank = unwrap_bank(ref.experts)
        g, u, d = get_expert_weights(bank)
        q = DualRoutedQuantExperts(
            gate=g,
            up=u,
            down=d,
            thresholds=thresholds,
            candidates=candidates,
            bits=bits if isinstance(bits, int) else bits[i],
            group_size=group_size,
            act=bank_activation(bank),
        )
        holder.experts = q
        banks.append(q)
    return banks


def dual_routing_bytes(
    pair_bits: torch.Tensor, indices: torch.Tensor, *, num_experts: int, expert_numel: int
) -> dict[str, float]:
    """Memory and compute-precision summary of one batch under dual routing.

    Args:
        pair_bits: ``(N, K)`` widths the pairs ran at; indices: ``(N, K)`` their experts.
        num_experts: E; expert_numel: weights per expert.

    Returns:
        ``resident_bytes``: codes that must be loaded (each expert up to the widest pair that used it; unused
        experts load nothing); ``mean_pair_bits``: average width over pairs.
    """
    need = torch.zeros(num_experts, dtype=torch.long, device=indices.device)
    need.scatter_reduce_(0, indices.reshape(-1), pair_bits.reshape(-1), reduce="amax")
    resident = sum((expert_numel * int(b) + 7) // 8 for b in need.tolist())
    return {"resident_bytes": float(resident), "mean_pair_bits": float(pair_bits.float().mean())}


def simulate_loading(
    order: Sequence[tuple[int, int, int]],
    *,
    plane_seconds: float,
    compute_seconds: dict[tuple[int, int], float],
    needed: dict[tuple[int, int], int],
) -> dict[str, float]:
    """Replay a bit-plane load order through one I/O queue and one compute queue [D].

    Loads run back to back in ``order`` (``plane_seconds`` each; planes not in ``needed`` are skipped, they
    cost nothing). An expert ``(layer, e)`` can compute once its first ``needed[(layer, e)]`` planes are
    loaded and every expert of earlier layers has finished; the compute queue takes ready experts in the
    order they became ready and runs each for ``compute_seconds[(layer, e)]`` (e.g. proportional to its
    tokens: hot experts compute longest, which is why HEBF loads them first).

    Returns:
        ``finish_seconds`` (makespan) and ``stall_seconds`` (compute idle while waiting for I/O).
    """
    loaded_at: dict[tuple[int, int, int], float] = {}
    t_io = 0.0
    for layer, e, plane in order:
        if plane < needed.get((layer, e), 0) and (layer, e, plane) not in loaded_at:
            t_io += plane_seconds
            loaded_at[(layer, e, plane)] = t_io
    ready = {}
    for (layer, e), nb in needed.items():
        missing = [p for p in range(nb) if (layer, e, p) not in loaded_at]
        if missing:
            raise ValueError(f"order never loads plane {missing[0]} that expert ({layer}, {e}) needs")
        ready[(layer, e)] = max((loaded_at[(layer, e, p)] for p in range(nb)), default=0.0)
    t, stall = 0.0, 0.0
    for layer in sorted({lay for lay, _ in needed}):
        for key in sorted((k for k in needed if k[0] == layer), key=lambda k: (ready[k], k)):
            if ready[key] > t:
                stall += ready[key] - t
                t = ready[key]
            t += compute_seconds[key]
    return {"finish_seconds": t, "stall_seconds": stall}


def expert_order(bits: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    """Baseline load order: layer by layer, expert by expert, all of an expert's planes together."""
    return [(layer, e, p) for layer, b in enumerate(bits) for e in range(b.numel()) for p in range(int(b[e]))]
