"""Adapters that give every tool one view of an MoE block, for moekit layers and HF transformers blocks.

Supported blocks [D]:

* moekit ``MoELayer`` (``.router`` with ``.gate.weight (E, D)``; ``.experts`` a stacked SwiGLU bank with
  ``gate_proj``/``up_proj`` ``(E, D, H)`` and ``down_proj`` ``(E, H, D)``);
* HF transformers 5.x sparse MoE blocks (Mixtral, Qwen2-MoE, OLMoE): ``.gate`` a top-k router with
  ``.weight (E, D)`` returning ``(logits, top_k_weights, top_k_index)``, ``.experts`` with fused
  ``gate_up_proj (E, 2H, D)`` and ``down_proj (E, D, H)`` (``nn.functional.linear`` layout).

The canonical expert format used by all tools is moekit's: ``gate (E, D, H)``, ``up (E, D, H)``,
``down (E, H, D)``, so that ``expert_e(x) = (act(x @ gate[e]) * (x @ up[e])) @ down[e]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.types import RouterOutput

ExpertWeights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate (E,D,H), up (E,D,H), down (E,H,D)


def is_moekit_bank(module: nn.Module) -> bool:
    """True for a moekit stacked SwiGLU bank (``gate_proj``/``up_proj`` ``(E, D, H)``)."""
    g = getattr(module, "gate_proj", None)
    return (
        isinstance(g, torch.Tensor)
        and g.dim() == 3
        and hasattr(module, "up_proj")
        and hasattr(module, "down_proj")
    )


def is_hf_bank(module: nn.Module) -> bool:
    """True for an HF transformers 5.x fused expert bank (``gate_up_proj (E, 2H, D)``)."""
    g = getattr(module, "gate_up_proj", None)
    return isinstance(g, torch.Tensor) and g.dim() == 3 and hasattr(module, "down_proj")


def unwrap_bank(module: nn.Module) -> nn.Module:
    """Follow wrappers (``RemappedExperts``, offloading) down to the module that stores the weights."""
    while not (is_moekit_bank(module) or is_hf_bank(module) or hasattr(module, "expert_weights")):
        inner = getattr(module, "experts", None)
        if inner is None:
            raise TypeError(f"{type(module).__name__} is not a known expert bank")
        module = inner
    return module


def get_expert_weights(bank: nn.Module) -> ExpertWeights:
    """Expert weights in the canonical moekit layout (detached copies, float32 kept as stored).

    Returns:
        ``gate (E, D, H)``, ``up (E, D, H)``, ``down (E, H, D)``.
    """
    bank = unwrap_bank(bank)
    if is_moekit_bank(bank):
        return bank.gate_proj.detach().clone(), bank.up_proj.detach().clone(), bank.down_proj.detach().clone()
    if is_hf_bank(bank):
        h = bank.gate_up_proj.shape[1] // 2
        gu = bank.gate_up_proj.detach()
        gate = gu[:, :h, :].transpose(1, 2).contiguous()  # (E, D, H)
        up = gu[:, h:, :].transpose(1, 2).contiguous()  # (E, D, H)
        down = bank.down_proj.detach().transpose(1, 2).contiguous()  # (E, H, D)
        return gate, up, down
    return tuple(w.detach().clone() for w in bank.expert_weights())  # type: ignore[return-value]


def set_expert_weights(bank: nn.Module, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    """Replace a bank's weights (the number of experts E and width H may change).

    Args:
        bank: moekit or HF bank (wrappers are followed).
        gate: ``(E, D, H)``; up: ``(E, D, H)``; down: ``(E, H, D)``.
    """
    if (
        gate.shape != up.shape
        or gate.dim() != 3
        or down.shape != (gate.shape[0], gate.shape[2], gate.shape[1])
    ):
        raise ValueError(
            f"expected gate/up (E, D, H) and down (E, H, D), got {tuple(gate.shape)}, {tuple(up.shape)}, "
            f"{tuple(down.shape)}"
        )
    bank = unwrap_bank(bank)
    e, _, h = gate.shape
    if is_moekit_bank(bank):
        bank.gate_proj = nn.Parameter(gate.detach().clone().contiguous())
        bank.up_proj = nn.Parameter(up.detach().clone().contiguous())
        bank.down_proj = nn.Parameter(down.detach().clone().contiguous())
        bank.num_experts, bank.hidden_dim = e, h
    elif is_hf_bank(bank):
        gu = torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], dim=1)  # (E, 2H, D)
        bank.gate_up_proj = nn.Parameter(gu.detach().clone().contiguous())
        bank.down_proj = nn.Parameter(down.detach().transpose(1, 2).clone().contiguous())  # (E, D, H)
        bank.num_experts, bank.intermediate_dim = e, h
    else:
        raise TypeError(f"cannot set weights of {type(bank).__name__}")


def bank_activation(bank: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bank's gating activation (HF ``act_fn`` or SiLU for moekit SwiGLU)."""
    bank = unwrap_bank(bank)
    return getattr(bank, "act_fn", F.silu)


