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
