"""MC-SMoE: permutation alignment, grouping, frequency-weighted merging, low-rank + sparse compression."""

import math

import pytest
import torch

from moe_core.blocks import RemappedExperts, find_moe_blocks, get_expert_weights
from moe_core.experts import SwiGLUExperts
from moe_core.surgery.bank import count_parameters
from moe_core.surgery.mcsmoe import (
    LowRankSparseExperts,
    RoutingStats,
    align_expert,
    collect_routing_stats,
    compress_model,
    cubic_keep_ratio,
    group_experts,
    low_rank_plus_sparse,
    merge_model,
    merge_weights,
    permute_expert,
)


def _expert(d=10, h=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, h, generator=g), torch.randn(d, h, generator=g), torch.randn(h, d, generator=g))


def _apply(w, x):
    g, u, d = w
    return (torch.nn.functional.silu(x @ g) * (x @ u)) @ d


def test_permuted_expert_computes_the_same_function():
    w = _expert()
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    x = torch.randn(20, 10)
    torch.testing.assert_close(_apply(permute_expert(*w, perm), x), _apply(w, x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(permute_expert(*w, perm)[0], w[0])


def test_alignment_recovers_the_inverse_permutation():
    pytest.importorskip("scipy")
    ref = _expert()
    sigma = torch.randperm(16, generator=torch.Generator().manual_seed(2))
    other = permute_expert(*ref, sigma)  # other unit j = ref unit sigma[j]
    perm = align_expert(ref, other)
    assert torch.equal(perm, torch.argsort(sigma))  # the inverse permutation
    for a, b in zip(permute_expert(*other, perm), ref):
        assert torch.equal(a, b)


def test_merging_identical_experts_returns_that_expert_for_any_positive_weights():
    w = _expert()
    merged = merge_weights([w, w, w], torch.tensor([0.7, 0.01, 0.29]))
    for a, b in zip(merged, w):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_merged_entries_lie_between_member_min_and_max():
    a, b = _expert(seed=3), _expert(seed=4)
    merged = merge_weights([a, b], torch.tensor([0.3, 0.5]))
    for m, x, y in zip(merged, a, b):
        assert (m <= torch.maximum(x, y) + 1e-6).all() and (m >= torch.minimum(x, y) - 1e-6).all()
        torch.testing.assert_close(m, (0.3 * x + 0.5 * y) / 0.8)


def test_grouping_puts_dominant_experts_in_their_own_groups_and_joins_by_logit_similarity():
    torch.manual_seed(0)
    base = torch.randn(200, 2)
    # experts 2 and 3 copy the logit columns of 0 and 1 (plus noise): they must join those groups
    logits = torch.cat(
        [base, base[:, :1] + 0.01 * torch.randn(200, 1), base[:, 1:] + 0.01 * torch.randn(200, 1)], 1
    )
    freq = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert group_experts(freq, logits, 2).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="num_groups"):
        group_experts(freq, logits, 5)


def _calib(model, n=4, t=12, vocab=31):
    torch.manual_seed(5)
    return [torch.randint(0, vocab, (2, t)) for _ in range(n)]


def test_merge_moekit_lm_halves_experts_and_keeps_router_bit_identical(tiny_lm):
    model = tiny_lm()
    routers = [r.router.gate.weight.detach().clone() for r in find_moe_blocks(model)]
    stats = collect_routing_stats(model, _calib(model))
    assert stats[0].counts.sum() == 4 * 2 * 12 * 2  # tokens x top_k
    before = count_parameters(model)
    merge_model(model, stats, num_groups=3)
    for ref, w in zip(find_moe_blocks(model), routers):
        assert torch.equal(ref.router.gate.weight, w)
        assert isinstance(ref.experts, RemappedExperts) and ref.experts.experts.num_experts == 3
        assert len(set(ref.experts.index_map.tolist())) == 3
    assert before - count_parameters(model) == 3 * 3 * (3 * 16 * 24)  # 3 layers x 3 experts removed
    assert torch.isfinite(model(torch.randint(0, 31, (2, 5)))).all()


def test_merging_a_model_whose_experts_are_identical_changes_nothing(tiny_lm):
    model = tiny_lm()
    for ref in find_moe_blocks(model):  # make all experts of each layer equal up to a hidden permutation
        g, u, d = get_expert_weights(ref.experts)
        for e in range(1, g.shape[0]):
            perm = torch.randperm(g.shape[2], generator=torch.Generator().manual_seed(e))
            g[e], u[e], d[e] = permute_expert(g[0], u[0], d[0], perm)
        with torch.no_grad():
            ref.experts.gate_proj.copy_(g), ref.experts.up_proj.copy_(u), ref.experts.down_proj.copy_(d)
    ids = torch.randint(0, 31, (2, 9))
    want = model(ids)
    merge_model(model, collect_routing_stats(model, _calib(model)), num_groups=2, align=True)
    torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["olmoe", "qwen2_moe", "mixtral"])
