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
    "sigmoid": lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=1, route_scale=2.5, use_bias=False),
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
