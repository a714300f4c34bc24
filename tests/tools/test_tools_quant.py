"""Bit-nested INT8 (matryoshka) expert quantisation and the per-expert bit-width planner."""

import pytest
import torch

from moe_core.blocks import find_moe_blocks
from moe_core.experts import SwiGLUExperts
from moe_core.surgery.quant import (
    NestedQuantExperts,
    choose_bits,
    hebf_load_order,
    plain_int8,
    quantize_model_experts,
    quantize_nested,
)


def _w(seed=0):
    return torch.randn(6, 64, generator=torch.Generator().manual_seed(seed)) * 0.3


@pytest.mark.parametrize("b", range(1, 9))
def test_b_bit_prefix_is_nested_in_the_int8_code(b):
    code = quantize_nested(_w(), group_size=16)
    assert code.codes.dtype == torch.uint8
    assert torch.equal(code.prefix(b), code.codes >> (8 - b))
    if b > 1:  # the (b-1)-bit code is the prefix of the b-bit code
        assert torch.equal(code.prefix(b - 1), code.prefix(b) >> 1)


def test_error_non_increasing_in_b_and_within_the_bound():
    w = _w(1)
    code = quantize_nested(w, group_size=16)
    s = code.scale.expand_as(code.codes.float()).reshape(w.shape)
    mses = []
    for b in range(1, 9):
        err = (w - code.dequantize(b)).abs()
        assert (err <= s * 2 ** (7 - b) + s / 2 + 1e-6).all()
        mses.append(float((err**2).mean()))
    assert all(a >= b for a, b in zip(mses, mses[1:])), mses
    assert mses[-1] < mses[3] < mses[0]  # strictly better somewhere: the test can fail


def test_eight_bits_equals_plain_int8_and_storage_counts_bits():
    w = _w(2)
    code = quantize_nested(w, group_size=32)
    torch.testing.assert_close(code.dequantize(8), plain_int8(w, group_size=32), rtol=0, atol=0)
    assert code.nbytes(4) == 6 * 64 * 4 // 8 + 4 * 12
    with pytest.raises(ValueError, match="bits"):
        code.dequantize(9)
    with pytest.raises(ValueError, match="group_size"):
        quantize_nested(w, group_size=5)


def test_quantised_bank_at_8_bits_equals_bank_with_int8_weights():
    torch.manual_seed(0)
    bank = SwiGLUExperts(num_experts=3, dim=8, hidden_dim=16, backend="loop")
    q = NestedQuantExperts(
        gate=bank.gate_proj.detach(), up=bank.up_proj.detach(), down=bank.down_proj.detach(), bits=8
    )
    ref = SwiGLUExperts(num_experts=3, dim=8, hidden_dim=16, backend="loop")
    with torch.no_grad():
        for n in ("gate_proj", "up_proj", "down_proj"):
            getattr(ref, n).copy_(plain_int8(getattr(bank, n)))
    x, idx, wts = torch.randn(12, 8), torch.randint(0, 3, (12, 2)), torch.rand(12, 2)
    torch.testing.assert_close(q(x, idx, wts), ref(x, idx, wts), rtol=1e-6, atol=1e-6)
    q.set_bits(torch.tensor([8, 4, 2]))
    assert (
        q.storage_bytes()
        < NestedQuantExperts(
            gate=bank.gate_proj.detach(), up=bank.up_proj.detach(), down=bank.down_proj.detach(), bits=8
        ).storage_bytes()
    )


@pytest.mark.parametrize("kind", ["moekit", "qwen2_moe"])
def test_model_quantisation_error_falls_with_bits(tiny_lm, hf_moe, kind):
    model = tiny_lm() if kind == "moekit" else hf_moe(kind, 0)
    ids = torch.randint(0, 31, (2, 10))

    def logits():
        with torch.no_grad():
            out = model(ids)
        return out if isinstance(out, torch.Tensor) else out.logits

    want = logits()
    banks = quantize_model_experts(model, bits=8)
    assert len(banks) == len(find_moe_blocks(model))
    errs = []
    for b in (8, 6, 4, 2):
        for q in banks:
            q.set_bits(b)
        errs.append(float((logits() - want).abs().mean()))
    assert errs[0] < errs[1] < errs[2] < errs[3], errs


