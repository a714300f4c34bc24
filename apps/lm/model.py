"""Decoder-only MoE transformer LM. DeepSeekMoE arXiv 2401.06066; Chain-of-Experts arXiv 2506.18945;
EvoMoE arXiv 2112.14397; MoA arXiv 2210.05144; SMHA/UoE arXiv 2503.02495.

Pre-norm blocks ``x + Attn(RMSNorm(x))`` then an FFN built from ``moe_core.layer`` parts (resolved in one
place, :func:`build_ffn`): a dense SwiGLU (:class:`DenseLayer`), an :class:`MoELayer` (any router, optional
always-on shared experts: DeepSeekMoE fine-grained + shared), a :class:`ChainOfExpertsLayer`, or an EvoMoE
layer (one dense expert that is later spawned into E experts behind a dense-to-sparse gate; see
``apps.lm.evomoe``). Every FFN returns a ``moe_core.types.MoEOutput``, so the block never asks which kind it
holds and ``moe_core`` tools (upcycling, expert parallelism, merging, quantisation) can swap or wrap it.
Attention is standard causal multi-head attention with rotary positions (RoPE), or attention experts: mixture
of attention heads (MoA) or selective multi-head attention (SMHA).

The network returns logits and routing decisions; losses live in ``apps.lm.task``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from apps.lm.routing import RouterKind, build_router, check_renamed_kwargs
from moe_core.experts import SwiGLUExperts
from moe_core.layer import ChainOfExpertsLayer, DenseLayer, MoELayer, SwiGLU
from moe_core.surgery.upcycling import upcycle_model
from moe_core.types import MoEOutput, RouterOutput

FFNKind = Literal["dense", "moe", "coe", "evomoe"]
AttentionKind = Literal["mha", "moa", "smha"]


@dataclass
class LMConfig:
    """Architecture of :class:`TransformerLM` (serialisable; LightningCLI shows these docs as help).

    Attributes:
        vocab_size: V; None = taken from the data module at setup.
        context_len: maximum sequence length T (size of the RoPE tables).
        dim: model width D.
        n_layers: transformer blocks.
        n_heads: attention heads (head width D / n_heads).
        n_kv_heads: key/value heads (grouped-query attention, Mixtral/Qwen); None: ``n_heads``.
        attn_bias: biases on the query/key/value projections (Qwen2-MoE).
        qk_norm: RMSNorm on queries and keys before RoPE: ``none``, ``full`` (over the whole projection,
            OLMoE) or ``head`` (per head, Qwen3-MoE).
        norm_eps: RMSNorm epsilon (None: ``torch.finfo(dtype).eps``, the ``nn.RMSNorm`` default).
        ffn_hidden: hidden width of dense SwiGLU FFNs.
        ffn: FFN type of the sparse layers: ``dense``, ``moe``, ``coe`` (Chain-of-Experts), ``evomoe``.
        first_dense_layers: the first n blocks keep a dense FFN (DeepSeekMoE keeps layer 0 dense).
        moe_every: a sparse FFN on every n-th remaining block (dynamic top-p paper: 2), others dense.
        num_experts: routed experts E per sparse layer.
        top_k: K routed experts per token (for top-k style routers).
        expert_hidden: H per routed expert (None: ``ffn_hidden // top_k``, i.e. matched active FFN width).
        num_shared_experts: DeepSeekMoE always-on shared experts (fused into one SwiGLU of width n * H).
        shared_expert_hidden: width of the fused shared SwiGLU (None: ``num_shared_experts * H``; Qwen2-MoE's
            ``shared_expert_intermediate_size``).
        shared_gate: sigmoid gate on the shared path (Qwen2-MoE); ``ffn: moe`` only.
        router: router kind (resolved by ``apps.lm.routing.build_router``).
        router_kwargs: extra constructor arguments of the router (e.g. ``{threshold: 0.4}`` for top-p).
        coe_iterations: Chain-of-Experts iterations C.
        coe_inner_residual: ``z^t = z^{t-1} + MoE_t(z^{t-1})`` (paper default True).
        coe_outer_residual: ``out = h + z^C``, the block's residual stream kept as every other FFN kind keeps
            it (default True). False is the CoE code's default (``residual: inner``): the block returns
            ``z^C = norm(h) + ...``, replacing the stream by its normalised copy. That reading stalled at the
            unigram loss on the Wikipedia benchmark's shape (4 x 256, lr 2e-3: gradient-norm spikes to 48,
            2.73 bpb where top-2 reached 1.85), so moekit keeps the stream unless asked.
        coe_independent_gates: one router per iteration (paper default) or one shared router.
        attention: ``mha``, ``moa`` (mixture of attention heads) or ``smha`` (selective multi-head attention).
        attn_experts: MoA query/output heads E_a (SMHA uses ``n_heads``).
        attn_top_k: heads per token for MoA / SMHA.
        dropout: dropout on attention output and FFN output.
        init_std: normal std of weights; residual output projections use ``init_std / sqrt(2 n_layers)``.
        tie_embeddings: share the token embedding with the output head.
        rope_base: RoPE base.
        expert_backend: dispatch backend of ``moe_core`` expert banks.
        activation_checkpointing: recompute each block's activations in the backward pass instead of storing
            them (``torch.utils.checkpoint``, non-reentrant, RNG state preserved): memory per block drops to
            its input, compute grows by one forward. Training only (grad enabled); same loss and gradients.
    """

    vocab_size: int | None = None
    context_len: int = 64
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    attn_bias: bool = False
    qk_norm: Literal["none", "full", "head"] = "none"
    norm_eps: float | None = None
    ffn_hidden: int = 352
    ffn: FFNKind = "dense"
    first_dense_layers: int = 0
    moe_every: int = 1
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None
    num_shared_experts: int = 0
    shared_expert_hidden: int | None = None
    shared_gate: bool = False
    router: RouterKind = "topk"
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    coe_iterations: int = 2
    coe_inner_residual: bool = True
    coe_outer_residual: bool = True
    coe_independent_gates: bool = True
    attention: AttentionKind = "mha"
    attn_experts: int = 8
    attn_top_k: int = 2
    dropout: float = 0.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    expert_backend: Literal["auto", "grouped_mm", "loop", "padded"] = "auto"
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.ffn not in FFNKind.__args__:
            raise ValueError(f"ffn must be one of {FFNKind.__args__}, got {self.ffn!r}")
        if self.attention not in AttentionKind.__args__:
            raise ValueError(f"attention must be one of {AttentionKind.__args__}, got {self.attention!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head width dim/n_heads={self.dim // self.n_heads} must be even for RoPE")
        kv = self.kv_heads
        if kv < 1 or self.n_heads % kv:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.qk_norm not in ("none", "full", "head"):
            raise ValueError(f"qk_norm must be 'none', 'full' or 'head', got {self.qk_norm!r}")
        if self.moe_every < 1 or self.first_dense_layers < 0:
            raise ValueError("moe_every must be >= 1 and first_dense_layers >= 0")
        if self.coe_iterations < 1:
            raise ValueError(f"coe_iterations must be >= 1, got {self.coe_iterations}")
        check_renamed_kwargs(self.router_kwargs)
        if self.ffn in ("moe", "coe"):
            check_causal_router(self.router, self.router_kwargs)
        if self.shared_gate and self.ffn != "moe":
            raise ValueError(
                f"shared_gate gates the shared experts of ffn='moe' layers; ffn={self.ffn!r} has none"
            )

    @property
    def kv_heads(self) -> int:
        """Key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def resolved_expert_hidden(self) -> int:
        return self.expert_hidden if self.expert_hidden is not None else max(1, self.ffn_hidden // self.top_k)

    def sparse_layer(self, i: int) -> bool:
        """Whether block ``i`` gets the sparse FFN kind."""
        return (
            self.ffn != "dense"
            and i >= self.first_dense_layers
            and (i - self.first_dense_layers) % self.moe_every == 0
        )


def as_lm_config(config: LMConfig | Mapping[str, Any] | None) -> LMConfig:
    """An :class:`LMConfig` from one, from a mapping of its fields (as LightningCLI's checkpoints hold it),
    or the default for None; a mapping with an unknown field raises ``TypeError`` naming it."""
    if config is None:
        return LMConfig()
    if isinstance(config, Mapping):
        return LMConfig(**config)
    return config


def check_causal_router(router: str, router_kwargs: dict[str, Any]) -> None:
    """Refuse routing that lets a token's output depend on later tokens (a decoder must be causal).

    Expert choice picks each expert's tokens from the whole group of N tokens, and capacity dropping decides
    which (token, slot) pairs survive by looking at the other tokens of the batch (position priority serves
    all first choices before any second choice; probability priority ranks the whole batch): in both, changing
    a later token can change an earlier token's output. Both stay available in ``moe_core`` for non-causal
    models (recsys rows, encoders).
    """
    if router == "expert_choice":
        raise ValueError(
            "router 'expert_choice' is not causal (each expert picks its tokens from the whole batch, so "
            "later tokens change earlier outputs); the LM is a causal decoder: use a token-choice router "
            "such as 'topk' or 'sigmoid_topk'"
        )
    for key in ("capacity_factor", "eval_capacity_factor"):
        if router_kwargs.get(key) is not None:
            raise ValueError(
                f"router_kwargs.{key}: capacity dropping is not causal (which tokens are dropped depends on "
                "later tokens of the batch); the LM routes dropless: remove it"
            )


# checkpoints carry the config in their hyper-parameters: allow it under ``torch.load(weights_only=True)``,
# the default of ``Trainer.fit(ckpt_path=...)``, so that resuming needs no ``weights_only=False``
torch.serialization.add_safe_globals([LMConfig])


@dataclass
class LMOutput:
    """Network output.

    Attributes:
        logits: ``(B, T, V)``.
        routings: ``(name, RouterOutput)`` for every routing decision of the forward pass, in layer order
            (CoE layers contribute one per iteration; names like ``layer1.ffn.it0``, ``layer2.attn``).
    """

    logits: torch.Tensor
    routings: list[tuple[str, RouterOutput]]


class Rotary(nn.Module):
    """Rotary position embedding tables (RoFormer, arXiv 2104.09864); non-persistent buffers move with the
    module."""

    def __init__(self, *, head_dim: int, max_len: int, base: float) -> None:
        super().__init__()
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)  # (T, hd/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``(B, h, T, hd)`` -> same shape, rotated by position."""
        t = x.shape[-2]
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)  # (T, hd/2)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, h, T, hd/2)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, h, T, hd/2, 2)
        return out.flatten(-2)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE and ``scaled_dot_product_attention``; optional grouped-query
    attention (``n_kv_heads``), query/key/value biases and query/key RMSNorm (the Mixtral, Qwen2-MoE, OLMoE
    and Qwen3-MoE attentions, for ``apps.lm.hf``). The projection is one fused ``qkv`` of
    ``(h + 2 kv) * hd`` outputs: queries, then keys, then values."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.kv = cfg.n_heads, cfg.dim // cfg.n_heads, cfg.kv_heads
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * self.kv) * self.head_dim, bias=cfg.attn_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.rope = Rotary(head_dim=self.head_dim, max_len=cfg.context_len, base=cfg.rope_base)
        self.dropout = cfg.dropout
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            self.q_norm = nn.RMSNorm(cfg.dim if full else self.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.kv * self.head_dim if full else self.head_dim, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput | None]:
        b, t, d = x.shape
        h, kv, hd = self.n_heads, self.kv, self.head_dim
        q, k, v = self.qkv(x).split([h * hd, kv * hd, kv * hd], dim=-1)  # (B, T, h*hd), 2x (B, T, kv*hd)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.view(b, t, -1, hd).transpose(1, 2) for z in (q, k, v))  # (B, h|kv, T, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q), self.rope(k)
        if kv != h:
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)  # (B, h, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, h, T, hd)
        return self.proj(y.transpose(1, 2).reshape(b, t, d)), None


