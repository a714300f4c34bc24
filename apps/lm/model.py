"""Decoder-only MoE transformer LM. DeepSeekMoE arXiv 2401.06066; Chain-of-Experts arXiv 2506.18945;
EvoMoE arXiv 2112.14397; MoA arXiv 2210.05144; SMHA/UoE arXiv 2503.02495.

Pre-norm blocks ``x + Attn(RMSNorm(x))`` then an FFN: dense SwiGLU, a ``moe_core`` :class:`MoELayer` (any
router, optional always-on shared experts: DeepSeekMoE fine-grained + shared), a Chain-of-Experts layer, or an
EvoMoE layer (one dense expert that is later spawned into E experts behind a dense-to-sparse gate; see
``apps.lm.evomoe``). Attention is standard causal multi-head attention with rotary positions (RoPE), or
attention experts: mixture of attention heads (MoA) or selective multi-head attention (SMHA).

The network returns logits and routing decisions; losses live in ``apps.lm.task``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from apps.lm.routing import RouterKind, build_router
from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer
from moe_core.types import RouterOutput

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
        ffn_hidden: hidden width of dense SwiGLU FFNs.
        ffn: FFN type of the sparse layers: ``dense``, ``moe``, ``coe`` (Chain-of-Experts), ``evomoe``.
        first_dense_layers: the first n blocks keep a dense FFN (DeepSeekMoE keeps layer 0 dense).
        moe_every: a sparse FFN on every n-th remaining block (dynamic top-p paper: 2), others dense.
        num_experts: routed experts E per sparse layer.
        top_k: K routed experts per token (for top-k style routers).
        expert_hidden: H per routed expert (None: ``ffn_hidden // top_k``, i.e. matched active FFN width).
        num_shared_experts: DeepSeekMoE always-on shared experts (fused into one SwiGLU of width n * H).
        shared_gate: sigmoid gate on the shared path (Qwen2-MoE).
        router: router kind (resolved by ``apps.lm.routing.build_router``).
        router_kwargs: extra constructor arguments of the router (e.g. ``{threshold: 0.4}`` for top-p).
        coe_iterations: Chain-of-Experts iterations C.
        coe_inner_residual: ``z^t = z^{t-1} + MoE_t(z^{t-1})`` (paper default True).
        coe_outer_residual: ``out = h + z^C`` instead of ``z^C`` (paper default False).
        coe_independent_gates: one router per iteration (paper default) or one shared router.
        attention: ``mha``, ``moa`` (mixture of attention heads) or ``smha`` (selective multi-head attention).
        attn_experts: MoA query/output heads E_a (SMHA uses ``n_heads``).
        attn_top_k: heads per token for MoA / SMHA.
        dropout: dropout on attention output and FFN output.
        init_std: normal std of weights; residual output projections use ``init_std / sqrt(2 n_layers)``.
        tie_embeddings: share the token embedding with the output head.
        rope_base: RoPE base.
        expert_backend: dispatch backend of ``moe_core`` expert banks.
    """

    vocab_size: int | None = None
    context_len: int = 64
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_hidden: int = 352
    ffn: FFNKind = "dense"
    first_dense_layers: int = 0
    moe_every: int = 1
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int | None = None
    num_shared_experts: int = 0
    shared_gate: bool = False
    router: RouterKind = "topk"
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    coe_iterations: int = 2
    coe_inner_residual: bool = True
    coe_outer_residual: bool = False
    coe_independent_gates: bool = True
    attention: AttentionKind = "mha"
    attn_experts: int = 8
    attn_top_k: int = 2
    dropout: float = 0.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    expert_backend: Literal["auto", "grouped_mm", "loop", "padded"] = "auto"

    def __post_init__(self) -> None:
        if self.ffn not in FFNKind.__args__:
            raise ValueError(f"ffn must be one of {FFNKind.__args__}, got {self.ffn!r}")
        if self.attention not in AttentionKind.__args__:
            raise ValueError(f"attention must be one of {AttentionKind.__args__}, got {self.attention!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head width dim/n_heads={self.dim // self.n_heads} must be even for RoPE")
        if self.moe_every < 1 or self.first_dense_layers < 0:
            raise ValueError("moe_every must be >= 1 and first_dense_layers >= 0")
        if self.coe_iterations < 1:
            raise ValueError(f"coe_iterations must be >= 1, got {self.coe_iterations}")
        if self.ffn in ("moe", "coe"):
            check_causal_router(self.router, self.router_kwargs)


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


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN ``w2(silu(w1 x) * w3 x)`` (Shazeer 2020, arXiv 2002.05202)."""

    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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
    """Multi-head causal attention with RoPE and ``scaled_dot_product_attention``."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.rope = Rotary(head_dim=self.head_dim, max_len=cfg.context_len, base=cfg.rope_base)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput | None]:
        b, t, d = x.shape
        q, k, v = (
            self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # 3x (B, h, T, hd)
        q, k = self.rope(q), self.rope(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, h, T, hd)
        return self.proj(y.transpose(1, 2).reshape(b, t, d)), None


class MixtureOfAttentionHeads(nn.Module):
    """MoA (arXiv 2210.05144, spec section 16): E_a query/output heads, shared K/V, top-k heads per token.

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
    """SMHA (UoE, arXiv 2503.02495, spec section 15): each token selects ``attn_top_k`` of the heads; head h
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


class ChainOfExpertsFFN(nn.Module):
    """Chain-of-Experts FFN (arXiv 2506.18945, spec section 11), built from ``moe_core`` MoE layers that share
    one expert bank (and shared experts) across iterations, with one router per iteration.

    ``z^0 = x`` (the normalised block input), ``z^t = z^{t-1} + MoE_t(z^{t-1})`` (inner residual),
    returns ``z^C``; the block adds ``h`` when ``outer_residual`` (paper default: not).
    """

    def __init__(self, *, iterations: int, routers: list[nn.Module], experts: nn.Module,
                 shared_experts: nn.Module | None, inner_residual: bool) -> None:
        super().__init__()
        self.iterations, self.inner_residual = iterations, inner_residual
        self.routers = nn.ModuleList(routers)
        self.experts, self.shared_experts = experts, shared_experts
        self.layers = [MoELayer(router=r, experts=experts, shared_experts=shared_experts) for r in routers]

    def _layer(self, t: int) -> MoELayer:
        # MoELayers are views on the shared submodules (kept out of the module tree to avoid duplicate names)
        return self.layers[t if len(self.layers) > 1 else 0]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, list[RouterOutput]]:
        routings = []
        for t in range(self.iterations):
            out = self._layer(t)(z)
            routings.append(out.routing)
            z = z + out.output if self.inner_residual else out.output
        return z, routings