def test_choose_bits_gives_hot_experts_more_bits_within_budget():
    usage = torch.tensor([0.05, 0.5, 0.05, 0.3, 0.1])
    numel = 1000
    budget = 5 * 1000 * 4 // 8 + 2 * 1000 * 4 // 8  # room for two 8-bit upgrades above 4 bits... roughly
    bits = choose_bits(usage, expert_numel=numel, budget_bytes=budget, candidates=(4, 6, 8))
    assert sum((numel * int(b) + 7) // 8 for b in bits) <= budget
    order = torch.argsort(usage, descending=True)
    assert all(bits[order[i]] >= bits[order[i + 1]] for i in range(4))
    assert bits[1] == 8 and bits[0] == 4
    with pytest.raises(ValueError, match="budget"):
        choose_bits(usage, expert_numel=numel, budget_bytes=10, candidates=(4, 8))


def test_hebf_order_loads_high_planes_of_hot_experts_first():
    order = hebf_load_order([torch.tensor([2, 1])], [torch.tensor([0.2, 0.8])])
    assert order == [(0, 1, 0), (0, 0, 0), (0, 0, 1)]


def test_error_aware_planner_spends_bits_where_usage_weighted_error_falls_most():
    usage = torch.tensor([0.6, 0.4])
    # expert 0 (hot) is already accurate at 4 bits; expert 1 gains a lot from 8 bits
    errors = torch.tensor([[1.0, 0.010, 0.009], [1.0, 0.5, 0.01]])
    budget = 2 * 1000 * 4 // 8 + 1000 * 4 // 8  # all at 4 bits plus one 4 -> 8 upgrade
    plain = choose_bits(usage, expert_numel=1000, budget_bytes=budget, candidates=(2, 4, 8))
    aware = choose_bits(usage, expert_numel=1000, budget_bytes=budget, candidates=(2, 4, 8), errors=errors)
    assert plain.tolist() == [8, 4] and aware.tolist() == [4, 8]
    cost = (usage * errors[torch.arange(2), torch.tensor([1, 2])]).sum()
    assert cost < (usage * errors[torch.arange(2), torch.tensor([2, 1])]).sum()
    with pytest.raises(ValueError, match="errors"):
        choose_bits(usage, expert_numel=1000, budget_bytes=budget, candidates=(2, 4, 8), errors=errors[:, :2])


def test_expert_errors_fall_with_bits():
    torch.manual_seed(0)
    bank = SwiGLUExperts(num_experts=3, dim=8, hidden_dim=16)
    ref = (bank.gate_proj.detach(), bank.up_proj.detach(), bank.down_proj.detach())
    q = NestedQuantExperts(gate=ref[0], up=ref[1], down=ref[2])
    err = q.expert_errors((2, 4, 8), reference=ref)
    assert err.shape == (3, 3) and (err[:, :-1] > err[:, 1:]).all()


# ---- dual routing (per-pair bit widths) and the HEBF pipeline


def _bank_weights(e=4, d=16, h=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(e, d, h, generator=g) * 0.3,
        torch.randn(e, d, h, generator=g) * 0.3,
        torch.randn(e, h, d, generator=g) * 0.3,
    )


def test_bits_from_weights_thresholds():
    from moe_core.surgery.quant import bits_from_weights

    w = torch.tensor([[0.1, 0.3], [0.5, 0.9]])
    got = bits_from_weights(w, thresholds=(0.3, 0.6), candidates=(2, 4, 8))
    assert got.tolist() == [[2, 4], [4, 8]]
    with pytest.raises(ValueError, match="thresholds"):
        bits_from_weights(w, thresholds=(0.3,), candidates=(2, 4, 8))


def test_dual_routing_matches_per_pair_dense_oracle():
    from moe_core.surgery.quant import DualRoutedQuantExperts, bits_from_weights

    gate, up, down = _bank_weights()
    bank = DualRoutedQuantExperts(
        gate=gate, up=up, down=down, thresholds=(0.5,), candidates=(3, 8), bits=torch.tensor([8, 8, 2, 8])
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 16, generator=g)
    probs = torch.randn(10, 4, generator=g).softmax(-1)
    w, idx = probs.topk(2, -1)
    w = w / w.sum(-1, keepdim=True)
    got = bank(x, idx, w)
    want_bits = torch.minimum(bits_from_weights(w, thresholds=(0.5,), candidates=(3, 8)), bank.bits[idx])
    codes = {n: quantize_nested(t) for n, t in (("g", gate), ("u", up), ("d", down))}
    want = torch.zeros_like(x)
    for t in range(10):  # loop oracle: each pair at its own width
        for k in range(2):
            e, b = int(idx[t, k]), int(want_bits[t, k])
            ge, ue, de = (codes[n].dequantize(b)[e] for n in ("g", "u", "d"))
            want[t] += w[t, k] * ((torch.nn.functional.silu(x[t] @ ge) * (x[t] @ ue)) @ de)
    assert torch.allclose(got, want, atol=1e-5)
    assert (want_bits[idx == 2] <= 2).all() and (want_bits == 3).any() and (want_bits == 8).any()


def test_dual_routing_with_one_candidate_equals_static_plan():
    from moe_core.surgery.quant import DualRoutedQuantExperts

    gate, up, down = _bank_weights(seed=2)
    static = NestedQuantExperts(gate=gate, up=up, down=down, bits=4)
    dual = DualRoutedQuantExperts(gate=gate, up=up, down=down, thresholds=(), candidates=(4,), bits=8)
    x = torch.randn(12, 16)
    w, idx = torch.randn(12, 4).softmax(-1).topk(2, -1)
    assert torch.allclose(dual(x, idx, w), static(x, idx, w), atol=1e-6)


def test_dual_routing_bytes_counts_widest_pair_per_used_expert():
    from moe_core.surgery.quant import dual_routing_bytes

    idx = torch.tensor([[0, 1], [0, 2]])
    bits = torch.tensor([[2, 8], [4, 2]])
    got = dual_routing_bytes(bits, idx, num_experts=4, expert_numel=100)
    assert got["resident_bytes"] == (4 + 8 + 2) * 100 / 8  # expert 3 unused: nothing loaded
    assert got["mean_pair_bits"] == 4.0


def test_hebf_layerwise_order_and_pipeline_beats_cold_first():
    from moe_core.surgery.quant import expert_order, simulate_loading

    bits = [torch.tensor([2, 2, 2])]
    usage = [torch.tensor([1.0, 10.0, 3.0])]
    order = hebf_load_order(bits, usage, layerwise=True)
    assert order == [(0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (0, 0, 0), (0, 0, 1)]
    needed = {(0, e): 2 for e in range(3)}
    compute = {(0, e): 0.5 * float(usage[0][e]) for e in range(3)}  # compute time ~ tokens routed
    hebf = simulate_loading(order, plane_seconds=1.0, compute_seconds=compute, needed=needed)
    cold = simulate_loading(
        hebf_load_order(bits, [-usage[0]], layerwise=True),
        plane_seconds=1.0,
        compute_seconds=compute,
        needed=needed,
    )
    # hottest first: loads 2 s, then 5 s of compute overlaps the remaining 4 s of loads; 1.5 + 0.5 after
    assert hebf["finish_seconds"] == pytest.approx(2 + 5 + 1.5 + 0.5)
    # coldest first: the hot expert's planes arrive last (t = 6) and its 5 s of compute run after them
    assert cold["finish_seconds"] == pytest.approx(6 + 5)
    assert hebf["stall_seconds"] < cold["stall_seconds"]
    naive = simulate_loading(expert_order(bits), plane_seconds=1.0, compute_seconds=compute, needed=needed)
    assert naive["finish_seconds"] >= hebf["finish_seconds"]
    with pytest.raises(ValueError, match="never loads"):
        simulate_loading(order[:3], plane_seconds=1.0, compute_seconds=compute, needed=needed)


@pytest.mark.parametrize("kind", ["moekit", "mixtral", "olmoe"])
def test_dual_quantize_model_with_one_8bit_candidate_equals_plain_quantisation(tiny_lm, hf_moe, kind):
    import copy

    from moe_core.surgery.quant import DualRoutedQuantExperts, dual_quantize_model_experts

    model = tiny_lm() if kind == "moekit" else hf_moe(kind, 0)
    ids = torch.randint(0, 31, (2, 7))

    def fwd(m):
        out = m(ids)
        return out if isinstance(out, torch.Tensor) else out.logits

    plain, dual = copy.deepcopy(model), copy.deepcopy(model)
    quantize_model_experts(plain, bits=8, group_size=8)
    banks = dual_quantize_model_experts(dual, thresholds=(), candidates=(8,), group_size=8)
    assert len(banks) == len(find_moe_blocks(model)) and all(
        isinstance(b, DualRoutedQuantExperts) for b in banks
    )
    with torch.no_grad():
        torch.testing.assert_close(fwd(dual), fwd(plain), rtol=1e-5, atol=1e-5)
        for b in banks:
            b.set_rule(thresholds=(0.5,), candidates=(1, 8))
        assert not torch.allclose(fwd(dual), fwd(plain), atol=1e-4)  # low-weight pairs now run at 1 bit