class MixtureOfAttentionHeads(nn.Module):
    """MoA (arXiv 2210.05144): E_a query/output heads, shared K/V, top-k heads per token.

    ``y_t = sum_{i in TopK(G(x_t))} G_i(x_t) * softmax(q_t W_q^i K^T / sqrt(d_h)) V W_o^i``. K and V are one
    shared head of width ``d_h = D / n_heads`` (our reading of "shared across experts"). All E_a heads are
    computed and the unselected ones get weight 0 (exact, not compute-sparse: fine at this scale on CPU).
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.e, self.head_dim = cfg.attn_experts, cfg.dim // cfg.n_heads
        self.q = nn.Linear(cfg.dim, self.e * self.head_dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * self.head_dim, bias=False)
        self.proj = nn.Linear(self.e * self.head_dim, cfg.dim, bias=False)
        self.rope = Rotary(head_dim=self.head_dim, max_len=cfg.context_len, base=cfg.rope_base)
        self.router = build_router("topk", dim=cfg.dim, num_experts=self.e, top_k=cfg.attn_top_k)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        b, t, d = x.shape
        routing = self.router(x.reshape(b * t, d))
        w = routing.dense_weights().to(x.dtype).view(b, t, self.e, 1)  # (B, T, Ea, 1)
        q = self.rope(self.q(x).view(b, t, self.e, self.head_dim).transpose(1, 2))  # (B, Ea, T, hd)
        k, v = self.kv(x).view(b, t, 2, 1, self.head_dim).permute(2, 0, 3, 1, 4)  # 2x (B, 1, T, hd)
        k = self.rope(k)
        y = F.scaled_dot_product_attention(q, k.expand_as(q), v.expand_as(q), is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, Ea, T, hd)
        y = y.transpose(1, 2) * w  # (B, T, Ea, hd)
        return self.proj(y.reshape(b, t, self.e * self.head_dim)), routing


class SelectiveMultiHeadAttention(nn.Module):
    """SMHA (UoE, arXiv 2503.02495): each token selects ``attn_top_k`` of the heads; head h
    attends only among the tokens routed to it (causal mask restricted to them), RoPE on original positions,
    and adds nothing at positions not routed to it.

    Our reading [D]: the head output is multiplied by ``1 + w - stopgrad(w)`` (value 1, gradient of the
    routing weight w), so that with every head selected the layer equals standard MHA while the router still
    learns.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.rope = Rotary(head_dim=self.head_dim, max_len=cfg.context_len, base=cfg.rope_base)
        self.router = build_router("topk", dim=cfg.dim, num_experts=self.n_heads, top_k=cfg.attn_top_k)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        b, t, d = x.shape
        routing = self.router(x.reshape(b * t, d))
        w = routing.dense_weights().view(b, t, self.n_heads).transpose(1, 2)  # (B, h, T)
        sel = w > 0  # (B, h, T) token t routed to head h
        q, k, v = (
            self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # 3x (B, h, T, hd)
        q, k = self.rope(q), self.rope(k)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()  # (T, T)
        allowed = causal & sel[..., :, None] & sel[..., None, :]  # (B, h, T, T)
        allowed = allowed | torch.eye(
            t, dtype=torch.bool, device=x.device
        )  # unrouted rows: self only, zeroed below
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, h, T, hd)
        gate = (sel.to(w.dtype) * (1.0 + w - w.detach())).to(
            x.dtype
        )  # (B, h, T) value 1 on routed, 0 elsewhere
        y = y * gate[..., None]
        return self.proj(y.transpose(1, 2).reshape(b, t, d)), routing


