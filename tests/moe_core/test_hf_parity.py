"""Parity with an independent implementation: HF transformers' Mixtral and Qwen2-MoE sparse blocks.

The HF blocks are built from tiny random configs (nothing is downloaded); their weights are copied into moekit
layers, and both must give the same outputs (and the same input gradients).
"""

from __future__ import annotations

import pytest
import torch

from moe_core.experts import SwiGLUExperts, grouped_mm_works
from moe_core.layer import MoELayer, SwiGLU
from moe_core.routers import TopKRouter

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402

D, H, E, K = 16, 24, 6, 2
HF_IMPLS = ["eager"] + (["grouped_mm"] if grouped_mm_works(torch.device("cpu"), torch.float32) else [])
BACKENDS = ["loop", "padded", "auto"] + (["grouped_mm"] if "grouped_mm" in HF_IMPLS else [])


def _init_random(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _copy_hf_experts(hf_experts: torch.nn.Module, backend: str) -> SwiGLUExperts:
    """HF 5.x stores ``gate_up_proj (E, 2H, D)`` (gate rows first), ``down_proj (E, D, H)``; ``x @ W.T``."""
    e, two_h, d = hf_experts.gate_up_proj.shape
    h = two_h // 2
    bank = SwiGLUExperts(num_experts=e, dim=d, hidden_dim=h, backend=backend)
    with torch.no_grad():
        gu = hf_experts.gate_up_proj.detach()
        bank.gate_proj.copy_(gu[:, :h, :].transpose(1, 2))  # (E, D, H)
        bank.up_proj.copy_(gu[:, h:, :].transpose(1, 2))  # (E, D, H)
        bank.down_proj.copy_(hf_experts.down_proj.detach().transpose(1, 2))  # (E, H, D)
    return bank


def _compare(hf_block, layer, x) -> None:
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    ref = hf_block(x1)
    out = layer(x2).output
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hf_impl", HF_IMPLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixtral_sparse_moe_block(hf_impl, backend):
    cfg = transformers.MixtralConfig(
        hidden_size=D,
        intermediate_size=H,
        num_local_experts=E,
        num_experts_per_tok=K,
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = hf_impl
    hf = MixtralSparseMoeBlock(cfg).eval()
    _init_random(hf, seed=0)
    router = TopKRouter(dim=D, num_experts=E, top_k=K, renormalize=True)  # Mixtral renormalises the top-k
    with torch.no_grad():
        router.gate.weight.copy_(hf.gate.weight)
    layer = MoELayer(router=router, experts=_copy_hf_experts(hf.experts, backend)).eval()
    x = torch.randn(3, 10, D, generator=torch.Generator().manual_seed(1))
    _compare(hf, layer, x)


@pytest.mark.parametrize("hf_impl", HF_IMPLS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_qwen2_moe_sparse_block_with_gated_shared_expert(hf_impl, backend):
    cfg = transformers.Qwen2MoeConfig(
        hidden_size=D,
        moe_intermediate_size=H,
        shared_expert_intermediate_size=2 * H,
        num_experts=E,
        num_experts_per_tok=K,
        norm_topk_prob=False,
    )
    cfg._experts_implementation = hf_impl
    hf = Qwen2MoeSparseMoeBlock(cfg).eval()
    _init_random(hf, seed=2)
    router = TopKRouter(dim=D, num_experts=E, top_k=K, renormalize=False)  # Qwen2-MoE: raw softmax weights
    shared = SwiGLU(dim=D, hidden_dim=2 * H)
    with torch.no_grad():
        router.gate.weight.copy_(hf.gate.weight)
        shared.gate_proj.copy_(hf.shared_expert.gate_proj.weight.T)  # nn.Linear (H, D) -> (D, H)
        shared.up_proj.copy_(hf.shared_expert.up_proj.weight.T)
        shared.down_proj.copy_(hf.shared_expert.down_proj.weight.T)
    layer = MoELayer(
        router=router, experts=_copy_hf_experts(hf.experts, backend), shared_experts=shared, shared_gate=True
    ).eval()
    with torch.no_grad():
        layer.shared_gate.weight.copy_(hf.shared_expert_gate.weight)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(3))
    _compare(hf, layer, x)