class EvoMoEFFN(nn.Module):
    """EvoMoE FFN (arXiv 2112.14397, spec section 10): phase 1 trains expert 0 as a dense FFN; at the switch
    ``apps.lm.evomoe.spawn_experts`` copies it into all E experts (diversified by random masks) and the
    dense-to-sparse router takes over. ``phase`` is a persistent buffer so checkpoints resume in the right
    phase. All E experts exist from the start so the optimizer and checkpoints never change shape.
    """

    def __init__(
        self, *, dim: int, hidden_dim: int, num_experts: int, router: nn.Module, backend: str
    ) -> None:
        super().__init__()
        self.experts = SwiGLUExperts(num_experts=num_experts, dim=dim, hidden_dim=hidden_dim, backend=backend)
        self.router = router
        self.register_buffer("phase", torch.tensor(1, dtype=torch.long))

    @property
    def sparse(self) -> bool:
        return int(self.phase) == 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput | None]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, D)
        if not self.sparse:
            n = flat.shape[0]
            idx = torch.zeros(n, 1, dtype=torch.long, device=x.device)  # (N, 1) every token to expert 0
            return self.experts(flat, idx, flat.new_ones(n, 1)).reshape(shape), None
        routing = self.router(flat)
        out = self.experts(flat, routing.indices, routing.weights.to(x.dtype), routing.mask)
        return out.reshape(shape), routing


