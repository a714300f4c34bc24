"""Every dispatch backend of the expert banks equals the slow reference (forward and all gradients)."""

from __future__ import annotations

import logging
import zlib

import pytest
import torch
import torch.nn.functional as F

import moe_core.experts as experts_mod
from moe_core.experts import MLPExperts, SwiGLUExperts, grouped_mm_works
from moe_core.reference import fused_swiglu_expert_fn, mlp_expert_fn, reference_moe

E, D, H, K = 5, 8, 12, 3  # D, H multiples of 4: grouped_mm's 16-byte stride rule holds in float32

HAS_GMM = grouped_mm_works(torch.device("cpu"), torch.float32)
BACKENDS = [
    ("loop", torch.float64),
    ("padded", torch.float64),
    ("auto", torch.float64),
    ("auto", torch.float32),
    pytest.param(
        "grouped_mm",
        torch.float32,
        marks=pytest.mark.skipif(not HAS_GMM, reason="torch grouped_mm not available"),
    ),
]


def _bank(
    kind: str, backend: str, dtype: torch.dtype, seed: int = 0, dim: int = D, hidden: int = H
) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "swiglu":
        bank = SwiGLUExperts(num_experts=E, dim=dim, hidden_dim=hidden, backend=backend)
    else:
        bank = MLPExperts(num_experts=E, dim=dim, hidden_dim=hidden, backend=backend, activation="gelu")
    return bank.to(dtype)


def _routing(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(indices (N, K), mask (N, K) | None)`` for a named routing scenario."""
    idx = torch.randint(0, E, (n, K), generator=gen)
    mask = None
    if kind == "skewed":  # most pairs on expert 0; experts 3 and 4 get nothing
        idx = torch.where(
            torch.rand(n, K, generator=gen) < 0.8, 0, torch.randint(0, 3, (n, K), generator=gen)
        )
    elif kind == "duplicates":  # the same expert twice in one token: contributions add up
        idx[:, 1] = idx[:, 0]
    elif kind == "masked":
        mask = torch.rand(n, K, generator=gen) < 0.6
        mask[0] = False  # a token with no expert at all
    elif kind == "all_masked":
        mask = torch.zeros(n, K, dtype=torch.bool)
    elif kind == "one_expert":
        idx.fill_(2)
    return idx, mask


def _reference(bank: torch.nn.Module) -> tuple[list[torch.Tensor], object]:
    ps = [p.detach().double().requires_grad_() for p in bank.parameters()]
    if isinstance(bank, SwiGLUExperts):
        return ps, fused_swiglu_expert_fn(*ps)
    return ps, mlp_expert_fn(*ps, F.gelu)


def _check(bank, x, idx, w, mask, upstream: str, tol: float) -> None:
    """Compare output and gradients (x, routing weights, every parameter) with the float64 reference."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = bank(x, idx, w, mask)
    g = None if upstream == "sum" else torch.randn_like(out)
    (out.sum() if g is None else (out * g).sum()).backward()  # "sum": stride-0 upstream gradient

    ps, fn = _reference(bank)
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    ref = reference_moe(xr, idx, wr, mask, fn)
    if ref.requires_grad:  # not when every slot is masked: then every reference gradient is zero
        (ref.sum() if g is None else (ref * g.double()).sum()).backward()

    assert out.shape == ref.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    for got, want in [(x, xr), (w, wr), *zip(bank.parameters(), ps, strict=True)]:
        # a tensor outside the graph (everything masked) has grad None, which means zero
        actual = got.grad if got.grad is not None else torch.zeros_like(got)
        expected = want.grad if want.grad is not None else torch.zeros_like(want)
        torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
@pytest.mark.parametrize("scenario", ["random", "skewed", "duplicates", "masked", "all_masked", "one_expert"])
@pytest.mark.parametrize("upstream", ["sum", "random"])
def test_backend_matches_reference(backend, dtype, kind, scenario, upstream):
    # crc32, not hash(): str hashes are salted per process (PYTHONHASHSEED), so hash() gave each run new data
    gen = torch.Generator().manual_seed(zlib.crc32(f"{scenario}-{upstream}".encode()))
    n = 11
    bank = _bank(kind, backend, dtype)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64).to(dtype)
    idx, mask = _routing(scenario, n, gen)
    w = torch.rand(n, K, generator=gen, dtype=torch.float64).to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    _check(bank, x, idx, w, mask, upstream, tol)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("kind", ["swiglu", "mlp"])
