"""Router numerics: the router gets a task-loss gradient with top-1 routing (closed form through MoELayer),
and every router gives finite routing and gradients on extreme but finite inputs, and rejects non-finite
ones."""

from __future__ import annotations

import pytest
import torch

from moe_core import routers as R
from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer

D = 8


def _x(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _init(router: torch.nn.Module, seed: int = 1, std: float = 1.0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return router


# ---------------------------------------------------------------- top-1 routing carries router gradient
TOP1 = {
    "topk": lambda: R.TopKRouter(dim=D, num_experts=4, top_k=1),
    "sigmoid": lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=1, routed_scaling_factor=2.5,
                                           use_bias=False),
}


@pytest.mark.parametrize("name", sorted(TOP1))
def test_top1_defaults_give_the_router_its_task_loss_gradient(name):
    """``d(sum(out * g)) / dW_g`` through MoELayer equals the closed form ``sum_t a_t dw_t/dz_t x_t`` with
    ``a_t = <g_t, E_{i_t}(x_t)>``; with the old default (renormalised top-1, weight exactly 1) it was ~0."""
    torch.manual_seed(0)
    router = _init(TOP1[name]())
    bank = SwiGLUExperts(num_experts=4, dim=D, hidden_dim=16, backend="loop").double()
    layer = MoELayer(router=router, experts=bank)
    x = _x(32).double()
    g = torch.randn(32, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    res = layer(x)
    (res.output * g).sum().backward()
    grad = router.gate.weight.grad
    assert float(grad.norm()) > 1e-4

    with torch.no_grad():  # closed form in float64, independent of the router code
        w = router.gate.weight.double()
        z = x @ w.T  # (N, E)
        idx = res.routing.indices[:, 0]  # (N,)
        ones = torch.ones(32, 1, dtype=torch.float64)
        a = (bank(x, idx[:, None], ones, None) * g).sum(-1)  # (N,) <g_t, E_i(x_t)>
        onehot = torch.nn.functional.one_hot(idx, 4).double()  # (N, E)
        if name == "topk":
            p = z.softmax(-1)
            p_i = p.gather(1, idx[:, None])  # (N, 1)
            dw_dz = p_i * (onehot - p)  # d p_i / d z_j
        else:
            s = z.sigmoid()
            dw_dz = 2.5 * onehot * s * (1 - s)  # d (2.5 sigmoid(z_i)) / d z_j
        expected = (a[:, None] * dw_dz).T @ x  # (E, D)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: R.TopKRouter(dim=D, num_experts=4, top_k=1, renormalize=True),
        lambda: R.TopKRouter(dim=D, num_experts=4, top_k=1, renormalize=True, capacity_factor=1.0),
        lambda: R.GroupedRouter(dim=D, num_experts=4, top_k=1, num_groups=1, renormalize=True),
        lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=1, renormalize=True),
    ],
)
def test_explicit_renormalize_with_top1_is_refused(make):
    with pytest.raises(ValueError, match="renormalize=True with top_k=1.*no gradient from the task loss"):
        make()


def test_renormalize_none_resolves_by_k():
    assert not R.TopKRouter(dim=D, num_experts=4, top_k=1).renormalize
    assert R.TopKRouter(dim=D, num_experts=4, top_k=2).renormalize
    assert not R.TopKRouter(dim=D, num_experts=4, top_k=2, renormalize=False).renormalize
    assert not R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=1).renormalize
    assert R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2).renormalize
    assert not R.GroupedRouter(dim=D, num_experts=4, top_k=2, num_groups=2).renormalize  # MoGE: raw scores
    assert R.GroupedRouter(dim=D, num_experts=4, top_k=2, num_groups=2, renormalize=True).renormalize


