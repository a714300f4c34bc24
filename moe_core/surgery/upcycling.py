"""Sparse upcycling (arXiv 2212.05055) and BAM Branch-Attend-Mix (arXiv 2408.08274, after BTX 2403.07816).

From the papers [P]: upcycled experts are exact copies of the dense MLP with a new, small random router;
BAM turns N specialised dense models into one mixture whose FFN experts are the N FFNs and whose attention
experts are the N attention layers (soft routing; optionally K/V shared), averaging every other parameter.
Our reading [D]: the functions below edit module trees given dotted module names, so they work on any model
whose FFN has ``gate_proj``/``up_proj``/``down_proj`` (``nn.Linear`` or 2-D parameters) and whose attention
has ``q_proj``/``k_proj``/``v_proj``/``o_proj``; the HF path converts a Mistral model into a Mixtral model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer
from moe_core.routers import TopKRouter


def dense_ffn_weights(ffn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gate (D, H), up (D, H), down (H, D))`` of a dense SwiGLU FFN.

    Accepts ``nn.Linear`` attributes ``gate_proj``/``up_proj``/``down_proj`` (weights ``(H, D)``/``(D, H)``)
    or raw 2-D parameters already in ``x @ W`` layout.
    """
    out = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        m = getattr(ffn, name, None)
        if isinstance(m, nn.Linear):
            if m.bias is not None:
                raise ValueError(f"{name} has a bias; upcycling supports bias-free SwiGLU FFNs only")
            out.append(m.weight.detach().t().contiguous())
        elif isinstance(m, torch.Tensor) and m.dim() == 2:
            out.append(m.detach().clone())
        else:
            raise TypeError(f"dense FFN {type(ffn).__name__} has no 2-D {name!r} (nn.Linear or parameter)")
    return out[0], out[1], out[2]


def upcycle_ffn(
    ffn: nn.Module,
    *,
    num_experts: int,
    top_k: int,
    renormalize: bool | None = None,
    router_std: float = 0.02,
    generator: torch.Generator | None = None,
) -> MoELayer:
    """Sparse upcycling of one dense SwiGLU FFN into a top-k ``MoELayer`` with E identical experts.

    Args:
        ffn: dense FFN (see :func:`dense_ffn_weights`).
        num_experts: E copies.
        top_k: K.
        renormalize: renormalised top-k (then the layer equals the FFN exactly at init) or raw softmax
            weights (then it equals ``(sum of selected probs) * FFN(x)``); None: renormalise iff
            ``top_k > 1`` (a single renormalised weight is a constant 1 and gives the router no gradient, so
            ``True`` with ``top_k=1`` is refused by the router).
        router_std: std of the new router's normal init [U: "small random"].
        generator: optional RNG for the router init.

    Returns:
        A new ``MoELayer`` (the dense module is not modified).
    """
    gate, up, down = dense_ffn_weights(ffn)
    d, h = gate.shape
    router = TopKRouter(dim=d, num_experts=num_experts, top_k=top_k, renormalize=renormalize)
    with torch.no_grad():
        router.gate.weight.normal_(0.0, router_std, generator=generator)
    experts = SwiGLUExperts(num_experts=num_experts, dim=d, hidden_dim=h)
    with torch.no_grad():
        experts.gate_proj.copy_(gate.expand(num_experts, d, h))  # (E, D, H)
        experts.up_proj.copy_(up.expand(num_experts, d, h))  # (E, D, H)
        experts.down_proj.copy_(down.expand(num_experts, h, d))  # (E, H, D)
    layer = MoELayer(router=router, experts=experts)
    return layer.to(dtype=gate.dtype, device=gate.device)


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _set(model: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, value)