def dispatch_swiglu(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    num_experts: int,
    expert: Callable[[int], ExpertWeights],
    act: Callable[[torch.Tensor], torch.Tensor] = F.silu,
) -> torch.Tensor:
    """Sorted-loop SwiGLU dispatch with weights fetched per expert (used by computed-weight banks).

    Args:
        x: ``(N, D)`` tokens.
        indices: ``(N, K)`` expert ids; weights: ``(N, K)`` combine weights; mask: ``(N, K)`` or None.
        num_experts: E.
        expert: ``e -> (gate (D, H), up (D, H), down (H, D))``; called once per expert that has tokens.
        act: gating activation.

    Returns:
        ``(N, D)`` combined expert outputs (Mixtral semantics: weights scale expert outputs).
    """
    n, k = indices.shape
    flat = indices.reshape(-1)  # (N*K,)
    w = weights.reshape(-1).to(x.dtype)  # (N*K,)
    tok = torch.arange(n, device=x.device).repeat_interleave(k)  # (N*K,)
    if mask is not None:
        keep = mask.reshape(-1)
        flat, w, tok = flat[keep], w[keep], tok[keep]
    order = flat.argsort(stable=True)
    flat, w, tok = flat[order], w[order], tok[order]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    xs = x[tok]  # (P, D) pairs sorted by expert
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            g, u, d = expert(e)
            xe = xs[start : start + c]
            outs.append((act(xe @ g) * (xe @ u)) @ d)
        start += c
    ys = torch.cat(outs) if outs else xs.new_zeros(0, x.shape[-1])
    return x.new_zeros(n, x.shape[-1]).index_add_(0, tok, ys * w[:, None])


class ComputedWeightExperts(nn.Module):
    """Base for banks whose weights are computed on the fly (compressed, quantised); subclasses give
    ``expert_weights() -> (gate (E,D,H), up (E,D,H), down (E,H,D))``.

    ``forward(x, indices, weights, mask=None)`` accepts both the moekit and the HF call convention.
    """

    num_experts: int

    def __init__(self, *, act: Callable[[torch.Tensor], torch.Tensor] = F.silu) -> None:
        super().__init__()
        self.act_fn = act

    def expert_weights(self) -> ExpertWeights:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        g, u, d = self.expert_weights()
        return dispatch_swiglu(
            x,
            indices,
            weights,
            mask,
            num_experts=self.num_experts,
            expert=lambda e: (g[e], u[e], d[e]),
            act=self.act_fn,
        )


class RemappedExperts(nn.Module):
    """Several router slots share one stored expert: ``index_map (E_router,) -> [0, E_stored)``.

    Used after MC-SMoE merging so the router (and its logits) stays bit-identical while the bank holds
    one expert per group. Works with the moekit and the HF call convention.
    """

    def __init__(self, *, experts: nn.Module, index_map: torch.Tensor) -> None:
        super().__init__()
        self.experts = experts
        self.register_buffer("index_map", index_map.long().clone())

    @property
    def num_experts(self) -> int:
        """Router-visible number of experts."""
        return int(self.index_map.numel())

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, *rest) -> torch.Tensor:
        return self.experts(x, self.index_map[indices], weights, *rest)


