"""BAM's parallel attention + FFN block (Branch-Attend-Mix, arXiv 2408.08274).

BAM upcycles N dense seed models whose blocks are *parallel* transformer blocks: attention and FFN read
the same normalised input and both outputs are added to the residual [U: the spec's reading of the paper]::

    y = x + MoA(LN(x)) + MoE_FFN(LN(x))

with soft-routed attention experts (``moe_core.surgery.upcycling.MixtureOfAttentionExperts``) and top-k
FFN experts (an ``MoELayer``). :class:`ParallelBlock` is that block for any attention/FFN pair (dense or
mixture); :func:`bam_parallel_block` builds the mixture block from N dense parallel blocks: attention and
FFN experts from the N blocks, the norm averaged (as BAM averages every non-expert parameter), new routers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from moe_core.surgery.upcycling import MixtureOfAttentionExperts, _ffn_experts
from moe_core.types import MoEOutput, RouterOutput

__all__ = ["ParallelBlock", "bam_parallel_block"]


class ParallelBlock(nn.Module):
    """``y = x + attention(norm(x)) + ffn(norm(x))`` (one shared pre-norm).

    Args:
        norm: the pre-norm (e.g. ``nn.LayerNorm(D)``).
        attention: ``(B, T, D) -> (B, T, D)``.
        ffn: ``(B, T, D) -> (B, T, D)`` tensor or ``MoEOutput``.
    """

    def __init__(self, *, norm: nn.Module, attention: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.norm, self.attention, self.ffn = norm, attention, ffn

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """``(B, T, D)`` -> ``MoEOutput(output (B, T, D), routing)`` (the FFN's routing; [] if dense)."""
        h = self.norm(x)  # (B, T, D), shared by both branches
        f = self.ffn(h)
        routing: RouterOutput | list[RouterOutput] = []
        if isinstance(f, MoEOutput):
            f, routing = f.output, f.routing
        return MoEOutput(output=x + self.attention(h) + f, routing=routing)


def bam_parallel_block(
    blocks: list[ParallelBlock],
    *,
    top_k: int = 2,
    renormalize: bool | None = None,
    kv_shared: bool = False,
    router_std: float = 0.02,
    seed: int = 0,
) -> ParallelBlock:
    """Mix N dense parallel blocks (same shapes) into one BAM parallel block.

    Args:
        blocks: N blocks with ``CausalSelfAttention``-style attention and bias-free SwiGLU FFNs
            (``gate_proj``/``up_proj``/``down_proj``).
        top_k: FFN experts per token.
        renormalize: FFN router renormalisation (None: iff ``top_k > 1``).
        kv_shared: attention experts share the mean K/V projection.
        router_std, seed: init of the new routers.

    Returns:
        A new block; inputs are not modified.
    """
    if not blocks:
        raise ValueError("blocks is empty")
    if not 1 <= top_k <= len(blocks):
        raise ValueError(f"top_k must be in [1, {len(blocks)}], got {top_k}")
    g = torch.Generator().manual_seed(seed)
    norm = _average([b.norm for b in blocks])
    attn = MixtureOfAttentionExperts(
        attentions=[b.attention for b in blocks], kv_shared=kv_shared, router_std=router_std, generator=g
    )
    ffn = _ffn_experts(
        [b.ffn for b in blocks], top_k=top_k, renormalize=renormalize, router_std=router_std, generator=g
    )
    return ParallelBlock(norm=norm, attention=attn, ffn=ffn)


def _average(modules: list[nn.Module]) -> nn.Module:
    out = copy.deepcopy(modules[0])
    sds = [m.state_dict() for m in modules]
    with torch.no_grad():
        out.load_state_dict(
            {k: torch.stack([sd[k].float() for sd in sds]).mean(0).to(sds[0][k].dtype) for k in sds[0]}
        )
    return out