def test_merge_and_compress_hf_models(hf_moe, kind):
    pytest.importorskip("scipy")
    model = hf_moe(kind, 0)
    routers = [r.router.weight.detach().clone() for r in find_moe_blocks(model)]
    calib = [torch.randint(0, 37, (2, 10)) for _ in range(3)]
    stats = collect_routing_stats(model, calib)
    merge_model(model, stats, num_groups=3)
    refs = find_moe_blocks(model)
    assert all(torch.equal(r.router.weight, w) for r, w in zip(refs, routers))
    assert refs[0].experts.experts.gate_up_proj.shape[0] == 3
    with torch.no_grad():
        merged = model(calib[0]).logits
    compress_model(model, rank=24, keep_ratio=1.0)  # full rank: compression is lossless
    with torch.no_grad():
        torch.testing.assert_close(model(calib[0]).logits, merged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [0, 3, 8])
def test_low_rank_plus_sparse_reconstructs_w_at_init(rank):
    w = torch.randn(8, 12, dtype=torch.float64)
    u, v, s = low_rank_plus_sparse(w, rank=rank)
    assert u.shape == (8, rank) and v.shape == (rank, 12)
    torch.testing.assert_close(u @ v + s, w, rtol=1e-12, atol=1e-12)


def test_full_rank_low_rank_part_alone_is_exact_and_pruning_keeps_the_largest():
    w = torch.randn(8, 12, dtype=torch.float64)
    u, v, s = low_rank_plus_sparse(w, rank=8, keep_ratio=0.0)
    assert (s == 0).all()
    torch.testing.assert_close(u @ v, w, rtol=1e-10, atol=1e-10)
    _, _, s = low_rank_plus_sparse(w, rank=2, keep_ratio=0.25)
    assert (s != 0).sum() == 24
    residual = (w - low_rank_plus_sparse(w, rank=2)[0] @ low_rank_plus_sparse(w, rank=2)[1]).abs()
    assert residual[s != 0].min() >= residual[s == 0].max()
    with pytest.raises(ValueError, match="rank"):
        low_rank_plus_sparse(w, rank=9)


def test_low_rank_sparse_bank_keep_ratio_one_changes_nothing_and_counts_parameters():
    torch.manual_seed(0)
    bank = SwiGLUExperts(num_experts=3, dim=8, hidden_dim=12, backend="loop").double()
    comp = LowRankSparseExperts.from_weights(
        bank.gate_proj.detach(), bank.up_proj.detach(), bank.down_proj.detach(), rank=2, keep_ratio=1.0
    )
    x, idx = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 3, (10, 2))
    wts = torch.rand(10, 2, dtype=torch.float64)
    torch.testing.assert_close(comp(x, idx, wts), bank(x, idx, wts), rtol=1e-10, atol=1e-10)
    comp.prune(0.1)
    nnz = sum(int((getattr(comp, f"{n}_s") != 0).sum()) for n in ("gate", "up", "down"))
    assert nnz <= round(0.1 * 96) * 9
    assert count_parameters(comp) == 3 * 3 * (8 * 2 + 2 * 12) + nnz


def test_cubic_schedule_endpoints():
    kw = dict(total_steps=100, initial_warmup=10, final_warmup=20, initial=1.0, final=0.1)
    assert cubic_keep_ratio(0, **kw) == 1.0 and cubic_keep_ratio(10, **kw) == 1.0
    assert cubic_keep_ratio(80, **kw) == 0.1 and cubic_keep_ratio(99, **kw) == 0.1
    vals = [cubic_keep_ratio(s, **kw) for s in range(10, 81)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_routing_stats_freq_and_errors(tiny_lm):
    st = RoutingStats(counts=torch.tensor([3, 1, 0, 0]), logits=torch.zeros(1, 4))
    assert st.freq.tolist() == [0.75, 0.25, 0.0, 0.0]
    with pytest.raises(ValueError, match="empty"):
        collect_routing_stats(tiny_lm(), [])


def test_kd_loss_reduces_to_cross_entropy_and_kl_vanishes_for_identical_logits():
    from moe_core.surgery.mcsmoe import kd_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(4, 5, 7), torch.randn(4, 5, 7), torch.randint(0, 7, (4, 5))
    ce = torch.nn.functional.cross_entropy(s.reshape(-1, 7), y.reshape(-1))
    torch.testing.assert_close(kd_loss(s, t, y, kd_lambda=0.0), ce)
    torch.testing.assert_close(kd_loss(s, s, y, kd_lambda=0.5), ce)  # official: CE weight stays 1
    torch.testing.assert_close(kd_loss(s, s, y, kd_lambda=0.5, weighting="convex"), 0.5 * ce)
    assert kd_loss(s, t, y, kd_lambda=1.0) > 0


def test_kd_loss_official_weighting_matches_the_torch_modules_of_the_official_code():
    from moe_core.surgery.mcsmoe import kd_loss

    torch.manual_seed(1)
    s, t, y = torch.randn(3, 6, 11), torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    temp, lam, mlm = 2.0, 0.2, 0.7
    ce = torch.nn.CrossEntropyLoss()(s.reshape(-1, 11), y.reshape(-1))
    kl = torch.nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(s / temp, dim=-1), torch.softmax(t / temp, dim=-1)
    )  # on (B, T, V): sum / B, no T^2 factor
    want = mlm * ce + lam * kl
    torch.testing.assert_close(kd_loss(s, t, y, temperature=temp, kd_lambda=lam, mlm_lambda=mlm), want)
    with pytest.raises(ValueError, match="weighting"):
        kd_loss(s, t, y, weighting="nope")  # type: ignore[arg-type]