@pytest.mark.parametrize("scenario", ["random", "skewed"])
def test_narrow_experts_scale_the_hidden_side(backend, dtype, kind, scenario):
    """H < D (fine-grained experts): the banks scale the hidden rows, not the outputs, by the combine weights;
    output and all gradients must still equal the reference."""
    d = 16
    bank = _bank(kind, backend, dtype, seed=1, dim=d, hidden=4)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(23, d, generator=gen, dtype=torch.float64).to(dtype)
    idx, mask = _routing(scenario, 23, gen)
    w = torch.rand(23, K, generator=gen, dtype=torch.float64).to(dtype)
    _check(bank, x, idx, w, mask, "random", 1e-12 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("n", [0, 1])
def test_tiny_token_counts(backend, dtype, n):
    bank = _bank("swiglu", backend, dtype)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64).to(dtype)
    idx, _ = _routing("random", n, gen)
    w = torch.rand(n, K, generator=gen, dtype=torch.float64).to(dtype)
    _check(bank, x, idx, w, None, "sum", 1e-12 if dtype == torch.float64 else 2e-5)
    if n == 0:
        assert all(float(p.grad.abs().max()) == 0.0 for p in bank.parameters())


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_token_permutation_equivariance(backend, dtype):
    bank = _bank("swiglu", backend, dtype)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(13, D, generator=gen, dtype=dtype)
    idx, mask = _routing("masked", 13, gen)
    w = torch.rand(13, K, generator=gen, dtype=dtype)
    perm = torch.randperm(13, generator=gen)
    with torch.no_grad():
        a = bank(x, idx, w, mask)[perm]
        b = bank(x[perm], idx[perm], w[perm], mask[perm])
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_backends_agree_with_each_other_at_scale():
    """All backends on one float32 problem large enough for real groups (E=16, T=300, k=4, skew)."""
    torch.manual_seed(0)
    e, d, h, n, k = 16, 32, 48, 300, 4
    banks = {
        b: SwiGLUExperts(num_experts=e, dim=d, hidden_dim=h, backend=b) for b in ("loop", "padded", "auto")
    }
    if HAS_GMM:
        banks["grouped_mm"] = SwiGLUExperts(num_experts=e, dim=d, hidden_dim=h, backend="grouped_mm")
    for b in banks.values():
        b.load_state_dict(banks["loop"].state_dict())
    x = torch.randn(n, d)
    logits = torch.randn(n, e) + torch.linspace(3, 0, e)  # skewed toward low ids
    w, idx = logits.softmax(-1).topk(k, -1)
    outs = {name: b(x, idx, w) for name, b in banks.items()}
    for name, o in outs.items():
        torch.testing.assert_close(o, outs["loop"], rtol=1e-5, atol=1e-5, msg=name)


class _Recording(SwiGLUExperts):
    """Records how many rows each backend's expert computation receives."""

    def _ffn_loop(self, xs, counts):
        self.rows = xs.shape[0]
        return super()._ffn_loop(xs, counts)

    def _ffn_grouped(self, xs, offs, ws):
        self.rows = int(offs[-1])
        return super()._ffn_grouped(xs, offs, ws)


@pytest.mark.parametrize(
    "backend",
    ["loop", pytest.param("grouped_mm", marks=pytest.mark.skipif(not HAS_GMM, reason="no grouped_mm"))],
)
def test_masked_slots_cost_no_flops(backend):
    bank = _Recording(num_experts=E, dim=D, hidden_dim=H, backend=backend)
    gen = torch.Generator().manual_seed(5)
    idx, mask = _routing("masked", 20, gen)
    bank(torch.randn(20, D), idx, torch.rand(20, K), mask)
    assert bank.rows == int(mask.sum()) < idx.numel()


