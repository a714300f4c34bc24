"""One view of an MoE block for every tool, whether the block is a moekit layer or an HF transformers block.

The model-editing tools (``moe_core.surgery``) and the inference tools (``moe_core.inference``) both work
through this module, so each of them handles both kinds of block. Supported blocks:

* moekit ``MoELayer`` (``.router`` with ``.gate.weight (E, D)``; ``.experts`` a stacked SwiGLU bank with
  ``gate_proj``/``up_proj`` ``(E, D, H)`` and ``down_proj`` ``(E, H, D)``);
* HF transformers 5.x sparse MoE blocks (Mixtral, Qwen2-MoE, OLMoE): ``.gate`` a top-k router with
  ``.weight (E, D)`` returning ``(logits, top_k_weights, top_k_index)``, ``.experts`` with fused
  ``gate_up_proj (E, 2H, D)`` and ``down_proj (E, D, H)`` (``nn.functional.linear`` layout).

The canonical expert format used by all tools is moekit's: ``gate (E, D, H)``, ``up (E, D, H)``,
``down (E, H, D)``, so that ``expert_e(x) = (act(x @ gate[e]) * (x @ up[e])) @ down[e]``. A block's experts
may be wrapped (:class:`RemappedExperts` after merging, an offloading shell); :func:`unwrap_bank` follows
the wrappers to the module that stores the weights. These adapters are our design (no paper).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.types import RouterOutput

__all__ = [
    "BlockRef",
    "ExpertWeights",
    "RemappedExperts",
    "bank_activation",
    "find_moe_blocks",
    "get_expert_weights",
    "is_hf_bank",
    "is_moekit_bank",
    "replace_selection",
    "router_logits",
    "router_probs",
    "router_renormalizes",
    "router_selection",
    "router_top_k",
    "router_weight",
    "select_top_k",
    "set_expert_weights",
    "unwrap_bank",
]


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
        bank.gate_up_proj = nn.Parameter(torch.cat([gate.detach(), up.detach()], dim=-1))  # (E, D, 2H)
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
