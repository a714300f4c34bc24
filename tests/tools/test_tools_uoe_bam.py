"""Union-of-Experts MLP routing (arXiv 2503.02495) and BAM's parallel block (arXiv 2408.08274)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_core.bam import ParallelBlock, bam_parallel_block
from moe_core.surgery.upcycling import CausalSelfAttention
from moe_core.uoe import DataSelectionUoE, ExpertSelectionUoE, UnionMLP
from tests.tools.conftest import DenseSwiGLU


def _mlp(seed=0, e=4):
    torch.manual_seed(seed)
    return UnionMLP(dim=8, hidden_dim=16, num_experts=e).double()


def test_union_mlp_experts_sum_to_the_dense_mlp_forward_and_gradients():
    mlp = _mlp()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    dense = mlp(x)
    union = sum(mlp.expert(x, e) for e in range(4)) + mlp.output_bias(dense)
    torch.testing.assert_close(union, dense, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(dense.square().sum(), [x, mlp.w1.weight])
    g2 = torch.autograd.grad(union.square().sum(), [x, mlp.w1.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_data_selection_all_experts_all_tokens_equals_dense():
    mlp = _mlp(1)
    layer = DataSelectionUoE(mlp=mlp, top_k=4, capacity=1.0).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), mlp(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("combine", ["none", "score"])
def test_data_selection_matches_a_loop_oracle(combine):
    mlp = _mlp(2)
    layer = DataSelectionUoE(mlp=mlp, top_k=2, capacity=0.5, combine=combine).double()
    with torch.no_grad():
        layer.gate.weight.normal_(0, 2.0)
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
        probs = layer.gate(x).float().softmax(-1).double()  # (B, T, E), routing math in float32
        want = mlp.output_bias(x).clone()
    with torch.no_grad():
        for b in range(3):
            for e in range(4):
                masked = []  # masked score of every token for expert e (0 outside the token's top-2)
                for t in range(8):
                    top = probs[b, t].topk(2).indices.tolist()
                    masked.append(float(probs[b, t, e]) if e in top else 0.0)
                chosen = torch.tensor(masked).topk(4).indices.tolist()  # C = int(0.5 * 8)
                for t in chosen:
                    y = mlp.expert(x[b, t], e)
                    want[b, t] += y * (probs[b, t, e] if combine == "score" else 1.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    _, tokens = layer.selection(x)
    assert tokens.shape == (3, 4, 4)
    assert (tokens[..., 1:] > tokens[..., :-1]).all()  # original order kept


def test_data_selection_unselected_token_gets_nothing_from_that_expert():
    mlp = _mlp(3)
    layer = DataSelectionUoE(mlp=mlp, top_k=1, capacity=0.25).double()
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    _, tokens = layer.selection(x)
    hit = torch.zeros(8, dtype=torch.bool)
    hit[tokens.flatten()] = True
    out = layer(x)
    # tokens no expert selected get only b2
    torch.testing.assert_close(out[0, ~hit], mlp.w2.bias.expand(int((~hit).sum()), 8))


def test_expert_selection_all_experts_equals_dense_and_top1_is_one_expert():
    mlp = _mlp(4)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    full = ExpertSelectionUoE(mlp=mlp, top_k=4, seq_len=5).double()
    torch.testing.assert_close(full(x), mlp(x), rtol=1e-12, atol=1e-12)
    one = ExpertSelectionUoE(mlp=mlp, top_k=1, seq_len=5, combine="score").double()
    with torch.no_grad():
        one.switch.weight.normal_(0, 1.0)
    probs, experts = one.selection(x)
    out = one(x)
    for b in range(3):
        e = int(experts[b, 0])
        want = probs[b, e] * mlp.expert(x[b], e) + mlp.w2.bias
        torch.testing.assert_close(out[b], want, rtol=1e-10, atol=1e-10)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(one(x[perm]), out[perm])  # samples route independently
    with pytest.raises(ValueError, match="length 5"):
        one(torch.randn(1, 4, 8, dtype=torch.float64))


# ---- BAM parallel block


def _dense_block(seed, d=16):
    torch.manual_seed(seed)
    return ParallelBlock(
        norm=nn.LayerNorm(d),
        attention=CausalSelfAttention(dim=d, num_heads=2),
        ffn=DenseSwiGLU(dim=d, hidden_dim=24),
    )


def test_parallel_block_equals_its_definition():
    blk = _dense_block(0)
    with torch.no_grad():
        blk.norm.weight.normal_(1.0, 0.1)
    x = torch.randn(2, 7, 16)
    h = F.layer_norm(x, (16,), blk.norm.weight, blk.norm.bias)
    want = x + blk.attention(h) + blk.ffn(h)
    out = blk(x)
    torch.testing.assert_close(out.output, want)
    assert out.routings() == []


@pytest.mark.parametrize("kv_shared", [False, True])
def test_bam_parallel_block_from_identical_seeds_equals_the_dense_block(kv_shared):
    seed_block = _dense_block(1)
    x = torch.randn(2, 6, 16)
    mixed = bam_parallel_block([seed_block] * 3, top_k=2, kv_shared=kv_shared, router_std=1.0)
    out = mixed(x)
    torch.testing.assert_close(out.output, seed_block(x).output, rtol=1e-5, atol=1e-5)
    assert len(out.routings()) == 1 and out.routings()[0].indices.shape == (12, 2)


def test_bam_parallel_block_mixes_different_seeds():
    blocks = [_dense_block(s) for s in range(3)]
    mixed = bam_parallel_block(blocks, top_k=3, renormalize=True, router_std=0.0)  # uniform routers
    x = torch.randn(1, 5, 16)
    h = mixed.norm(x)
    avg_norm = torch.stack([b.norm.weight for b in blocks]).mean(0)
    torch.testing.assert_close(mixed.norm.weight, avg_norm)
    want = x + sum(b.attention(h) for b in blocks) / 3 + sum(b.ffn(h) for b in blocks) / 3
    torch.testing.assert_close(mixed(x).output, want, rtol=1e-5, atol=1e-5)