@dataclass
class BlockRef:
    """One MoE block found in a model."""

    name: str
    block: nn.Module
    router: nn.Module
    kind: str  # "moekit" or "hf"

    @property
    def experts(self) -> nn.Module:
        return self.block.experts

    @experts.setter
    def experts(self, value: nn.Module) -> None:
        self.block.experts = value


def find_moe_blocks(model: nn.Module) -> list[BlockRef]:
    """All MoE blocks of a model in module order (moekit ``MoELayer``-like and HF sparse MoE blocks)."""
    refs = []
    for name, m in model.named_modules():
        router, experts = getattr(m, "router", None), getattr(m, "experts", None)
        if (
            isinstance(router, nn.Module)
            and isinstance(experts, nn.Module)
            and hasattr(router, "num_experts")
        ):
            refs.append(BlockRef(name, m, router, "moekit"))
            continue
        gate = getattr(m, "gate", None)
        if (
            isinstance(gate, nn.Module)
            and isinstance(experts, nn.Module)
            and isinstance(getattr(gate, "weight", None), torch.Tensor)
            and hasattr(gate, "top_k")
        ):
            refs.append(BlockRef(name, m, gate, "hf"))
    return refs


def router_weight(router: nn.Module) -> torch.Tensor:
    """The router's ``(E, D)`` weight (moekit ``router.gate.weight`` or HF ``router.weight``)."""
    gate = getattr(router, "gate", None)
    if isinstance(gate, nn.Linear):
        return gate.weight
    w = getattr(router, "weight", None)
    if isinstance(w, torch.Tensor):
        return w
    raise TypeError(f"{type(router).__name__} has no recognisable router weight")


def router_top_k(router: nn.Module) -> int:
    """K of a top-k router."""
    if not hasattr(router, "top_k"):
        raise TypeError(f"{type(router).__name__} is not a top-k router (no top_k attribute)")
    return int(router.top_k)


def router_renormalizes(router: nn.Module) -> bool:
    """Whether the router renormalises its top-k weights (Mixtral always does)."""
    if hasattr(router, "renormalize"):
        return bool(router.renormalize)
    if hasattr(router, "norm_topk_prob"):
        return bool(router.norm_topk_prob)
    return True  # Mixtral's router has no flag and always renormalises


def router_probs(router: nn.Module, output) -> torch.Tensor:
    """``(N, E)`` float32 router probabilities from a router's forward output (either convention)."""
    if isinstance(output, RouterOutput):
        return output.probs
    return output[0].float().softmax(dim=-1)


def router_logits(output) -> torch.Tensor:
    """``(N, E)`` float32 raw router logits from a router's forward output (either convention)."""
    if isinstance(output, RouterOutput):
        return output.logits
    return output[0].float()


def router_selection(output) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights (N, K), indices (N, K))`` from a router's forward output (either convention)."""
    if isinstance(output, RouterOutput):
        return output.weights, output.indices
    return output[1], output[2]


def replace_selection(output, weights: torch.Tensor, indices: torch.Tensor):
    """A router output with new combine weights/indices (same convention and dtype as ``output``)."""
    if isinstance(output, RouterOutput):
        return dataclasses.replace(
            output, weights=weights.to(output.weights.dtype), indices=indices, mask=None
        )
    return (output[0], weights.to(output[1].dtype), indices)


def select_top_k(probs: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of a ``(N, E)`` distribution, optionally renormalised, as the routers do it."""
    w, idx = probs.topk(top_k, dim=-1)  # (N, K)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


def count_parameters(module: nn.Module) -> int:
    """Unique stored parameters (+ nonzeros of sparse parts of compressed banks)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for m in module.modules():
        extra = getattr(m, "stored_parameter_correction", None)
        if callable(extra):
            total += int(extra())
    return total