def upcycle_model(
    model: nn.Module,
    *,
    ffn_names: list[str],
    num_experts: int,
    top_k: int,
    renormalize: bool | None = None,
    router_std: float = 0.02,
    seed: int = 0,
) -> nn.Module:
    """Copy ``model`` and replace the named dense FFNs with upcycled ``MoELayer`` s (all else copied).

    The paper upcycles every other MLP; pass those names. The caller's blocks must accept the
    ``MoEOutput`` a ``MoELayer`` returns (moekit LM blocks do).
    """
    if not ffn_names:
        raise ValueError("ffn_names is empty: name the dense FFN modules to upcycle")
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for name in ffn_names:
        _set(
            new,
            name,
            upcycle_ffn(
                _get(new, name),
                num_experts=num_experts,
                top_k=top_k,
                renormalize=renormalize,
                router_std=router_std,
                generator=g,
            ),
        )
    return new


# --------------------------------------------------------------------------------------------- HF path
def mixtral_from_dense(dense, *, num_experts: int, top_k: int, router_std: float = 0.02, seed: int = 0):
    """Upcycle an HF dense Mistral/Llama-style causal LM into a ``MixtralForCausalLM``.

    Every layer's MLP becomes E copies (Mixtral's router always renormalises, so logits equal the dense
    model's at init). Attention, norms, embeddings and head are copied.
    """
    from transformers import MixtralConfig, MixtralForCausalLM  # optional dependency, only for this path

    c = dense.config
    cfg = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None),
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=getattr(c, "rope_parameters", None),
        sliding_window=getattr(c, "sliding_window", None),
        attention_dropout=getattr(c, "attention_dropout", 0.0),
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
    )
    moe = MixtralForCausalLM(cfg).to(dense.dtype)
    sd = dense.state_dict()
    new_sd = {}
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        if ".mlp." not in k:
            new_sd[k] = v
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gw, uw, dw = sd[p + "gate_proj.weight"], sd[p + "up_proj.weight"], sd[p + "down_proj.weight"]
        gu = torch.cat([gw, uw], dim=0)  # (2H, D)
        new_sd[p + "experts.gate_up_proj"] = gu.expand(num_experts, *gu.shape).clone()  # (E, 2H, D)
        new_sd[p + "experts.down_proj"] = dw.expand(num_experts, *dw.shape).clone()  # (E, D, H)
        new_sd[p + "gate.weight"] = (
            torch.randn(num_experts, c.hidden_size, generator=g).to(gw.dtype) * router_std
        )
    missing, unexpected = moe.load_state_dict(new_sd, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if unexpected or (missing and not (missing == ["lm_head.weight"] and c.tie_word_embeddings)):
        raise RuntimeError(f"state-dict mismatch: missing {missing}, unexpected {unexpected}")
    return moe


# --------------------------------------------------------------------------------------------- BAM
class CausalSelfAttention(nn.Module):
    """Plain multi-head causal self-attention with ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (no bias).

    The attention format BAM mixes; x ``(B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(dim, dim, bias=False) for _ in range(4)
        )

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, self.num_heads, -1).transpose(1, 2)  # (B, heads, T, D/heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, D/heads)
        return self.o_proj(a.transpose(1, 2).reshape(b, s, d))  # (B, T, D)


class MixtureOfAttentionExperts(nn.Module):
    """BAM attention experts with soft routing: ``y = sum_i softmax(W_r x)_i * attn_i(x)``.

    Args:
        attentions: N attention modules ``(B, T, D) -> (B, T, D)`` (full experts: own Q, K, V, O).
        kv_shared: keep one K/V projection (the mean of the experts') and per-expert Q and O [P: abstract];
            requires ``CausalSelfAttention``-style modules.
        router_std: std of the new soft router.
    """

    def __init__(
        self,
        *,
        attentions: list[nn.Module],
        kv_shared: bool = False,
        router_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if len(attentions) < 1:
            raise ValueError("attentions must hold at least one module")
        self.kv_shared = kv_shared
        self.experts = nn.ModuleList(copy.deepcopy(a) for a in attentions)
        dim = self.experts[0].o_proj.out_features
        self.router = nn.Linear(dim, len(attentions), bias=False).to(self.experts[0].o_proj.weight.dtype)
        with torch.no_grad():
            self.router.weight.normal_(0.0, router_std, generator=generator)
        if kv_shared:
            first = self.experts[0]
            self.num_heads = first.num_heads
            self.k_proj, self.v_proj = copy.deepcopy(first.k_proj), copy.deepcopy(first.v_proj)
            with torch.no_grad():
                self.k_proj.weight.copy_(torch.stack([a.k_proj.weight for a in attentions]).mean(0))
                self.v_proj.weight.copy_(torch.stack([a.v_proj.weight for a in attentions]).mean(0))
            for a in self.experts:
                del a.k_proj, a.v_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.router(x).float().softmax(-1).to(x.dtype)  # (B, T, N)
        if not self.kv_shared:
            return sum(p[..., i : i + 1] * a(x) for i, a in enumerate(self.experts))
        b, s, d = x.shape
        k = self.k_proj(x).view(b, s, self.num_heads, -1).transpose(1, 2)  # (B, heads, T, D/heads)
        v = self.v_proj(x).view(b, s, self.num_heads, -1).transpose(1, 2)
        out = x.new_zeros(b, s, d)
        for i, a in enumerate(self.experts):
            q = a.q_proj(x).view(b, s, self.num_heads, -1).transpose(1, 2)  # (B, heads, T, D/heads)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
            out = out + p[..., i : i + 1] * a.o_proj(att)
        return out


def _ffn_experts(
    ffns: list[nn.Module],
    *,
    top_k: int,
    renormalize: bool | None,
    router_std: float,
    generator: torch.Generator,
) -> MoELayer:
    ws = [dense_ffn_weights(f) for f in ffns]
    d, h = ws[0][0].shape
    router = TopKRouter(dim=d, num_experts=len(ffns), top_k=top_k, renormalize=renormalize)
    with torch.no_grad():
        router.gate.weight.normal_(0.0, router_std, generator=generator)
    bank = SwiGLUExperts(num_experts=len(ffns), dim=d, hidden_dim=h)
    with torch.no_grad():
        bank.gate_proj.copy_(torch.stack([w[0] for w in ws]))  # (E, D, H)
        bank.up_proj.copy_(torch.stack([w[1] for w in ws]))  # (E, D, H)
        bank.down_proj.copy_(torch.stack([w[2] for w in ws]))  # (E, H, D)
    return MoELayer(router=router, experts=bank).to(dtype=ws[0][0].dtype)


def bam_merge(
    models: list[nn.Module],
    *,
    ffn_names: list[str],
    attention_names: list[str],
    top_k: int = 2,
    renormalize: bool | None = None,
    kv_shared: bool = False,
    router_std: float = 0.02,
    seed: int = 0,
) -> nn.Module:
    """BAM: build one mixture model from N dense models of identical architecture.

    Every parameter outside the named FFNs/attentions is averaged over the N models; each named FFN becomes
    a top-k ``MoELayer`` whose experts are the N models' FFNs; each named attention becomes a
    :class:`MixtureOfAttentionExperts` over the N attentions (soft routing).

    Returns:
        A new model (inputs are not modified). Its blocks must accept the ``MoEOutput`` of ``MoELayer``.
    """
    if not models:
        raise ValueError("models is empty")
    if not 1 <= top_k <= len(models):
        raise ValueError(f"top_k must be in [1, {len(models)}], got {top_k}")
    merged = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    keys = set(sds[0])
    for sd in sds[1:]:
        if set(sd) != keys:
            raise ValueError("models must share one architecture (state-dict keys differ)")
    with torch.no_grad():
        avg = {
            k: (
                torch.stack([sd[k].float() for sd in sds]).mean(0).to(sds[0][k].dtype)
                if sds[0][k].is_floating_point()
                else sds[0][k]
            )
            for k in keys
        }
    merged.load_state_dict(avg)
    g = torch.Generator().manual_seed(seed)
    for name in ffn_names:
        _set(
            merged,
            name,
            _ffn_experts(
                [_get(m, name) for m in models],
                top_k=top_k,
                renormalize=renormalize,
                router_std=router_std,
                generator=g,
            ),
        )
    for name in attention_names:
        _set(
            merged,
            name,
            MixtureOfAttentionExperts(
                attentions=[_get(m, name) for m in models],
                kv_shared=kv_shared,
                router_std=router_std,
                generator=g,
            ),
        )
    return merged