# ---------------------------------------------------------------- extreme inputs: every router, fp32 and bf16
# name -> (factory, training mode); every router class, noisy and DTS in both modes, DeepSeek with/without
# groups and bias
ALL = {
    "topk": (lambda: R.TopKRouter(dim=D, num_experts=4, top_k=2), True),
    "topk1": (lambda: R.TopKRouter(dim=D, num_experts=4, top_k=1), True),
    "topk_capacity": (lambda: R.TopKRouter(dim=D, num_experts=4, top_k=2, capacity_factor=0.5), True),
    "topk_jitter": (lambda: R.TopKRouter(dim=D, num_experts=4, top_k=2, jitter=0.1), True),
    "noisy_train": (lambda: R.NoisyTopKRouter(dim=D, num_experts=4, top_k=2), True),
    "noisy_eval": (lambda: R.NoisyTopKRouter(dim=D, num_experts=4, top_k=2), False),
    "noisy_no_eps": (lambda: R.NoisyTopKRouter(dim=D, num_experts=4, top_k=2, noise_epsilon=0.0), True),
    "expert_choice": (lambda: R.ExpertChoiceRouter(dim=D, num_experts=4), True),
    "top_p": (lambda: R.TopPRouter(dim=D, num_experts=4), True),
    "null": (lambda: R.NullExpertRouter(dim=D, num_experts=4, num_null=2, top_k=3), True),
    "grouped": (lambda: R.GroupedRouter(dim=D, num_experts=4, top_k=2, num_groups=2), True),
    "grouped_renorm": (lambda: R.GroupedRouter(dim=D, num_experts=4, top_k=2, num_groups=2, renormalize=True),
                       True),
    "sigmoid_bias": (lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2, routed_scaling_factor=2.5),
                     True),
    "sigmoid_plain": (lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2, routed_scaling_factor=2.5,
                                                  use_bias=False), True),
    "sigmoid_groups_bias": (lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2, num_groups=2,
                                                        topk_groups=1, routed_scaling_factor=2.5), True),
    "sigmoid_groups": (lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2, num_groups=2, topk_groups=1,
                                                   routed_scaling_factor=2.5, use_bias=False), True),
    "softmax_v2_renorm": (lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2, score_func="softmax",
                                                      num_groups=2, topk_groups=1, routed_scaling_factor=2.5),
                          True),
    "dts_train": (lambda: R.DenseToSparseRouter(dim=D, num_experts=4, temperature=0.1), True),
    "dts_eval": (lambda: R.DenseToSparseRouter(dim=D, num_experts=4), False),
}
INPUTS = ["below_-90", "huge_logits", "overflow_same_sign", "overflow_mixed_signs"]
DTYPES = [torch.float32, torch.bfloat16]


def _extreme(router: torch.nn.Module, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Set the router's weights and return ``x (N, D)`` for one kind of extreme (all finite) input."""
    g = torch.Generator().manual_seed(3)
    n = 24
    big = torch.finfo(dtype).max if dtype == torch.bfloat16 else 1e30  # bf16: the largest finite values
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if getattr(router, "bias", None) is not None:
            router.bias.copy_(torch.randn(router.bias.shape, generator=g) * 0.1)
        if kind == "below_-90":  # x > 0 and negative router rows: every logit in about [-200, -100]
            x = 1.0 + 0.5 * torch.rand(n, D, generator=g)  # (N, D) in [1, 1.5]
            for lin in (router.gate, getattr(router, "null_gate", None)):
                if lin is not None:
                    c = 100.0 + 20.0 * torch.rand(lin.weight.shape[0], 1, generator=g)  # (E, 1)
                    lin.weight.copy_(-c / D * (1 + 0.1 * torch.rand(lin.weight.shape, generator=g)))
        elif kind == "huge_logits":  # finite float32 logits of size ~1e30 (bf16: ~1e37)
            x = torch.randn(n, D, generator=g) * (1e30 if dtype == torch.float32 else 1e37)
        elif kind == "overflow_same_sign":  # every product overflows float32 with one sign per expert row
            x = (0.5 + 0.5 * torch.rand(n, D, generator=g)) * big  # (N, D) in [big / 2, big]
            for lin in (router.gate, getattr(router, "null_gate", None), getattr(router, "noise", None)):
                if lin is not None:
                    sign = torch.where(torch.arange(lin.weight.shape[0]) % 2 == 0, 1.0, -1.0)[:, None]
                    lin.weight.copy_(sign * (1.0 + torch.rand(lin.weight.shape, generator=g)) * 1e9)
        else:  # mixed signs: +inf and -inf partial products in one dot product (NaN without a guard)
            sign = torch.where(torch.rand(n, D, generator=g) < 0.5, 1.0, -1.0)
            x = sign * (0.5 + 0.5 * torch.rand(n, D, generator=g)) * big
            for lin in (router.gate, getattr(router, "null_gate", None), getattr(router, "noise", None)):
                if lin is not None:
                    lin.weight.mul_(1e9)
    router.to(dtype)
    x = x.to(dtype)
    assert torch.isfinite(x).all()
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("name", sorted(ALL))
def test_extreme_finite_inputs_give_finite_routing_and_gradients(name, kind, dtype):
    make, training = ALL[name]
    torch.manual_seed(0)
    router = make().train(training)
    x = _extreme(router, kind, dtype)
    raw = (x.float() @ router.gate.weight.float().T).detach()  # (N, E) unguarded float32 logits
    if kind == "below_-90":
        assert float(raw.max()) < -90
    elif kind.startswith("overflow"):
        assert not torch.isfinite(raw).all()  # the fixture really overflows float32
    out = router(x)
    for field in ("logits", "probs", "weights"):
        t = getattr(out, field)
        assert t.dtype == torch.float32 and torch.isfinite(t).all(), field
    assert (out.weights >= 0).all()
    if getattr(router, "renormalize", False) and isinstance(router, R.SigmoidTopKRouter):
        torch.testing.assert_close(out.weights.sum(-1), torch.full((24,), 2.5))
    out.weights.sum().backward(retain_graph=True)
    grads = [p.grad for p in router.parameters() if p.grad is not None]
    assert router.gate.weight.grad is not None
    assert all(torch.isfinite(gr).all() for gr in grads)
    if "load_probs" in out.aux:
        lp = out.aux["load_probs"]
        assert torch.isfinite(lp).all() and ((lp >= 0) & (lp <= 1)).all()
        router.zero_grad()
        lp.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in router.parameters() if p.grad is not None)