class EvoMoELayer(nn.Module):
    """EvoMoE FFN (arXiv 2112.14397) from ``moe_core`` parts: a DTS router and a SwiGLU bank.

    Phase 1 trains expert 0 as a dense FFN (no routing); at the switch ``apps.lm.evomoe.spawn_experts`` copies
    it into all E experts (diversified by random masks) and the dense-to-sparse router takes over. ``phase``
    is a persistent buffer so checkpoints resume in the right phase. All E experts exist from the start so the
    optimizer and checkpoints never change shape.

    Args:
        router: the dense-to-sparse router (``(N, D) -> RouterOutput``).
        experts: the E-expert bank.
    """

    def __init__(self, *, router: nn.Module, experts: SwiGLUExperts) -> None:
        super().__init__()
        self.experts = experts  # registered before the router: the parameter order of older checkpoints
        self.router = router
        self.register_buffer("phase", torch.tensor(1, dtype=torch.long))

    @property
    def sparse(self) -> bool:
        return int(self.phase) == 2

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """x ``(B, T, D)`` or ``(N, D)`` -> MoEOutput (``routing=[]`` in phase 1)."""
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        if not self.sparse:
            n = flat.shape[0]
            idx = torch.zeros(n, 1, dtype=torch.long, device=x.device)  # (N, 1) every token to expert 0
            return MoEOutput(output=self.experts(flat, idx, flat.new_ones(n, 1)).reshape(x.shape), routing=[])
        routing = self.router(flat)
        out = self.experts(flat, routing.indices, routing.weights.to(x.dtype), routing.mask)  # (N, D)
        return MoEOutput(output=out.reshape(x.shape), routing=routing)


