"""MoELayer, SwiGLU, segment_ffn and ChainOfExpertsLayer against dense and hand-written oracles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_core.experts import SwiGLUExperts
from moe_core.layer import ChainOfExpertsLayer, MoELayer, SwiGLU, build_moe_layer, deepseek_moe, segment_ffn
from moe_core.reference import dense_mixture, reference_moe, swiglu_expert_fn
from moe_core.routers import TopKRouter

D, H = 8, 12
BACKENDS = ["loop", "padded", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_expert_equals_dense_ffn(backend):
    torch.manual_seed(0)
    ffn = SwiGLU(dim=D, hidden_dim=H).double()
    bank = SwiGLUExperts(num_experts=1, dim=D, hidden_dim=H, backend=backend).double()
    with torch.no_grad():
        bank.gate_proj.copy_(ffn.gate_proj[None])  # (1, D, H)
        bank.up_proj.copy_(ffn.up_proj[None])
        bank.down_proj.copy_(ffn.down_proj[None])
    layer = MoELayer(router=TopKRouter(dim=D, num_experts=1, top_k=1), experts=bank).double()
    x1 = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    out = layer(x1).output
    ref = ffn(x2)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)
    gate_grad, up_grad = bank.gate_up_proj.grad[0].chunk(2, dim=-1)  # (D, H) each
    for a, b in zip((gate_grad, up_grad, bank.down_proj.grad[0]), ffn.parameters(), strict=True):
        torch.testing.assert_close(a, b.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_equal_to_e_is_the_dense_soft_mixture(backend):
    torch.manual_seed(1)
    e = 5
    layer = build_moe_layer(dim=D, hidden_dim=H, num_experts=e, top_k=e, renormalize=True, backend=backend)
    layer = layer.double()
    x = torch.randn(17, D, dtype=torch.float64)
    out = layer(x).output
    probs = torch.softmax(x @ layer.router.gate.weight.T, dim=-1)  # (N, E) independent float64 softmax
    b = layer.experts
    ref = dense_mixture(x, probs, swiglu_expert_fn(b.gate_proj, b.up_proj, b.down_proj))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # router math is float32


@pytest.mark.parametrize("m", [1, 3, 4])
def test_segmented_ffn_with_all_parts_equals_the_ffn(m):
    torch.manual_seed(2)
    ffn = SwiGLU(dim=D, hidden_dim=H).double()
    bank = segment_ffn(ffn, m, backend="loop")
    assert bank.num_experts == m and bank.hidden_dim == H // m
    assert sum(p.numel() for p in bank.parameters()) == sum(p.numel() for p in ffn.parameters())
    x = torch.randn(9, D, dtype=torch.float64)
    idx = torch.arange(m).expand(9, m)  # (N, m) every token uses every segment
    out = bank(x, idx, torch.ones(9, m, dtype=torch.float64))
    torch.testing.assert_close(out, ffn(x), rtol=1e-12, atol=1e-12)


def test_segment_ffn_rejects_non_divisor():
    with pytest.raises(ValueError, match="m must"):
        segment_ffn(SwiGLU(dim=D, hidden_dim=H), 5)


def test_shared_experts_with_sigmoid_gate_match_manual_formula():
    torch.manual_seed(3)
    layer = build_moe_layer(
        dim=D, hidden_dim=H, num_experts=4, top_k=2, num_shared_experts=2, renormalize=False, shared_gate=True
    ).double()
    assert layer.shared_experts.hidden_dim == 2 * H  # K_s shared experts fused into one FFN of width K_s*H
    x = torch.randn(10, D, dtype=torch.float64)
    res = layer(x)
    r = res.routing
    routed = layer.experts(x, r.indices, r.weights.double(), r.mask)
    gate = torch.sigmoid(x @ layer.shared_gate.weight.T)  # (N, 1)
    torch.testing.assert_close(res.output, routed + gate * layer.shared_experts(x), rtol=1e-12, atol=1e-12)
    # no renormalisation: the weights are the raw softmax probabilities of the chosen experts
    torch.testing.assert_close(r.weights, r.probs.gather(1, r.indices))


def test_deepseek_builder_defaults():
    layer = deepseek_moe(dim=D, hidden_dim=4, num_experts=6, top_k=3, num_shared_experts=2)
    assert not layer.router.renormalize and layer.shared_gate is None
    assert layer.shared_experts.hidden_dim == 8 and layer.experts.num_experts == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_token_permutation_equivariance_and_shapes(backend):
    torch.manual_seed(4)
    layer = build_moe_layer(
        dim=D, hidden_dim=H, num_experts=6, top_k=2, num_shared_experts=1, backend=backend
    )
    x = torch.randn(3, 7, D)
    res = layer(x)
    assert res.output.shape == x.shape and res.routing.indices.shape == (21, 2)
    flat = layer(x.reshape(21, D)).output
    torch.testing.assert_close(res.output.reshape(21, D), flat)
    perm = torch.randperm(21)
    torch.testing.assert_close(layer(x.reshape(21, D)[perm]).output, flat[perm], rtol=1e-5, atol=1e-6)


def test_layer_bad_inputs():
    layer = build_moe_layer(dim=D, hidden_dim=H, num_experts=4, top_k=2)
    for bad in (torch.randn(D), torch.randn(2, 3, 4, D), torch.randn(5, D + 1), torch.randn(2, 3, D - 1)):
        with pytest.raises(ValueError, match="x must"):
            layer(bad)
    with pytest.raises(ValueError, match="shared_gate"):
        MoELayer(router=layer.router, experts=layer.experts, shared_gate=True)
    with pytest.raises(ValueError, match="backend"):
        build_moe_layer(dim=D, hidden_dim=H, num_experts=4, top_k=2, backend="triton")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top_k"):
        build_moe_layer(dim=D, hidden_dim=H, num_experts=4, top_k=5)


def test_layer_handles_empty_and_single_token():
    layer = build_moe_layer(dim=D, hidden_dim=H, num_experts=4, top_k=2, num_shared_experts=1)
    out0 = layer(torch.randn(2, 0, D)).output
    assert out0.shape == (2, 0, D)
    x1 = torch.randn(1, D)
    out1 = layer(x1).output
    r = layer.router(x1)
    expected = layer.experts(x1, r.indices, r.weights, None) + layer.shared_experts(x1)
    torch.testing.assert_close(out1, expected)


def test_bfloat16_layer():
    torch.manual_seed(5)
    layer = build_moe_layer(
        dim=16, hidden_dim=32, num_experts=4, top_k=2, num_shared_experts=1, shared_gate=True
    )
    x = torch.randn(2, 6, 16)
    ref = layer(x).output
    layer = layer.to(torch.bfloat16)
    xb = x.bfloat16().requires_grad_()
    res = layer(xb)
    assert res.output.dtype == torch.bfloat16 and res.routing.probs.dtype == torch.float32
    res.output.float().sum().backward()
    assert xb.grad is not None and layer.experts.gate_up_proj.grad.dtype == torch.bfloat16
    torch.testing.assert_close(res.output.float(), ref, rtol=6e-2, atol=6e-2)


# ---------------------------------------------------------------- Chain-of-Experts


def _coe(c: int, *, independent: bool = True, **kw) -> ChainOfExpertsLayer:
    routers = [TopKRouter(dim=D, num_experts=6, top_k=2) for _ in range(c if independent else 1)]
    return ChainOfExpertsLayer(
        routers=routers,
        experts=SwiGLUExperts(num_experts=6, dim=D, hidden_dim=H),
        num_iterations=c,
        shared_experts=SwiGLU(dim=D, hidden_dim=H),
        **kw,
    )


def test_coe_one_round_without_inner_residual_is_a_prenorm_moe_block():
    torch.manual_seed(6)
    coe = _coe(1, norm=nn.LayerNorm(D), inner_residual=False, outer_residual=True).double()
    block = MoELayer(router=coe.routers[0], experts=coe.experts, shared_experts=coe.shared_experts)
    norm = nn.LayerNorm(D).double()
    norm.load_state_dict(coe.norm.state_dict())
    h = torch.randn(3, 5, D, dtype=torch.float64)
    res = coe(h)
    torch.testing.assert_close(res.output, h + block(norm(h)).output, rtol=1e-12, atol=1e-12)
    assert isinstance(res.routing, list) and len(res.routing) == 1


@pytest.mark.parametrize("independent", [True, False])
def test_coe_rounds_match_manual_unrolling(independent):
    torch.manual_seed(7)
    coe = _coe(3, independent=independent).double()  # CoE defaults: inner residual, no outer residual
    h = torch.randn(11, D, dtype=torch.float64)
    z = h
    for t in range(3):
        router = coe.routers[t if independent else 0]
        r = router(z)
        z = z + coe.experts(z, r.indices, r.weights.double(), None) + coe.shared_experts(z)
    res = coe(h)
    torch.testing.assert_close(res.output, z, rtol=1e-12, atol=1e-12)
    assert len(res.routing) == 3 and coe.independent_gates == independent
    # expert parameters are shared across rounds: parameter count depends on C only through the routers
    n_router = sum(p.numel() for p in coe.routers[0].parameters())
    one = _coe(1)
    extra = sum(p.numel() for p in coe.parameters()) - sum(p.numel() for p in one.parameters())
    assert extra == (2 if independent else 0) * n_router


def test_coe_bad_router_count():
    with pytest.raises(ValueError, match="routers"):
        ChainOfExpertsLayer(
            routers=[TopKRouter(dim=D, num_experts=4, top_k=1)] * 2,
            experts=SwiGLUExperts(num_experts=4, dim=D, hidden_dim=H),
            num_iterations=3,
        )
    with pytest.raises(ValueError, match="num_iterations"):
        _coe(0)


def test_swiglu_bank_loads_the_two_parameter_state_dict_and_keeps_its_init():
    """The fused ``gate_up_proj`` still loads checkpoints with separate ``gate_proj``/``up_proj`` (a
    prefixed layer state dict included), and a seed gives the same initial weights as that layout did:
    gate, up, down drawn in that order as contiguous blocks."""
    e, d, h = 3, 8, 4
    torch.manual_seed(7)
    bound_in, bound_h = 1 / d**0.5, 1 / h**0.5
    gate = torch.empty(e, d, h).uniform_(-bound_in, bound_in)
    up = torch.empty(e, d, h).uniform_(-bound_in, bound_in)
    down = torch.empty(e, h, d).uniform_(-bound_h, bound_h)
    torch.manual_seed(7)
    bank = SwiGLUExperts(num_experts=e, dim=d, hidden_dim=h)
    for got, want in ((bank.gate_proj, gate), (bank.up_proj, up), (bank.down_proj, down)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    legacy = {"router.gate.weight": torch.randn(e, d), "experts.gate_proj": gate.flip(0),
              "experts.up_proj": up.flip(0), "experts.down_proj": down.flip(0)}  # fmt: skip
    layer = MoELayer(router=TopKRouter(dim=d, num_experts=e, top_k=2), experts=bank)
    layer.load_state_dict(legacy)
    assert set(layer.state_dict()) == {"router.gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    torch.testing.assert_close(bank.gate_up_proj, torch.cat([gate.flip(0), up.flip(0)], -1), rtol=0, atol=0)
    x = torch.randn(5, d, dtype=torch.float64)
    idx, w = torch.randint(0, e, (5, 2)), torch.rand(5, 2, dtype=torch.float64)
    want = reference_moe(x, idx, w, None, swiglu_expert_fn(gate.flip(0).double(), up.flip(0).double(),
                                                           down.flip(0).double()))  # fmt: skip
    torch.testing.assert_close(bank.double()(x, idx, w), want, rtol=1e-12, atol=1e-12)
