"""The fast paths of the expert banks (issue 17) against independent oracles: the fused gated activation
against plain autograd, every activation of the grouped SwiGLU bank against the slow reference, the
``embedding_bag`` gather-sum against ``index_select`` + ``sum``, and ``auto``'s backend choice."""

from __future__ import annotations

import time

import pytest
import torch

import moe_core.experts as experts_mod
from moe_core.experts import _ACTIVATIONS, SwiGLUExperts, _GatedAct, _gather_sum, grouped_mm_works
from moe_core.reference import fused_swiglu_expert_fn, reference_moe

HAS_GMM = grouped_mm_works(torch.device("cpu"), torch.float32)
ACTS = ["silu", "gelu", "gelu_tanh", "relu"]


def _plain_gated(gu: torch.Tensor, ws: torch.Tensor | None, activation: str) -> torch.Tensor:
    g, u = gu.chunk(2, dim=1)
    h = _ACTIVATIONS[activation](g) * u
    return h if ws is None else h * ws


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("scaled", [True, False])
def test_gated_act_matches_autograd(activation, scaled):
    gen = torch.Generator().manual_seed(len(activation) + scaled)
    gu = torch.randn(37, 10, generator=gen, dtype=torch.float64)
    gu[0, 0] = 0.0  # relu's kink: both take the derivative 0 there
    ws = torch.rand(37, 1, generator=gen, dtype=torch.float64) if scaled else None
    grad = torch.randn(37, 5, generator=gen, dtype=torch.float64)
    ins = [gu.clone().requires_grad_(), None if ws is None else ws.clone().requires_grad_()]
    ref = [gu.clone().requires_grad_(), None if ws is None else ws.clone().requires_grad_()]
    out = _GatedAct.apply(ins[0], ins[1], activation)
    want = _plain_gated(ref[0], ref[1], activation)
    torch.testing.assert_close(out, want, rtol=1e-14, atol=1e-14)
    out.backward(grad)
    want.backward(grad)
    for a, b in zip(ins, ref, strict=True):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-13, atol=1e-13)


def test_gated_act_gradcheck():
    gen = torch.Generator().manual_seed(0)
    gu = torch.randn(6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    ws = torch.rand(6, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _GatedAct.apply(a, b, "silu"), (gu, ws))


@pytest.mark.skipif(not HAS_GMM, reason="torch grouped_mm not available")
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dim,hidden", [(16, 4), (8, 12)])  # H < D: weights inside the activation; H > D
@pytest.mark.parametrize("masked", [False, True])
def test_grouped_swiglu_bank_matches_reference(activation, dim, hidden, masked):
    torch.manual_seed(1)
    e, k, n = 5, 3, 29
    bank = SwiGLUExperts(
        num_experts=e, dim=dim, hidden_dim=hidden, backend="grouped_mm", activation=activation
    )
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, dim, generator=gen).requires_grad_()
    idx = torch.randint(0, e, (n, k), generator=gen)
    w = torch.rand(n, k, generator=gen).requires_grad_()
    mask = torch.rand(n, k, generator=gen) < 0.7 if masked else None
    g = torch.randn(n, dim, generator=gen)
    out = bank(x, idx, w, mask)
    (out * g).sum().backward()

    ps = [p.detach().double().requires_grad_() for p in bank.parameters()]
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference_moe(xr, idx, wr, mask, fused_swiglu_expert_fn(*ps, act=_ACTIVATIONS[activation]))
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    for got, want in [(x, xr), (w, wr), *zip(bank.parameters(), ps, strict=True)]:
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("zero_row", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_gather_sum_equals_index_select_sum(dtype, zero_row, k):
    """``embedding_bag`` (float dtypes) and the ``index_select`` fallback (others) give the plain sum."""
    gen = torch.Generator().manual_seed(k)
    src = torch.randint(-50, 50, (9, 4), generator=gen).to(dtype)  # small integers: every sum is exact
    idx = torch.randint(0, 10 if zero_row else 9, (6 * k,), generator=gen)
    padded = torch.cat([src, src.new_zeros(1, 4)])
    want = padded[idx].view(6, k, 4).sum(1).to(dtype)
    got = _gather_sum(src, idx, k, zero_row)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_GMM, reason="torch grouped_mm not available")