def build_ffn(cfg: LMConfig, index: int) -> nn.Module:
    """The FFN of block ``index``: the one place where the FFN kind is resolved.

    Every kind returns a ``MoEOutput``: ``dense`` a :class:`DenseLayer` of width ``ffn_hidden``; ``moe`` an
    :class:`MoELayer` (router + E experts of width ``resolved_expert_hidden`` + optional shared experts and
    shared gate); ``coe`` a :class:`ChainOfExpertsLayer` over one bank with one router per iteration (or one
    shared router), the shared experts run every iteration; ``evomoe`` an :class:`EvoMoELayer`. The CoE outer
    residual is left to the block (it adds the un-normalised stream, which the layer never sees).
    """
    kind = cfg.ffn if cfg.sparse_layer(index) else "dense"
    if kind == "dense":
        return DenseLayer(dim=cfg.dim, hidden_dim=cfg.ffn_hidden)
    h = cfg.resolved_expert_hidden

    def router(router_kind: str = cfg.router) -> nn.Module:
        return build_router(router_kind, dim=cfg.dim, num_experts=cfg.num_experts, top_k=cfg.top_k,
                            kwargs=cfg.router_kwargs)

    shared_h = cfg.shared_expert_hidden or cfg.num_shared_experts * h
    shared = SwiGLU(dim=cfg.dim, hidden_dim=shared_h) if cfg.num_shared_experts else None
    experts = SwiGLUExperts(
        num_experts=cfg.num_experts, dim=cfg.dim, hidden_dim=h, backend=cfg.expert_backend
    )
    if kind == "moe":
        return MoELayer(router=router(), experts=experts, shared_experts=shared, shared_gate=cfg.shared_gate)
    if kind == "coe":
        n_routers = cfg.coe_iterations if cfg.coe_independent_gates else 1
        return ChainOfExpertsLayer(routers=[router() for _ in range(n_routers)], experts=experts,
                                   num_iterations=cfg.coe_iterations, shared_experts=shared,
                                   inner_residual=cfg.coe_inner_residual, outer_residual=False)
    if kind == "evomoe":
        return EvoMoELayer(router=router("dts"), experts=experts)
    raise ValueError(f"ffn must be one of {FFNKind.__args__}, got {kind!r}")