def _compressed_tiny(tiny_lm, rank=2):
    model = tiny_lm()
    compress_model(model, rank=rank, keep_ratio=1.0)
    return model


def test_pruner_removes_whole_rows_by_importance_and_hits_the_keep_ratio(tiny_lm):
    from moe_core.surgery.mcsmoe import LoSparsePruner

    model = _compressed_tiny(tiny_lm)
    pruner = LoSparsePruner(model)
    g = torch.Generator().manual_seed(0)
    for key in pruner.ema:  # known importances: one random score per row (output unit)
        ema = pruner.ema[key]
        pruner.ema[key] = torch.rand(ema.shape[0], 1, ema.shape[2], generator=g).expand_as(ema).clone()
    scores = pruner.row_scores()
    pruner.prune(0.3)
    kept, total = 0, 0
    all_kept, all_dropped = [], []
    for (i, n), sc in scores.items():
        mask = getattr(pruner.banks[i], f"{n}_mask")
        s = getattr(pruner.banks[i], f"{n}_s")
        # whole rows: within a column of our (m, k) layout the mask is constant
        assert torch.equal(mask.amin(dim=1), mask.amax(dim=1))
        assert (s[mask == 0] == 0).all()
        all_kept.append(sc[mask > 0])
        all_dropped.append(sc[mask == 0])
        kept, total = kept + int(mask.sum()), total + mask.numel()
    assert abs(kept / total - 0.3) < 0.05
    assert torch.cat(all_kept).min() >= torch.cat(all_dropped).max()  # one model-wide threshold
    assert pruner.kept_fraction() == pytest.approx(kept / total)


def test_pruner_importance_is_gradient_based_unused_expert_rows_go_first(tiny_lm):
    from moe_core.blocks import router_selection
    from moe_core.inference.override import RouterHook
    from moe_core.surgery.mcsmoe import LoSparsePruner

    model = _compressed_tiny(tiny_lm)
    ids = torch.randint(0, 31, (1, 3), generator=torch.Generator().manual_seed(0))  # 6 picks of 6 experts
    used: set[int] = set()

    def fn(p, ref, probs, out):
        if p == 0:
            used.update(router_selection(out)[1].flatten().tolist())

    with torch.no_grad(), RouterHook(model, fn):
        model(ids)
    unused = min(set(range(6)) - used)
    bank0 = find_moe_blocks(model)[0].experts
    with torch.no_grad():  # the largest S entries of the model, on an expert this batch never routes to
        bank0.gate_s[unused].fill_(5.0)
    pruner = LoSparsePruner(model)
    model(ids).sum().backward()
    pruner.update()
    assert (pruner.ema[(0, "gate")][unused] == 0).all()
    assert pruner.ema[(0, "gate")].sum() > 0
    pruner.prune(0.9)
    assert (bank0.gate_mask[unused] == 0).all()  # magnitude pruning would have kept these first


def test_compress_and_finetune_follows_the_cubic_schedule(tiny_lm):
    from moe_core.surgery.mcsmoe import compress_and_finetune

    teacher = tiny_lm()
    student = tiny_lm()

    def batches():
        g = torch.Generator().manual_seed(0)
        while True:
            x = torch.randint(0, 31, (4, 9), generator=g)
            yield x[:, :-1], x[:, 1:]

    stats = compress_and_finetune(
        student, teacher, batches(), rank=2, final_keep_ratio=0.2, total_steps=12, initial_warmup=2,
        final_warmup=2, lr=1e-3,
    )  # fmt: skip
    want = [
        cubic_keep_ratio(s + 1, total_steps=12, initial_warmup=2, final_warmup=2, final=0.2)
        for s in range(12)
    ]
    assert stats.keep_ratios == want
    assert stats.final_kept_fraction == pytest.approx(0.2, abs=0.03)
    assert all(math.isfinite(v) for v in stats.losses)
    for ref in find_moe_blocks(student):
        bank = ref.experts
        for n in ("gate", "up", "down"):
            mask = getattr(bank, f"{n}_mask")
            assert torch.equal(mask.amin(dim=1), mask.amax(dim=1))
