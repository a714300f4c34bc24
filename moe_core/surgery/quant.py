"""Bit-nested (matryoshka) expert quantization after D^2MoE (arXiv 2504.15299).

From the paper [P: abstract]: one stored INT8 code per weight serves several bit widths (the b-bit model is
the b most significant bits), each expert gets a bit width from its importance, and a hottest-expert-bit-
first (HEBF) loading order fits a memory budget. No public code exists: the layout below is the project's
reading [D]::

    q = clamp(round(W / s), -128, 127);  u = q + 128 in [0, 255]           (per-group symmetric scale s)
    u_b = u >> (8 - b);  W_b = s * ((u_b << (8 - b)) + 2^(7 - b) - 128)   (b < 8, bucket midpoint)
    W_8 = s * q

Per-expert bit widths come from usage frequencies with a greedy budget planner [D].
"""

from __future__ import annotations

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


def quantize_model_experts(
    model: nn.Module, *, bits: int | list[torch.Tensor] = 8, group_size: int | None = None
) -> list[NestedQuantExperts]:
    """Replace every MoE block's expert bank (inside merge wrappers too) by :class:`NestedQuantExperts`.

    In place. ``sum(b.storage_bytes() for b in banks)`` is the experts' storage at the chosen widths.

    Args:
        model: a model containing moekit or HF MoE blocks.
        bits: one width, or one ``(E,)`` tensor of widths per block (e.g. from :func:`choose_bits`).
        group_size: elements per quantisation scale along each matrix's last dimension (None: the whole
            dimension).

    Returns:
        The new banks, in block order (call ``set_bits`` to switch widths without re-quantising).
    """
    refs = find_moe_blocks(model)
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


def hebf_load_order(bits: list[torch.Tensor], usage: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    """Hottest-expert-bit-first load order: ``(layer, expert, bit_plane)`` sorted so that every expert's
    high planes (coarse model) come before any expert's low planes, hottest experts first within a plane.
    """
    items = []
    for layer, (b, u) in enumerate(zip(bits, usage)):
        for e in range(b.numel()):
            for plane in range(int(b[e])):
                items.append((plane, -float(u[e]), layer, e))
    items.sort()
    return [(layer, e, plane) for plane, _, layer, e in items]