def ffn_routing_names(index: int, ffn: nn.Module) -> dict[str, nn.Module]:
    """Routing name -> router module for the FFN of block ``index`` (the names ``LMOutput.routings`` uses):
    ``layer{i}.ffn`` for a layer with one ``router``, ``layer{i}.ffn.it{t}`` per Chain-of-Experts iteration
    (a shared CoE router appears under every iteration's name), nothing for a dense FFN."""
    if isinstance(ffn, ChainOfExpertsLayer):
        routers = ffn.routers
        return {f"layer{index}.ffn.it{t}": routers[t if len(routers) > 1 else 0]
                for t in range(ffn.num_iterations)}
    router = getattr(ffn, "router", None)
    return {f"layer{index}.ffn": router} if isinstance(router, nn.Module) else {}


class Block(nn.Module):
    """Pre-norm transformer block with a configurable attention and FFN (any module returning MoEOutput)."""

    def __init__(self, cfg: LMConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps), nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        attn = {
            "mha": CausalSelfAttention,
            "moa": MixtureOfAttentionHeads,
            "smha": SelectiveMultiHeadAttention,
        }
        self.attn = attn[cfg.attention](cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.ffn = build_ffn(cfg, index)
        # Chain-of-Experts without its outer residual (the CoE code's default) returns z^C, not h + z^C
        self.ffn_residual = not isinstance(self.ffn, ChainOfExpertsLayer) or cfg.coe_outer_residual

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, RouterOutput]]]:
        routings: list[tuple[str, RouterOutput]] = []
        a, r = self.attn(self.norm1(x))
        if r is not None:
            routings.append((f"layer{self.index}.attn", r))
        h = x + self.drop(a)
        out: MoEOutput = self.ffn(self.norm2(h))
        if isinstance(out.routing, list):  # per-iteration decisions (Chain-of-Experts); [] for dense FFNs
            routings += [(f"layer{self.index}.ffn.it{t}", r) for t, r in enumerate(out.routing)]
        else:
            routings.append((f"layer{self.index}.ffn", out.routing))
        y = self.drop(out.output)
        return (h + y if self.ffn_residual else y), routings