def test_sigmoid_weights_below_minus_90_are_the_renormalised_scores():
    """sigmoid(z) underflows to 0 below about -104 (and loses precision below -88): weights are still
    ``sigmoid(z_i) / sum_j sigmoid(z_j)`` over the selected experts, i.e. ``softmax(z_sel)`` in this tail."""
    r = R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2, routed_scaling_factor=2.5, use_bias=False)
    x = _extreme(r, "below_-90", torch.float32)
    out = r(x)
    z = out.logits.gather(1, out.indices).double()  # (N, K)
    expected = 2.5 * torch.nn.functional.logsigmoid(z).softmax(-1)  # float64 reference
    torch.testing.assert_close(out.weights.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.indices.sort(-1).values, out.logits.topk(2, -1).indices.sort(-1).values)


@pytest.mark.parametrize("bad", ["+inf", "-inf", "nan"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(ALL))
def test_non_finite_inputs_are_rejected_naming_x(name, dtype, bad):
    make, training = ALL[name]
    router = make().train(training).to(dtype)
    x = _x(6).to(dtype)
    x[2, 3] = float(bad)
    with pytest.raises(ValueError, match=r"^x contains non-finite"):
        router(x)


@pytest.mark.parametrize("training", [False, True])
def test_noisy_load_probs_with_vanishing_noise_std(training):
    """``noise_epsilon=0`` and a noise row far below zero: softplus underflows to a zero std. Tied clean
    logits (the paper's zero initialisation) then gave ``0 / 0`` and torch.distributions rejected the NaN; the
    std is floored, so every expert gets ``Phi(0) = 1/2`` in eval, and finite probabilities in training."""
    r = R.NoisyTopKRouter(dim=D, num_experts=4, top_k=2, noise_epsilon=0.0).train(training)
    with torch.no_grad():
        r.noise.weight.fill_(-100.0)  # x > 0: noise logits about -800, softplus = 0 in float32
    x = torch.rand(6, D, generator=torch.Generator().manual_seed(0)) + 0.5
    assert float(torch.nn.functional.softplus(x @ r.noise.weight.T).max().detach()) == 0.0
    out = r(x)
    lp = out.aux["load_probs"]
    assert torch.isfinite(lp).all() and ((lp >= 0) & (lp <= 1)).all()
    if not training:
        torch.testing.assert_close(lp, torch.full((6, 4), 0.5))
