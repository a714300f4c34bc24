"""Tiny models shared by the tools tests: a moekit MoE LM (and its dense twin) and HF MoE LMs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer
from moe_core.routers import TopKRouter
from moe_core.surgery.upcycling import CausalSelfAttention
from moe_core.types import MoEOutput


class DenseSwiGLU(nn.Module):
    def __init__(self, *, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(
        self, *, dim, heads, hidden_dim, num_experts, top_k, renormalize, dense, backend="loop"
    ) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim=dim, num_heads=heads)
        if dense:
            self.ffn = DenseSwiGLU(dim=dim, hidden_dim=hidden_dim)
        else:
            router = TopKRouter(dim=dim, num_experts=num_experts, top_k=top_k, renormalize=renormalize)
            nn.init.normal_(router.gate.weight, 0, 0.5)
            experts = SwiGLUExperts(num_experts=num_experts, dim=dim, hidden_dim=hidden_dim, backend=backend)
            self.ffn = MoELayer(router=router, experts=experts)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        out = self.ffn(self.norm2(x))
        return x + (out.output if isinstance(out, MoEOutput) else out)


class TinyLM(nn.Module):
    """Embedding -> blocks -> norm -> head; ``forward(ids (B, T)) -> logits (B, T, V)``."""

    def __init__(
        self,
        *,
        vocab=31,
        dim=16,
        heads=2,
        hidden_dim=24,
        layers=3,
        num_experts=6,
        top_k=2,
        renormalize=True,
        dense=False,
        backend="loop",
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            Block(
                dim=dim,
                heads=heads,
                hidden_dim=hidden_dim,
                num_experts=num_experts,
                top_k=top_k,
                renormalize=renormalize,
                dense=dense,
                backend=backend,
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


@pytest.fixture
def tiny_lm():
    def make(seed: int = 0, **kw) -> TinyLM:
        torch.manual_seed(seed)
        return TinyLM(**kw).eval()

    return make


def _hf(kind: str, seed: int):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    common = dict(
        vocab_size=37,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_local_experts=6, **common)
        m = transformers.MixtralForCausalLM(cfg)
    elif kind == "olmoe":
        cfg = transformers.OlmoeConfig(intermediate_size=24, num_experts=6, norm_topk_prob=False, **common)
        m = transformers.OlmoeForCausalLM(cfg)
    elif kind == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(
            intermediate_size=24,
            moe_intermediate_size=24,
            num_experts=6,
            shared_expert_intermediate_size=20,
            norm_topk_prob=True,
            **common,
        )
        m = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # routers of HF models start at zero: give them a real routing
        for name, p in m.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return m.eval()


@pytest.fixture
def hf_moe():
    return _hf


@pytest.fixture
def dense_ffn():
    def make(dim: int = 12, hidden_dim: int = 20, seed: int = 0) -> DenseSwiGLU:
        torch.manual_seed(seed)
        return DenseSwiGLU(dim=dim, hidden_dim=hidden_dim).double()

    return make