class TransformerLM(nn.Module):
    """Decoder-only LM: token embedding -> blocks -> RMSNorm -> output head (tied by default).

    Args:
        config: :class:`LMConfig` with ``vocab_size`` set.
    """

    def __init__(self, *, config: LMConfig) -> None:
        super().__init__()
        if config.vocab_size is None or config.vocab_size < 1:
            raise ValueError(f"config.vocab_size must be set (got {config.vocab_size})")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init [D]: N(0, std) weights; residual output projections N(0, std / sqrt(2 L))."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                if name.endswith(".bias"):
                    nn.init.zeros_(p)  # attention biases start at zero; norms keep their ones
                continue
            is_out = name.endswith(("down_proj", "proj.weight"))  # FFN/expert down and attention outputs
            nn.init.normal_(p, mean=0.0, std=out_std if is_out else std)

    def routers_by_name(self) -> dict[str, nn.Module]:
        """The router module behind every routing name that :meth:`forward` can report (same names as
        ``LMOutput.routings``): the task asks each router for the auxiliary losses its paper defines, and the
        bias-balancing callback finds the routers it updates."""
        out: dict[str, nn.Module] = {}
        for blk in self.blocks:
            if isinstance(blk.attn, (MixtureOfAttentionHeads, SelectiveMultiHeadAttention)):
                out[f"layer{blk.index}.attn"] = blk.attn.router
            out.update(ffn_routing_names(blk.index, blk.ffn))
        return out

    def forward(self, idx: torch.Tensor) -> LMOutput:
        """idx ``(B, T)`` int64 token ids -> :class:`LMOutput` with logits ``(B, T, V)``."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        if idx.shape[1] > self.config.context_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds context_len={self.config.context_len}")
        x = self.embed(idx)  # (B, T, D)
        routings: list[tuple[str, RouterOutput]] = []
        ckpt = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if ckpt:
                x, r = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x, r = blk(x)
            routings += r
        return LMOutput(logits=self.head(self.norm(x)), routings=routings)


def upcycle(
    model: TransformerLM,
    *,
    num_experts: int,
    top_k: int,
    first_dense_layers: int = 0,
    moe_every: int = 1,
    router_std: float = 0.02,
    seed: int = 0,
) -> TransformerLM:
    """Sparse upcycling (arXiv 2212.05055) of a dense LM with ``moe_core.surgery.upcycling.upcycle_model``.

    Every FFN that the returned config makes sparse becomes an :class:`MoELayer` of ``num_experts`` copies of
    the dense FFN behind a new top-k router (``N(0, router_std)`` init). With ``top_k > 1`` the combine
    weights are renormalised, so the upcycled model computes the dense model's function until it trains.

    Args:
        model: a trained dense :class:`TransformerLM` (``config.ffn == "dense"``; not modified).
        num_experts: E copies per upcycled FFN.
        top_k: K experts per token.
        first_dense_layers: keep the first n FFNs dense.
        moe_every: upcycle every n-th remaining FFN (the paper upcycles every other MLP: 2).
        router_std: std of the new routers' weights.
        seed: seed of the router init.

    Returns:
        A new :class:`TransformerLM` whose ``config`` describes it (``ffn="moe"``, ``router="topk"``,
        ``expert_hidden=ffn_hidden``): ``TransformerLM(config=new.config)`` has its state-dict keys, so
        :class:`apps.lm.task.LMTask` trains and checkpoints it like any MoE LM.
    """
    cfg = model.config
    if cfg.ffn != "dense":
        raise ValueError(f"upcycle needs a dense LM (config.ffn='dense'), got ffn={cfg.ffn!r}")
    new_cfg = dataclasses.replace(
        cfg, ffn="moe", num_experts=num_experts, top_k=top_k, expert_hidden=cfg.ffn_hidden,
        first_dense_layers=first_dense_layers, moe_every=moe_every, router="topk", router_kwargs={},
        num_shared_experts=0, shared_gate=False,
    )
    names = [f"blocks.{i}.ffn" for i in range(cfg.n_layers) if new_cfg.sparse_layer(i)]
    new = upcycle_model(model, ffn_names=names, num_experts=num_experts, top_k=top_k, router_std=router_std,
                        seed=seed)
    for name in names:
        new.get_submodule(name).experts.backend = cfg.expert_backend
    new.config = new_cfg
    return new


# dense FFN weights of checkpoints written while the LM had its own SwiGLU (nn.Linear w1, w3, w2)
_LEGACY_FFN = re.compile(r"^(?P<ffn>(?:.*\.)?blocks\.\d+\.ffn(?:\.shared_experts)?)\.w(?P<w>[123])\.weight$")
_LEGACY_NAMES = {"1": "gate_proj", "3": "up_proj", "2": "down_proj"}


def upgrade_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """Rename, in place, the FFN weights of checkpoints written before the LM used ``moe_core.layer.SwiGLU``.

    ``...ffn.w1.weight (H, D)`` becomes ``...ffn.gate_proj (D, H)``, ``w3`` ``up_proj``, ``w2 (D, H)``
    ``down_proj (H, D)``, transposed (``nn.Linear`` stores ``(out, in)``, moe_core ``x @ W``); the same for
    ``ffn.shared_experts``. The parameter order is unchanged (w1, w3, w2 were registered in that order).

    Returns:
        old key -> new key of every renamed entry (empty for a current checkpoint).
    """
    renamed = {}
    for key in list(state_dict):
        m = _LEGACY_FFN.match(key)
        if m:
            new = f"{m['ffn']}.{_LEGACY_NAMES[m['w']]}"
            state_dict[new] = state_dict.pop(key).t().contiguous()
            renamed[key] = new
    return renamed


def _routed_expert_bank(ffn: nn.Module) -> tuple[nn.Module | None, int]:
    """The routed expert bank of an FFN layer and its nominal applications per token."""
    bank = getattr(ffn, "experts", None)
    if bank is None or not hasattr(bank, "num_experts"):
        return None, 0  # dense
    if isinstance(ffn, ChainOfExpertsLayer):
        return bank, getattr(ffn.routers[0], "top_k", 1) * ffn.num_iterations
    if not getattr(ffn, "sparse", True):
        return bank, 1  # EvoMoE phase 1: every token uses expert 0
    return bank, getattr(ffn.router, "top_k", 1)


def count_parameters(
    model: TransformerLM, *, active_experts: dict[str, float] | None = None
) -> dict[str, int]:
    """Total and active parameters per token.

    Active = total minus the routed-expert parameters a token does not use. Per sparse FFN a token uses ``k``
    experts (CoE: ``C * k`` expert applications, counted with multiplicity so that active parameters track
    compute); for variable-k routers pass the measured mean experts per token in ``active_experts`` (key
    ``layer{i}``; CoE: summed over iterations). MoA / SMHA count the query/value/output weights of
    ``attn_top_k`` heads. The tied embedding is counted once.

    Returns:
        ``{"total", "active", "embedding"}``.
    """
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    active = float(total)
    for blk in model.blocks:
        bank, k = _routed_expert_bank(blk.ffn)
        if bank is not None:
            per = sum(p.numel() for p in bank.parameters()) / bank.num_experts
            sparse = getattr(blk.ffn, "sparse", True)
            if sparse and active_experts is not None and f"layer{blk.index}" in active_experts:
                k = active_experts[f"layer{blk.index}"]
            active -= per * (bank.num_experts - k)
        if isinstance(blk.attn, MixtureOfAttentionHeads):
            per = (blk.attn.q.weight.numel() + blk.attn.proj.weight.numel()) / blk.attn.e
            active -= per * (blk.attn.e - cfg.attn_top_k)
        elif isinstance(blk.attn, SelectiveMultiHeadAttention):
            per = (blk.attn.qkv.weight.numel() + blk.attn.proj.weight.numel()) / blk.attn.n_heads
            active -= per * (blk.attn.n_heads - cfg.attn_top_k)
    return {"total": int(total), "active": int(round(active)), "embedding": int(model.embed.weight.numel())}