def test_auto_weighs_padding_against_kernel_calls(monkeypatch):
    """Untimed rule: balanced routing pads when the padding rows cost fewer multiply-adds than E kernel calls,
    else runs ``grouped_mm``; skewed routing never pads."""
    monkeypatch.setenv("MOEKIT_DISPATCH_TUNING", "0")
    e, n = 8, 64
    idx = torch.arange(n * 2).remainder(e).view(n, 2)  # every expert 16 pairs
    idx[0, 0] = 1  # experts 0, 1 get 15, 17 pairs: 8 * 17 - 128 = 8 padding rows, 8 * 16 * 32 MACs
    w = torch.rand(n, 2)
    bank = SwiGLUExperts(num_experts=e, dim=16, hidden_dim=32)
    monkeypatch.setattr(experts_mod, "_CALL_MACS", 8 * 16 * 32 // e + 1)
    bank(torch.randn(n, 16), idx, w)
    assert bank.last_backend == "padded"
    monkeypatch.setattr(experts_mod, "_CALL_MACS", 8 * 16 * 32 // e - 1)
    bank(torch.randn(n, 16), idx, w)
    assert bank.last_backend == "grouped_mm"
    skewed = torch.zeros(n, 2, dtype=torch.long)
    skewed[:, 1] = 1
    monkeypatch.setattr(experts_mod, "_CALL_MACS", 1 << 30)
    bank(torch.randn(n, 16), skewed, w)
    assert bank.last_backend == "grouped_mm"


def test_auto_pads_when_grouped_mm_cannot_run():
    """Balanced but grouped_mm impossible (float64): ``padded``, as before the cost rule."""
    bank = SwiGLUExperts(num_experts=4, dim=8, hidden_dim=8).double()
    idx = torch.arange(32).remainder(4).view(16, 2)
    bank(torch.randn(16, 8, dtype=torch.float64), idx, torch.rand(16, 2, dtype=torch.float64))
    assert bank.last_backend == "padded"


def test_gated_act_is_used_by_the_grouped_bank(monkeypatch):
    """The grouped SwiGLU bank runs the fused activation (so the tests above cover the path it takes)."""
    if not HAS_GMM:
        pytest.skip("torch grouped_mm not available")
    calls = []
    real = _GatedAct.apply
    monkeypatch.setattr(_GatedAct, "apply", lambda *a: calls.append(a[2]) or real(*a))
    bank = SwiGLUExperts(num_experts=3, dim=16, hidden_dim=4, backend="grouped_mm", activation="gelu")
    bank(torch.randn(5, 16), torch.randint(0, 3, (5, 2)), torch.rand(5, 2))
    assert calls == ["gelu"]


class _Slowed(SwiGLUExperts):
    """A bank whose ``slow`` backend sleeps, so that the tuner has a clear winner."""

    slow = "padded"

    def _forward_padded(self, *a):
        if self.slow == "padded":
            time.sleep(0.05)
        return super()._forward_padded(*a)

    def _forward_grouped_mm(self, *a, **kw):
        if self.slow == "grouped_mm":
            time.sleep(0.05)
        return super()._forward_grouped_mm(*a, **kw)


@pytest.mark.skipif(not HAS_GMM, reason="torch grouped_mm not available")
@pytest.mark.parametrize("slow,fast", [("padded", "grouped_mm"), ("grouped_mm", "padded")])
def test_auto_times_both_backends_and_keeps_the_faster(monkeypatch, slow, fast):
    monkeypatch.setattr(experts_mod, "_TUNERS", {})
    monkeypatch.setattr(experts_mod, "_TUNE_MIN_MACS", 0)
    monkeypatch.setattr(experts_mod, "_TUNE_EVERY", 1000)
    torch.manual_seed(0)
    bank = _Slowed(num_experts=4, dim=8, hidden_dim=8)
    bank.slow = slow
    ref = SwiGLUExperts(num_experts=4, dim=8, hidden_dim=8, backend="loop")
    ref.load_state_dict(bank.state_dict())
    x, idx, w = torch.randn(16, 8), torch.arange(32).remainder(4).view(16, 2), torch.rand(16, 2)
    ran = []
    monkeypatch.setattr(experts_mod, "_TUNE_TRIALS", 3)
    for _ in range(2 * experts_mod._TUNE_TRIALS + 3):
        out = bank(x, idx, w)
        ran.append(bank.last_backend)
        torch.testing.assert_close(out, ref(x, idx, w), rtol=1e-5, atol=1e-6)  # every call is right
    trials = ran[: 2 * experts_mod._TUNE_TRIALS]
    assert sorted(set(trials)) == ["grouped_mm", "padded"] and trials.count(slow) == experts_mod._TUNE_TRIALS
    assert ran[2 * experts_mod._TUNE_TRIALS :] == [fast] * 3


@pytest.mark.skipif(not HAS_GMM, reason="torch grouped_mm not available")
def test_tuner_measures_again_after_its_period(monkeypatch):
    monkeypatch.setattr(experts_mod, "_TUNERS", {})
    monkeypatch.setattr(experts_mod, "_TUNE_MIN_MACS", 0)
    monkeypatch.setattr(experts_mod, "_TUNE_EVERY", 12)  # calls 1-6 timed, 7-11 chosen, 12-17 timed again
    monkeypatch.setattr(experts_mod, "_TUNE_TRIALS", 3)
    bank = _Slowed(num_experts=4, dim=8, hidden_dim=8)
    x, idx, w = torch.randn(16, 8), torch.arange(32).remainder(4).view(16, 2), torch.rand(16, 2)
    ran = []
    for i in range(20):
        bank.slow = "padded" if i < 11 else "grouped_mm"  # the machine's load changes before call 12
        bank(x, idx, w)
        ran.append(bank.last_backend)
    assert ran[6:11] == ["grouped_mm"] * 5 and ran[17:] == ["padded"] * 3


def test_finite_logits_equals_the_clamp_composition():
    """The router's one-pass guard (issue 17) against autograd of ``clamp(nan_to_num(z))``: values and
    gradients, at NaN, +/-inf, exactly +/-LOGIT_BOUND, beyond it and at ordinary logits."""
    from moe_core.routers import LOGIT_BOUND, finite_logits

    b = LOGIT_BOUND
    vals = [float("nan"), float("inf"), -float("inf"), b, -b, 2 * b, -2 * b, 0.0, 1.5, -3.25]
    z1 = torch.tensor(vals).requires_grad_()
    z2 = torch.tensor(vals).requires_grad_()
    grad = torch.arange(1.0, len(vals) + 1)
    got = finite_logits(z1)
    want = torch.nan_to_num(z2, nan=0.0, posinf=b, neginf=-b).clamp(-b, b)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.backward(grad)
    want.backward(grad)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=0, atol=0)


def test_router_finite_check_survives_an_overflowing_sum():
    """The finite-input check sums x first; finite values whose sum overflows must still pass, and one NaN or
    inf anywhere must still be refused."""
    from moe_core.routers import TopKRouter

    router = TopKRouter(dim=4, num_experts=3, top_k=2)
    big = torch.full((5, 4), 3e38)  # finite; the sum is inf in float32
    assert not torch.isfinite(big.sum())
    assert torch.isfinite(router(big).weights).all()
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(5, 4)
        x[3, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            router(x)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("bags", [True, False])
def test_padded_bank_with_and_without_bags_matches_reference(monkeypatch, masked, bags):
    """``padded`` builds its zero rows as empty ``embedding_bag`` bags; dtypes that function lacks take the
    appended-zero-row path (forced here by emptying ``_BAG_DTYPES``). Both equal the reference."""
    if not bags:
        monkeypatch.setattr(experts_mod, "_BAG_DTYPES", ())
    torch.manual_seed(3)
    e, k, n, d, h = 4, 2, 19, 8, 12
    bank = SwiGLUExperts(num_experts=e, dim=d, hidden_dim=h, backend="padded").double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
    idx = torch.randint(0, e, (n, k), generator=gen)
    w = torch.rand(n, k, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.rand(n, k, generator=gen) < 0.6 if masked else None
    g = torch.randn(n, d, generator=gen, dtype=torch.float64)
    (bank(x, idx, w, mask) * g).sum().backward()
    ps = [p.detach().clone().requires_grad_() for p in bank.parameters()]
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = reference_moe(xr, idx, wr, mask, fused_swiglu_expert_fn(*ps))
    (ref * g).sum().backward()
    for got, want in [(x, xr), (w, wr), *zip(bank.parameters(), ps, strict=True)]:
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


def test_small_problems_are_not_timed(monkeypatch):
    """Below ``_TUNE_MIN_MACS`` the static rule decides: the same backend on every call, no tuner made."""
    monkeypatch.setattr(experts_mod, "_TUNERS", {})
    bank = SwiGLUExperts(num_experts=4, dim=8, hidden_dim=8)
    x, idx, w = torch.randn(16, 8), torch.arange(32).remainder(4).view(16, 2), torch.rand(16, 2)
    ran = set()
    for _ in range(8):
        bank(x, idx, w)
        ran.add(bank.last_backend)
    assert ran == {"padded"} and experts_mod._TUNERS == {}