@pytest.mark.skipif(not HAS_GMM, reason="torch grouped_mm not available")
def test_grouped_mm_has_no_host_sync(monkeypatch):
    bank = SwiGLUExperts(num_experts=E, dim=D, hidden_dim=H, backend="grouped_mm")
    gen = torch.Generator().manual_seed(6)
    idx, mask = _routing("masked", 9, gen)
    x, w = torch.randn(9, D), torch.rand(9, K)
    expected = bank(x, idx, w, mask)

    def boom(*_a, **_k):
        raise AssertionError("host sync in the grouped_mm path")

    monkeypatch.setattr(torch.Tensor, "tolist", boom)
    monkeypatch.setattr(torch.Tensor, "item", boom)
    monkeypatch.setattr(torch.Tensor, "__bool__", boom)
    monkeypatch.setattr(torch.Tensor, "__int__", boom)
    out = bank(x, idx, w, mask)
    monkeypatch.undo()
    torch.testing.assert_close(out, expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        SwiGLUExperts(num_experts=2, dim=4, hidden_dim=4, backend="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        MLPExperts(num_experts=2, dim=4, hidden_dim=4, backend="megablocks")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="activation"):
        MLPExperts(num_experts=2, dim=4, hidden_dim=4, activation="tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_experts"):
        SwiGLUExperts(num_experts=0, dim=4, hidden_dim=4)
    bank = SwiGLUExperts(num_experts=2, dim=4, hidden_dim=4)
    idx, w = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(ValueError, match="x must"):
        bank(torch.randn(3, 5), idx, w)
    with pytest.raises(ValueError, match="x must"):
        bank(torch.randn(1, 3, 4), idx, w)
    with pytest.raises(ValueError, match="indices"):
        bank(torch.randn(4, 4), idx, w)
    with pytest.raises(ValueError, match="weights"):
        bank(torch.randn(3, 4), idx, torch.ones(3, 2))
    with pytest.raises(ValueError, match="mask"):
        bank(torch.randn(3, 4), idx, w, torch.ones(3, 2, dtype=torch.bool))


def test_grouped_mm_refuses_what_it_cannot_run():
    bank = SwiGLUExperts(num_experts=2, dim=4, hidden_dim=4, backend="grouped_mm").double()
    with pytest.raises(RuntimeError, match="grouped_mm"):
        bank(torch.randn(3, 4, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    odd = SwiGLUExperts(num_experts=2, dim=5, hidden_dim=3, backend="grouped_mm")  # 20- and 12-byte rows
    with pytest.raises(RuntimeError, match="16 bytes"):
        odd(torch.randn(3, 5), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    # auto falls back and still matches the loop
    auto, loop = (SwiGLUExperts(num_experts=2, dim=5, hidden_dim=3, backend=b) for b in ("auto", "loop"))
    loop.load_state_dict(auto.state_dict())
    x, idx, w = torch.randn(6, 5), torch.randint(0, 2, (6, 2)), torch.rand(6, 2)
    torch.testing.assert_close(auto(x, idx, w), loop(x, idx, w))


def test_bfloat16_bank_runs_and_tracks_float32():
    torch.manual_seed(0)
    bank = SwiGLUExperts(num_experts=4, dim=16, hidden_dim=32)
    x, idx, w = torch.randn(10, 16), torch.randint(0, 4, (10, 2)), torch.rand(10, 2)
    ref = bank(x, idx, w)
    out = bank.to(torch.bfloat16)(x.bfloat16().requires_grad_(), idx, w)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and bank.gate_up_proj.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(not HAS_GMM, reason="torch grouped_mm not available")
def test_contiguous_grad_wrapper_fixes_stride0_backward():
    """The raw kernel's backward fails on ``out.sum().backward()``; the wrapped call works and is right."""
    from moe_core.experts import _GMM, _gmm

    a = torch.randn(6, 8, requires_grad=True)
    b = torch.randn(3, 8, 4, requires_grad=True)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError):
        _GMM(a, b, offs=offs).sum().backward()
    a.grad = b.grad = None
    _gmm(a, b, offs).sum().backward()
    a2, b2 = a.detach().requires_grad_(), b.detach().requires_grad_()
    torch.cat([a2[:2] @ b2[0], a2[2:] @ b2[2]]).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.skipif(experts_mod._GMM is None, reason="this torch has no grouped_mm kernel")
def test_inference_mode_takes_the_grouped_mm_path_and_records_it(monkeypatch, caplog):
    """Issue 17: the grouped_mm probe ran backward under ``torch.inference_mode`` (Trainer.validate/test),
    failed, and cached False for the process: evaluation silently fell back to the loop backend."""
    monkeypatch.setattr(experts_mod, "_PROBED", {})  # as in a fresh process whose first forward is an eval
    monkeypatch.setattr(experts_mod, "_BACKENDS_SEEN", set())
    torch.manual_seed(0)
    bank = SwiGLUExperts(num_experts=8, dim=32, hidden_dim=16)  # auto
    x = torch.randn(64, 32)
    idx = torch.stack([torch.randint(0, 2, (64,)), torch.randint(2, 4, (64,))], 1)  # skewed: not padded
    w = torch.rand(64, 2)
    with caplog.at_level(logging.INFO, logger="moe_core.experts"), torch.inference_mode():
        y = bank(x, idx, w)
    assert bank.last_backend == "grouped_mm"
    assert "backend grouped_mm" in caplog.text and "inference mode True" in caplog.text
    ref = SwiGLUExperts(num_experts=8, dim=32, hidden_dim=16, backend="loop")
    ref.load_state_dict(bank.state_dict())
    torch.testing.assert_close(y, ref(x, idx, w).detach(), rtol=1e-5, atol=1e-6)