class Block(nn.Module):
    """Pre-norm transformer block with a configurable attention and FFN."""

    def __init__(self, cfg: LMConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim), nn.RMSNorm(cfg.dim)
        attn = {
            "mha": CausalSelfAttention,
            "moa": MixtureOfAttentionHeads,
            "smha": SelectiveMultiHeadAttention,
        }
        self.attn = attn[cfg.attention](cfg)
        self.kind: FFNKind = cfg.ffn if cfg.sparse_layer(index) else "dense"
        self.outer_residual = True
        self.drop = nn.Dropout(cfg.dropout)
        h = cfg.resolved_expert_hidden
        shared = (
            SwiGLU(dim=cfg.dim, hidden_dim=cfg.num_shared_experts * h) if cfg.num_shared_experts else None
        )
        if self.kind == "dense":
            self.ffn = SwiGLU(dim=cfg.dim, hidden_dim=cfg.ffn_hidden)
        elif self.kind == "moe":
            router = build_router(cfg.router, dim=cfg.dim, num_experts=cfg.num_experts, top_k=cfg.top_k,
                                  kwargs=cfg.router_kwargs)
            experts = SwiGLUExperts(
                num_experts=cfg.num_experts, dim=cfg.dim, hidden_dim=h, backend=cfg.expert_backend
            )
            self.ffn = MoELayer(
                router=router, experts=experts, shared_experts=shared, shared_gate=cfg.shared_gate
            )
        elif self.kind == "coe":
            n_routers = cfg.coe_iterations if cfg.coe_independent_gates else 1
            routers = [build_router(cfg.router, dim=cfg.dim, num_experts=cfg.num_experts, top_k=cfg.top_k,
                                    kwargs=cfg.router_kwargs) for _ in range(n_routers)]
            experts = SwiGLUExperts(
                num_experts=cfg.num_experts, dim=cfg.dim, hidden_dim=h, backend=cfg.expert_backend
            )
            self.ffn = ChainOfExpertsFFN(iterations=cfg.coe_iterations, routers=routers, experts=experts,
                                         shared_experts=shared, inner_residual=cfg.coe_inner_residual)
            self.outer_residual = cfg.coe_outer_residual
        else:  # evomoe
            router = build_router("dts", dim=cfg.dim, num_experts=cfg.num_experts, top_k=cfg.top_k,
                                  kwargs=cfg.router_kwargs)
            self.ffn = EvoMoEFFN(dim=cfg.dim, hidden_dim=h, num_experts=cfg.num_experts, router=router,
                                 backend=cfg.expert_backend)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, RouterOutput]]]:
        routings: list[tuple[str, RouterOutput]] = []
        a, r = self.attn(self.norm1(x))
        if r is not None:
            routings.append((f"layer{self.index}.attn", r))
        h = x + self.drop(a)
        z = self.norm2(h)
        if self.kind == "dense":
            return h + self.drop(self.ffn(z)), routings
        if self.kind == "moe":
            out = self.ffn(z)
            routings.append((f"layer{self.index}.ffn", out.routing))
            return h + self.drop(out.output), routings
        if self.kind == "coe":
            zc, rs = self.ffn(z)
            routings += [(f"layer{self.index}.ffn.it{t}", r) for t, r in enumerate(rs)]
            return (h + self.drop(zc)) if self.outer_residual else self.drop(zc), routings
        y, r = self.ffn(z)
        if r is not None:
            routings.append((f"layer{self.index}.ffn", r))
        return h + self.drop(y), routings


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
        self.norm = nn.RMSNorm(config.dim)
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
                continue  # norms keep their ones
            last = name.rsplit(".", 1)[-1]
            is_out = last in ("down_proj",) or name.endswith(("proj.weight", "w2.weight"))
            nn.init.normal_(p, mean=0.0, std=out_std if is_out else std)

    def routers_by_name(self) -> dict[str, nn.Module]:
        """The router module behind every routing name that :meth:`forward` can report (same names as
        ``LMOutput.routings``): the task asks each router for the auxiliary losses its paper defines, and the
        bias-balancing callback finds the routers it updates."""
        out: dict[str, nn.Module] = {}
        for blk in self.blocks:
            i = blk.index
            if isinstance(blk.attn, (MixtureOfAttentionHeads, SelectiveMultiHeadAttention)):
                out[f"layer{i}.attn"] = blk.attn.router
            if blk.kind in ("moe", "evomoe"):
                out[f"layer{i}.ffn"] = blk.ffn.router
            elif blk.kind == "coe":
                routers = blk.ffn.routers
                for t in range(blk.ffn.iterations):
                    out[f"layer{i}.ffn.it{t}"] = routers[t if len(routers) > 1 else 0]
        return out

    def forward(self, idx: torch.Tensor) -> LMOutput:
        """idx ``(B, T)`` int64 token ids -> :class:`LMOutput` with logits ``(B, T, V)``."""
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
        if idx.shape[1] > self.config.context_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds context_len={self.config.context_len}")
        x = self.embed(idx)  # (B, T, D)
        routings: list[tuple[str, RouterOutput]] = []
        for blk in self.blocks:
            x, r = blk(x)
            routings += r
        return LMOutput(logits=self.head(self.norm(x)), routings=routings)


def _routed_expert_bank(blk: Block) -> tuple[nn.Module | None, int]:
    """The routed expert bank of a block's FFN and its nominal applications per token."""
    if blk.kind == "moe":
        return blk.ffn.experts, blk.ffn.router.top_k if hasattr(blk.ffn.router, "top_k") else 1
    if blk.kind == "coe":
        k = blk.ffn.routers[0].top_k if hasattr(blk.ffn.routers[0], "top_k") else 1
        return blk.ffn.experts, k * blk.ffn.iterations
    if blk.kind == "evomoe":
        return blk.ffn.experts, 1 if not blk.ffn.sparse else getattr(blk.ffn.router, "top_k", 1)
    return None, 0


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
        bank, k = _routed_expert_bank(blk)
        if bank is not None:
            per = sum(p.numel() for p in bank.parameters()) / bank.num_experts
            if active_experts is not None and f"layer{blk.index}" in active_experts:
                k = active_experts[f"layer{blk.index}"]
            if blk.kind == "evomoe" and not blk.ffn.sparse:
                k = 1
            active -= per * (bank.num_experts - k)
        if isinstance(blk.attn, MixtureOfAttentionHeads):
            per = (blk.attn.q.weight.numel() + blk.attn.proj.weight.numel()) / blk.attn.e
            active -= per * (blk.attn.e - cfg.attn_top_k)
        elif isinstance(blk.attn, SelectiveMultiHeadAttention):
            per = (blk.attn.qkv.weight.numel() + blk.attn.proj.weight.numel()) / blk.attn.n_heads
            active -= per * (blk.attn.n_heads - cfg.attn_top_k)
    return {"total": int(total), "active": int(round(active)), "embedding": int(model.embed.weight.numel())}
