"""Router invariants (papers in docs/moe_core.md), each against an oracle: brute-force Python loops, closed
forms, or an equivalent router."""

from __future__ import annotations

import math

import pytest
import torch

from moe_core import losses as L
from moe_core import routers as R
from moe_core.reference import reference_moe, swiglu_expert_fn
from moe_core.types import RouterOutput

D = 8


def _x(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def _init(router: torch.nn.Module, seed: int = 1, std: float = 1.0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return router


# ---------------------------------------------------------------- top-k
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_default_weights_and_k_nonzeros(k):
    r = _init(R.TopKRouter(dim=D, num_experts=5, top_k=k))
    out = r(_x())
    assert out.weights.dtype == torch.float32 and out.mask is None
    assert r.renormalize == (k > 1)  # default: renormalised iff K > 1
    if k > 1:
        torch.testing.assert_close(out.weights.sum(-1), torch.ones(24), atol=1e-6, rtol=0)
    else:  # top-1: the raw probability (Switch), not the constant 1
        torch.testing.assert_close(out.weights, out.probs.max(-1, keepdim=True).values, atol=0, rtol=0)
        assert (out.weights < 1).all()
    assert ((out.dense_weights() > 0).sum(-1) == k).all()
    # oracle: the k largest softmax entries, renormalised
    for t in range(24):
        p = out.probs[t].tolist()
        best = sorted(range(5), key=lambda i: -p[i])[:k]
        assert sorted(out.indices[t].tolist()) == sorted(best)


def test_topk_k_equals_e_is_dense_soft_mixture():
    r = _init(R.TopKRouter(dim=D, num_experts=4, top_k=4))
    x = _x()
    out = r(x)
    expected = torch.softmax(x @ r.gate.weight.T, dim=-1)
    torch.testing.assert_close(out.dense_weights(), expected, atol=1e-6, rtol=1e-6)


def test_topk_without_renormalisation_and_scaling_factor():
    base = _init(R.TopKRouter(dim=D, num_experts=6, top_k=2, renormalize=False))
    scaled = R.TopKRouter(dim=D, num_experts=6, top_k=2, renormalize=False, routed_scaling_factor=2.5)
    scaled.load_state_dict(base.state_dict())
    x = _x()
    a, b = base(x), scaled(x)
    torch.testing.assert_close(a.weights, a.probs.gather(1, a.indices))
    torch.testing.assert_close(b.weights, 2.5 * a.weights)


def test_topk_jitter_train_only():
    r = _init(R.TopKRouter(dim=D, num_experts=4, top_k=2, jitter=0.1))
    x = _x()
    r.eval()
    assert torch.equal(r(x).logits, r(x).logits)
    torch.testing.assert_close(r(x).logits, x @ r.gate.weight.T)
    r.train()
    torch.manual_seed(0)
    assert not torch.allclose(r(x).logits, x @ r.gate.weight.T)


def test_topk_float32_routing_for_half_inputs():
    r = _init(R.TopKRouter(dim=D, num_experts=4, top_k=2)).to(torch.bfloat16)
    out = r(_x().to(torch.bfloat16))
    assert out.logits.dtype == out.probs.dtype == out.weights.dtype == torch.float32


# ---------------------------------------------------------------- capacity
def _capacity_oracle(indices, probs_top, cap, policy):
    """Python loop: serve pairs slot-major (position) or by descending prob (probs) until experts fill."""
    n, k = indices.shape
    pairs = [(s, t) for s in range(k) for t in range(n)]
    if policy == "probs":
        pairs = sorted(pairs, key=lambda st: -float(probs_top[st[1], st[0]]))
    load: dict[int, int] = {}
    keep = torch.zeros(n, k, dtype=torch.bool)
    for s, t in pairs:
        e = int(indices[t, s])
        if load.get(e, 0) < cap:
            keep[t, s] = True
            load[e] = load.get(e, 0) + 1
    return keep


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("k", [1, 2])
def test_capacity_drops_match_python_oracle(policy, k):
    e, n, cf = 4, 32, 0.75
    r = _init(R.TopKRouter(dim=D, num_experts=e, top_k=k, capacity_factor=cf, drop_policy=policy), std=2.0)
    out = r(_x(n))
    cap = math.ceil(n / e * cf * k)
    assert int(out.aux["capacity"]) == cap
    top = out.probs.gather(1, out.indices).detach()
    assert torch.equal(out.mask, _capacity_oracle(out.indices, top, cap, policy))
    assert (out.counts() <= cap).all()
    assert out.mask.sum() < n * k  # the fixture really drops
    torch.testing.assert_close(out.aux["drop_fraction"], 1 - out.mask.float().mean())
    # DeepSpeed renormalisation of the survivors (k > 1; top-1 keeps the raw gate as DeepSpeed's top1gating);
    # a token that lost everything gets zeros
    kept = top * out.mask
    assert r.renormalize == (k > 1)
    expected = kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps) if k > 1 else kept
    torch.testing.assert_close(out.weights, expected)
    assert (out.weights[~out.mask] == 0).all()


def test_capacity_position_policy_later_tokens_dropped_too():
    r = _init(R.TopKRouter(dim=D, num_experts=4, top_k=2, capacity_factor=0.5), std=2.0)
    out = r(_x(40))
    flat_ids = out.indices.t().reshape(-1).tolist()  # slot-major service order
    flat_keep = out.mask.t().reshape(-1).tolist()
    dropped_seen: set[int] = set()
    for e, kept in zip(flat_ids, flat_keep):
        if e in dropped_seen:
            assert not kept, "a pair served after a dropped pair of the same expert was kept"
        if not kept:
            dropped_seen.add(e)
    assert dropped_seen


def test_huge_capacity_equals_dropless():
    dropless = _init(R.TopKRouter(dim=D, num_experts=4, top_k=2))
    capped = R.TopKRouter(dim=D, num_experts=4, top_k=2, capacity_factor=4.0 / 2)  # cf >= E / k => C >= N
    capped.load_state_dict(dropless.state_dict())
    x = _x()
    a, b = dropless(x), capped(x)
    assert b.mask.all() and float(b.aux["drop_fraction"]) == 0.0
    torch.testing.assert_close(a.weights, b.weights)
    assert torch.equal(a.indices, b.indices)


def test_eval_capacity_factor():
    r = R.TopKRouter(
        dim=D, num_experts=4, top_k=1, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=3
    )
    assert r.capacity(8) == 3  # max(ceil(2), 3)
    r.eval()
    assert r.capacity(8) == 4


# ---------------------------------------------------------------- noisy top-k
def test_noisy_topk_eval_is_plain_softmax_topk():
    r = _init(R.NoisyTopKRouter(dim=D, num_experts=5, top_k=5)).eval()
    x = _x()
    out = r(x)
    torch.testing.assert_close(out.dense_weights(), torch.softmax(x @ r.gate.weight.T, -1))
    assert torch.equal(out.weights, r(x).weights)
    assert (out.aux["load_probs"] == 1).all()


def test_noisy_topk_load_probs_match_loop():
    r = _init(R.NoisyTopKRouter(dim=D, num_experts=5, top_k=2), std=0.5).train()
    x = _x(10)
    torch.manual_seed(3)
    out = r(x)
    with torch.no_grad():
        clean = x @ r.gate.weight.T
        std = torch.nn.functional.softplus(x @ r.noise.weight.T) + r.noise_epsilon
    assert not torch.allclose(out.logits, clean)  # training adds noise
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(10))
    for t in range(10):
        h = out.logits[t].tolist()
        for i in range(5):
            others = sorted((h[j] for j in range(5) if j != i), reverse=True)
            kth = others[2 - 1]
            z = (float(clean[t, i]) - kth) / float(std[t, i])
            p = 0.5 * (1 + math.erf(z / math.sqrt(2)))
            assert abs(float(out.aux["load_probs"][t, i].detach()) - p) < 1e-5
    lp = out.aux["load_probs"]
    assert ((lp >= 0) & (lp <= 1)).all() and ((lp > 0) & (lp < 1)).float().mean() > 0.5  # (0, 1) up to fp32


# ---------------------------------------------------------------- expert choice
@pytest.mark.parametrize(("n", "c"), [(16, 2.0), (16, 1.0), (20, 1.5)])
def test_expert_choice_exact_capacity(n, c):
    e = 4
    r = _init(R.ExpertChoiceRouter(dim=D, num_experts=e, capacity_factor=c))
    out = r(_x(n))
    ke = math.ceil(n * c / e)
    assert (out.mask.sum(0) == ke).all()
    assert int(out.mask.sum()) == e * ke
    torch.testing.assert_close(out.weights, out.probs * out.mask)
    # oracle: expert j's tokens are its ke highest-scoring ones
    for j in range(e):
        best = sorted(range(n), key=lambda t: -float(out.probs[t, j].detach()))[:ke]
        assert set(out.mask[:, j].nonzero().flatten().tolist()) == set(best)


def test_expert_choice_full_capacity_is_dense_and_permutation_equivariant():
    r = _init(R.ExpertChoiceRouter(dim=D, num_experts=4, capacity_factor=4.0))
    x = _x(12)
    out = r(x)
    assert out.mask.all()
    torch.testing.assert_close(out.dense_weights(), out.probs)
    r2 = _init(R.ExpertChoiceRouter(dim=D, num_experts=4, capacity_factor=2.0))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    a, b = r2(x), r2(x[perm])
    torch.testing.assert_close(a.dense_weights()[perm], b.dense_weights())


# ---------------------------------------------------------------- top-p
def _top_p_oracle(p_row: list[float], thr: float) -> set[int]:
    order = sorted(range(len(p_row)), key=lambda i: -p_row[i])
    chosen, mass = [], 0.0
    for i in order:
        chosen.append(i)
        mass += p_row[i]
        if mass > thr:
            break
    return set(chosen)


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.4, 0.7, 0.95, 1.0])
def test_top_p_minimal_prefix_matches_loop(thr):
    r = _init(R.TopPRouter(dim=D, num_experts=6, threshold=thr))
    out = r(_x(30))
    for t in range(30):
        got = set(out.indices[t][out.mask[t]].tolist())
        assert got == _top_p_oracle(out.probs[t].tolist(), thr)
    # raw probabilities, not renormalised
    torch.testing.assert_close(out.weights, out.probs.gather(1, out.indices) * out.mask)
    if thr >= 1.0:
        assert out.mask.all()
    if thr == 0.0:
        assert (out.mask.sum(-1) == 1).all()


def test_top_p_strict_crossing_on_exact_ties():
    sorted_probs = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25]])  # exact in binary
    mask = R.top_p_mask(sorted_probs, 0.5)
    # mass 0.5 is not > 0.5: the second expert is needed (strict >, crossing expert included)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert R.top_p_mask(sorted_probs, 1.0).all()  # no crossing -> all experts


def test_top_p_monotone_in_p():
    r = _init(R.TopPRouter(dim=D, num_experts=6))
    x = _x(30)
    prev = None
    for thr in [0.05, 0.2, 0.4, 0.6, 0.8, 0.99]:
        r.threshold = thr
        cnt = r(x).mask.sum(-1)
        if prev is not None:
            assert (cnt >= prev).all()
        prev = cnt
    assert prev.float().mean() > 1


# ---------------------------------------------------------------- null experts
def test_null_experts_never_reach_the_dispatcher():
    e, m, kp = 4, 3, 4
    r = _init(R.NullExpertRouter(dim=D, num_experts=e, num_null=m, top_k=kp), std=1.5)
    out = r(_x(40))
    picks = out.aux["all_indices"]
    assert out.logits.shape == (40, e + m) and out.num_experts == e
    assert (out.indices < e).all()
    assert torch.equal(out.mask, picks < e)
    assert (picks >= e).any() and (picks < e).any()
    true_per_token = out.mask.sum(-1)
    assert ((true_per_token >= max(0, kp - m)) & (true_per_token <= kp)).all()
    has_true = true_per_token > 0
    torch.testing.assert_close(out.weights.sum(-1)[has_true], torch.ones(int(has_true.sum())))
    assert (out.weights[~out.mask] == 0).all()
    assert (out.counts().sum() == out.mask.sum())
    # null experts have no parameters beyond their router rows
    assert sum(p.numel() for p in r.parameters()) == (e + m) * D


def test_null_experts_m0_equals_topk():
    topk = _init(R.TopKRouter(dim=D, num_experts=5, top_k=2))
    null = R.NullExpertRouter(dim=D, num_experts=5, num_null=0, top_k=2)
    null.gate.load_state_dict(topk.gate.state_dict())
    x = _x()
    a, b = topk(x), null(x)
    assert b.mask.all()
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights, atol=0, rtol=0)


def test_null_all_null_pick_gives_zero_weights():
    r = R.NullExpertRouter(dim=D, num_experts=2, num_null=2, top_k=2)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.null_gate.weight.zero_()
        r.null_gate.weight[:, 0] = 10.0
    x = torch.zeros(3, D)
    x[:, 0] = 1.0
    out = r(x)
    assert not out.mask.any() and (out.weights == 0).all() and torch.isfinite(out.weights).all()


# ---------------------------------------------------------------- MoGE grouped
def test_grouped_equal_picks_per_group():
    e, g, k = 8, 4, 4
    r = _init(R.GroupedRouter(dim=D, num_experts=e, top_k=k, num_groups=g))
    out = r(_x(30))
    group = out.indices // (e // g)  # (N, K)
    for j in range(g):
        assert ((group == j).sum(-1) == k // g).all()
    assert torch.equal(torch.bincount(group.flatten(), minlength=g), torch.full((g,), 30 * k // g))
    assert (out.weights.sum(-1) <= 1 + 1e-6).all()
    # oracle: argmax within each group
    for t in range(30):
        for j in range(g):
            block = out.probs[t, j * 2 : j * 2 + 2]
            assert j * 2 + int(block.argmax()) in out.indices[t].tolist()


def test_grouped_one_group_is_topk():
    topk = _init(R.TopKRouter(dim=D, num_experts=6, top_k=2, renormalize=True))
    grouped = R.GroupedRouter(dim=D, num_experts=6, top_k=2, num_groups=1, renormalize=True)
    grouped.load_state_dict(topk.state_dict())
    a, b = topk(_x()), grouped(_x())
    torch.testing.assert_close(a.dense_weights(), b.dense_weights())


def test_grouped_expert_scale_multiplies_selected_weights_and_learns():
    plain = _init(R.GroupedRouter(dim=D, num_experts=8, top_k=4, num_groups=2, renormalize=True))
    scaled = R.GroupedRouter(dim=D, num_experts=8, top_k=4, num_groups=2, renormalize=True, expert_scale=True)
    scaled.gate.load_state_dict(plain.gate.state_dict())
    x = _x(20)
    a, b = plain(x), scaled(x)
    torch.testing.assert_close(b.weights, a.weights)  # init s = 1: identical routing
    assert torch.equal(a.indices, b.indices)
    with torch.no_grad():
        scaled.expert_scale.copy_(torch.arange(1.0, 9.0))
    c = scaled(x)
    assert torch.equal(c.indices, a.indices)  # the scale never changes the selection
    cw, aw = c.weights.detach(), a.weights.detach()
    for t in range(20):  # oracle: each selected weight times its expert's scale
        for j in range(4):
            e = int(a.indices[t, j])
            assert float(cw[t, j]) == pytest.approx(float(aw[t, j]) * (e + 1), rel=1e-6)
    c.weights.sum().backward()
    grad = scaled.expert_scale.grad
    used = torch.zeros(8, dtype=torch.bool)
    used[a.indices.flatten()] = True
    assert (grad[used] > 0).all() and (grad[~used] == 0).all()
    assert plain.expert_scale is None and "expert_scale" not in dict(plain.named_parameters())


# ---------------------------------------------------------------- DeepSeek sigmoid / group-limited / bias
def _ds_oracle(scores, bias, k, num_groups, topk_groups, use_bias):
    """Brute-force group-limited selection per token (official Gate semantics)."""
    e = scores.shape[1]
    size = e // num_groups
    sel = []
    for t in range(scores.shape[0]):
        c = [float(scores[t, i]) + (float(bias[i]) if use_bias else 0.0) for i in range(e)]
        gs = []
        for g in range(num_groups):
            vals = sorted(c[g * size : (g + 1) * size], reverse=True)
            gs.append(sum(vals[:2]) if use_bias else vals[0])
        groups = sorted(range(num_groups), key=lambda g: -gs[g])[:topk_groups]
        allowed = [i for i in range(e) if i // size in groups]
        sel.append(set(sorted(allowed, key=lambda i: -c[i])[:k]))
    return sel


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_group_limited_selection_matches_loop(use_bias, score_func):
    r = _init(R.SigmoidTopKRouter(dim=D, num_experts=8, top_k=3, num_groups=4, topk_groups=2,
                                  score_func=score_func, use_bias=use_bias, routed_scaling_factor=2.5))
    if use_bias:
        r.bias.copy_(torch.linspace(-0.3, 0.3, 8))
    out = r(_x(30))
    sel = _ds_oracle(out.probs.detach(), r.bias if use_bias else torch.zeros(8), 3, 4, 2, use_bias)
    for t in range(30):
        assert set(out.indices[t].tolist()) == sel[t]
        assert len(set((out.indices[t] // 2).tolist())) <= 2
    torch.testing.assert_close(out.weights.sum(-1), torch.full((30,), 2.5))
    torch.testing.assert_close(out.weights, 2.5 * R._renorm(out.probs.gather(1, out.indices)))


@pytest.mark.parametrize("use_bias", [False, True])
def test_all_groups_equals_ungrouped(use_bias):
    grouped = _init(R.SigmoidTopKRouter(dim=D, num_experts=8, top_k=3, num_groups=4, topk_groups=4,
                                        use_bias=use_bias))
    flat = R.SigmoidTopKRouter(dim=D, num_experts=8, top_k=3, use_bias=use_bias)
    if use_bias:
        grouped.bias.copy_(torch.linspace(-0.2, 0.2, 8))
    flat.load_state_dict(grouped.state_dict())
    a, b = grouped(_x()), flat(_x())
    assert torch.equal(a.indices.sort(-1).values, b.indices.sort(-1).values)
    torch.testing.assert_close(a.dense_weights(), b.dense_weights())


def test_sigmoid_no_bias_one_group_is_plain_sigmoid_topk():
    r = _init(R.SigmoidTopKRouter(dim=D, num_experts=6, top_k=2))
    x = _x()
    out = r(x)
    s = torch.sigmoid(x @ r.gate.weight.T)
    v, i = s.topk(2, -1)
    assert torch.equal(out.indices, i)
    torch.testing.assert_close(out.weights, v / v.sum(-1, keepdim=True))


def test_bias_is_a_buffer_without_gradient_and_constant_shift_is_noop():
    r = _init(R.SigmoidTopKRouter(dim=D, num_experts=6, top_k=2))
    assert "bias" in dict(r.named_buffers()) and "bias" not in dict(r.named_parameters())
    r.bias.copy_(torch.randn(6))
    x = _x()
    out = r(x)
    out.weights.sum().backward()
    assert r.bias.grad is None and not r.bias.requires_grad and r.gate.weight.grad is not None
    r.bias.add_(3.0)
    assert torch.equal(r(x).indices, out.indices)


def test_update_bias_moves_exactly_gamma():
    r = R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=1, bias_update_speed=0.01)
    before = r.bias.clone()
    delta = r.update_bias(torch.tensor([5.0, 1.0, 3.0, 3.0]))  # mean 3
    torch.testing.assert_close(r.bias - before, torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    torch.testing.assert_close(delta, r.bias - before)


def test_bias_stays_float32_under_half_precision():
    r = R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=1, bias_update_speed=1e-3).to(torch.bfloat16)
    assert r.gate.weight.dtype == torch.bfloat16 and r.bias.dtype == torch.float32
    r.bias.fill_(0.3)
    r.update_bias(torch.tensor([4.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(r.bias, torch.tensor([0.299, 0.301, 0.3, 0.3]), atol=1e-7, rtol=0)
    out = r(torch.randn(5, D, dtype=torch.bfloat16))
    assert out.weights.dtype == torch.float32


def test_bias_balancing_moves_load_toward_uniform():
    e = 8
    r = R.SigmoidTopKRouter(dim=D, num_experts=e, top_k=2, bias_update_speed=0.01)
    with torch.no_grad():
        r.gate.weight.copy_(torch.randn(e, D, generator=torch.Generator().manual_seed(0)) * 0.3)
        r.gate.weight[0, 0] += 2.0  # x[:, 0] > 0 on the stream -> experts 0 and 1 favoured
        r.gate.weight[1, 0] += 1.0
    g = torch.Generator().manual_seed(1)

    def batch(n: int = 64) -> torch.Tensor:
        x = torch.randn(n, D, generator=g)
        x[:, 0] = x[:, 0].abs() + 1.0
        return x

    def imbalance() -> float:  # max / mean load on a large held-out batch (little sampling noise)
        c = r(batch(1024)).counts().float()
        return float(c.max() / c.mean())

    with torch.no_grad():
        start = imbalance()
        for _ in range(100):
            r.update_bias(r(batch()).counts())
        end = imbalance()
    assert start > 3.0  # the stream is skewed
    assert end < 1.4 and end < start / 2.5


# ---------------------------------------------------------------- DTS gate
def test_dts_gets_sparser_as_temperature_falls():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 6, generator=g)
    gumbel = R.sample_gumbel(logits, generator=torch.Generator().manual_seed(1))
    taus = [100.0, 10.0, 3.0, 1.0, 0.5, 0.2, 0.1, 0.03, 0.01, 1e-3]
    prev = None
    counts = []
    for tau in taus:
        active, gg = R.dts_gate(logits, gumbel, temperature=tau)
        torch.testing.assert_close(gg, torch.softmax((logits + gumbel) / tau, -1))
        assert torch.equal(active, gg > 1e-3)  # the repo's GUMBEL_THRESHOLD rule
        if prev is None:
            assert active.all()  # 1/E > threshold at large tau
        else:
            assert not (active & ~prev).any(), "an expert turned active again as tau fell"
        prev = active
        counts.append(float(active.sum(-1).float().mean()))
    assert counts[-1] == 1.0 and counts[0] == 6.0
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    hard, _ = R.dts_gate(logits, gumbel, temperature=1.0, hard=True)
    assert (hard.sum(-1) == 1).all()
    assert torch.equal(hard.float().argmax(-1), (logits + gumbel).argmax(-1))


def test_dts_router_train_and_eval():
    r = _init(R.DenseToSparseRouter(dim=D, num_experts=5, temperature=0.3))
    x = _x()
    torch.manual_seed(7)
    a = r(x)
    torch.manual_seed(7)
    b = r(x)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weights, a.probs * a.mask)
    r.hard = True
    assert (r(x).mask.sum(-1) == 1).all()
    r.eval()
    out = r(x)
    assert out.mask is None and out.indices.shape == (24, 1)
    torch.testing.assert_close(out.weights[:, 0], out.probs.max(-1).values)


@pytest.mark.parametrize("kind", ["linear", "exp"])
def test_temperature_schedule(kind):
    s = R.TemperatureSchedule(tau_max=2.0, tau_min=0.5, decay_steps=10, kind=kind, hard_from_step=12)
    taus = [s(u) for u in range(30)]
    assert taus[0] == 2.0
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    assert min(taus) == 0.5 and taus[10] == pytest.approx(0.5)
    mid = 2.0 - 5 * 1.5 / 10 if kind == "linear" else 2.0 * math.exp(5 * math.log(0.25) / 10)
    assert taus[5] == pytest.approx(mid)
    r = R.DenseToSparseRouter(dim=D, num_experts=4)
    s.apply(r, 5)
    assert r.temperature == pytest.approx(mid) and not r.hard
    s.apply(r, 12)
    assert r.hard


# ---------------------------------------------------------------- any router drives an expert bank
ROUTERS = {
    "topk": lambda: R.TopKRouter(dim=D, num_experts=4, top_k=2),
    "topk_capacity": lambda: R.TopKRouter(dim=D, num_experts=4, top_k=2, capacity_factor=0.5),
    "noisy": lambda: R.NoisyTopKRouter(dim=D, num_experts=4, top_k=2),
    "expert_choice": lambda: R.ExpertChoiceRouter(dim=D, num_experts=4),
    "top_p": lambda: R.TopPRouter(dim=D, num_experts=4),
    "null": lambda: R.NullExpertRouter(dim=D, num_experts=4, num_null=2, top_k=3),
    "grouped": lambda: R.GroupedRouter(dim=D, num_experts=4, top_k=2, num_groups=2),
    "sigmoid": lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2, num_groups=2, topk_groups=1),
    "dts": lambda: R.DenseToSparseRouter(dim=D, num_experts=4),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_drives_an_expert_bank(name):
    from moe_core.experts import SwiGLUExperts

    torch.manual_seed(0)
    router = _init(ROUTERS[name]())
    bank = SwiGLUExperts(num_experts=4, dim=D, hidden_dim=16, backend="loop")
    x = _x(12)
    out = router(x)
    assert router.dim == D and router.num_experts == 4 and out.num_experts == 4
    assert out.indices.dtype == torch.int64 and ((out.indices >= 0) & (out.indices < 4)).all()
    assert out.weights.shape == out.indices.shape and out.weights.dtype == torch.float32
    y = bank(x, out.indices, out.weights, out.mask)
    ref = reference_moe(x, out.indices, out.weights, out.mask,
                        swiglu_expert_fn(bank.gate_proj, bank.up_proj, bank.down_proj))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_bad_input_errors(name):
    router = ROUTERS[name]()
    with pytest.raises(ValueError, match="x must have shape"):
        router(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match="x must have shape"):
        router(torch.randn(4, D + 1))
    bad = torch.randn(4, D)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains non-finite"):
        router(bad)


@pytest.mark.parametrize(
    ("make", "arg"),
    [
        (lambda: R.TopKRouter(dim=D, num_experts=4, top_k=5), "top_k"),
        (lambda: R.TopKRouter(dim=D, num_experts=4, top_k=0), "top_k"),
        (lambda: R.TopKRouter(dim=D, num_experts=0, top_k=1), "num_experts"),
        (lambda: R.TopKRouter(dim=D, num_experts=4, top_k=1, drop_policy="random"), "drop_policy"),
        (lambda: R.TopKRouter(dim=D, num_experts=4, top_k=1, capacity_factor=0.0), "capacity_factor"),
        (lambda: R.NoisyTopKRouter(dim=D, num_experts=4, top_k=6), "top_k"),
        (lambda: R.ExpertChoiceRouter(dim=D, num_experts=4, capacity_factor=-1.0), "capacity_factor"),
        (lambda: R.TopPRouter(dim=D, num_experts=4, threshold=-0.1), "threshold"),
        (lambda: R.NullExpertRouter(dim=D, num_experts=4, num_null=1, top_k=6), "top_k"),
        (lambda: R.NullExpertRouter(dim=D, num_experts=4, num_null=-1, top_k=2), "num_null"),
        (lambda: R.GroupedRouter(dim=D, num_experts=6, top_k=2, num_groups=4), "num_groups"),
        (lambda: R.GroupedRouter(dim=D, num_experts=8, top_k=3, num_groups=2), "top_k"),
        (lambda: R.SigmoidTopKRouter(dim=D, num_experts=8, top_k=2, score_func="relu"), "score_func"),
        (lambda: R.SigmoidTopKRouter(dim=D, num_experts=8, top_k=2, num_groups=3), "num_groups"),
        (lambda: R.SigmoidTopKRouter(dim=D, num_experts=8, top_k=2, num_groups=4, topk_groups=5),
         "topk_groups"),
        (lambda: R.SigmoidTopKRouter(dim=D, num_experts=8, top_k=5, num_groups=4, topk_groups=2), "top_k"),
        (lambda: R.DenseToSparseRouter(dim=D, num_experts=4, temperature=0.0), "temperature"),
        (lambda: R.TemperatureSchedule(decay_steps=10, kind="cosine"), "kind"),
        (lambda: R.TemperatureSchedule(tau_max=0.1, tau_min=0.5, decay_steps=10), "tau_min"),
        (lambda: R.TemperatureSchedule(decay_steps=0), "decay_steps"),
    ],
)
def test_bad_arguments_name_the_argument(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_update_bias_errors():
    with pytest.raises(ValueError, match="use_bias"):
        R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=1, use_bias=False).update_bias(torch.ones(4))
    with pytest.raises(ValueError, match="counts"):
        R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=1).update_bias(torch.ones(3))


# ---------------------------------------------------------------- declared auxiliary losses
def _pad_mask(n: int) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[-5:] = False
    return keep


# router factory, whether it routes in training mode, and the declaration its paper implies, written with the
# pure functions of moe_core.losses
DECLARED = {
    "topk": (lambda: R.TopKRouter(dim=D, num_experts=4, top_k=2), True,
             lambda r, m, b: {"balance": L.switch_balance_loss(r, token_mask=m)}),
    "topk_capacity": (lambda: R.TopKRouter(dim=D, num_experts=4, top_k=2, capacity_factor=0.5), True,
                      lambda r, m, b: {"balance": L.switch_balance_loss(r, token_mask=m)}),
    "noisy": (lambda: R.NoisyTopKRouter(dim=D, num_experts=4, top_k=2), True,
              lambda r, m, b: {"balance": L.noisy_load_importance_loss(r, token_mask=m)}),
    "noisy_weighted": (
        lambda: R.NoisyTopKRouter(dim=D, num_experts=4, top_k=2, w_importance=0.3, w_load=2.0), True,
        lambda r, m, b: {"balance": L.noisy_load_importance_loss(r, w_importance=0.3, w_load=2.0,
                                                                 token_mask=m)},
    ),
    "expert_choice": (lambda: R.ExpertChoiceRouter(dim=D, num_experts=4), True, lambda r, m, b: {}),
    "top_p": (lambda: R.TopPRouter(dim=D, num_experts=4), True,
              lambda r, m, b: {"balance": L.switch_balance_loss(r, token_mask=m),
                               "entropy": L.top_p_entropy_loss(r, token_mask=m)}),
    "null": (lambda: R.NullExpertRouter(dim=D, num_experts=4, num_null=2, top_k=3), True,
             lambda r, m, b: {"balance": L.null_expert_balance_loss(r, token_mask=m)}),
    "grouped": (lambda: R.GroupedRouter(dim=D, num_experts=4, top_k=2, num_groups=2), True,
                lambda r, m, b: {"balance": L.switch_balance_loss(r, token_mask=m)}),
    "sigmoid": (lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2, num_groups=2, topk_groups=1), True,
                lambda r, m, b: {"balance": L.deepseek_balance_loss(r, batch_size=b, normalize_scores=True,
                                                                    token_mask=m)}),
    "softmax_v2": (lambda: R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2, score_func="softmax",
                                               renormalize=False, use_bias=False), True,
                   lambda r, m, b: {"balance": L.deepseek_balance_loss(r, batch_size=b, token_mask=m)}),
    "dts_train": (lambda: R.DenseToSparseRouter(dim=D, num_experts=4, temperature=0.5), True,
                  lambda r, m, b: {"balance": L.dts_balance_loss(r, token_mask=m)}),
    "dts_eval": (lambda: R.DenseToSparseRouter(dim=D, num_experts=4), False,
                 lambda r, m, b: {"balance": L.switch_balance_loss(r, token_mask=m)}),
}


@pytest.mark.parametrize("name", sorted(DECLARED))
@pytest.mark.parametrize("masked", [False, True])
def test_declared_aux_losses_equal_the_named_pure_functions(name, masked):
    make, training, expected_fn = DECLARED[name]
    torch.manual_seed(0)
    router = _init(make()).train(training)
    out = router(_x(24))
    mask = _pad_mask(24) if masked else None
    got = router.aux_losses(out, batch_size=3, token_mask=mask)
    want = expected_fn(out, mask, 3)
    assert set(got) == set(want) and set(got) <= set(L.AUX_LOSS_KEYS)
    for key in want:
        assert got[key].shape == () and got[key].dtype == torch.float32
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    if masked and want:  # the mask really reaches the loss
        unmasked = router.aux_losses(out, batch_size=3)
        assert any(not torch.equal(unmasked[k], got[k]) for k in want)


def test_declared_sets_expert_choice_nothing_top_p_both():
    ec = _init(R.ExpertChoiceRouter(dim=D, num_experts=4))
    assert ec.aux_losses(ec(_x())) == {}
    tp = _init(R.TopPRouter(dim=D, num_experts=4))
    assert set(tp.aux_losses(tp(_x()))) == {"balance", "entropy"}
    for name in ("topk", "noisy", "null", "grouped", "sigmoid", "dts"):
        r = _init(ROUTERS[name]())
        assert set(r.aux_losses(r(_x()))) == {"balance"}, name


def test_sigmoid_declared_loss_is_sequence_wise():
    """Two sequences that each collapse onto a different expert: balanced over the batch, not per sequence."""
    r = R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=1, use_bias=False)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 3.0  # x[:, 0] > 0 -> expert 0
        r.gate.weight[1, 0] = -3.0  # x[:, 0] < 0 -> expert 1
    x = _x(16).abs()
    x[8:, 0] *= -1  # sequence 0: tokens 0..7, sequence 1: tokens 8..15
    out = r(x)
    assert (out.indices[:8] == 0).all() and (out.indices[8:] == 1).all()
    seq = r.aux_losses(out, batch_size=2)["balance"]
    whole = r.aux_losses(out)["balance"]
    torch.testing.assert_close(seq, L.deepseek_balance_loss(out, batch_size=2, normalize_scores=True))
    torch.testing.assert_close(whole, L.deepseek_balance_loss(out, normalize_scores=True))
    assert float(seq.detach()) > 1.5 * float(whole.detach())


def _dts_code_loss(gates: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``codecaution/EvoMoE: topkgating`` l_aux, line by line: gates = chosen * softmax (or gumbel gates)."""
    num_experts = gates.shape[1]
    me = torch.mean(gates, dim=0)
    ce = torch.mean(chosen.to(gates.dtype), dim=0)
    return torch.mean(me * ce) * num_experts * num_experts


@pytest.mark.parametrize("use_gumbel_gates", [False, True])
@pytest.mark.parametrize("temperature", [0.05, 0.5, 5.0])
def test_dts_balance_loss_matches_evomoe_code(use_gumbel_gates, temperature):
    r = _init(R.DenseToSparseRouter(dim=D, num_experts=5, temperature=temperature,
                                    use_gumbel_gates=use_gumbel_gates))
    torch.manual_seed(1)
    out = r(_x(30))
    assert out.indices.shape == (30, 5)  # slot j holds expert j: weights are the repo's gates matrix
    want = _dts_code_loss(out.weights, out.mask)
    torch.testing.assert_close(L.dts_balance_loss(out), want)
    # known values: every expert active -> E (no gradient signal); balanced one-hot, uniform probs -> 1/E
    probs = torch.full((10, 5), 0.2)
    dense = RouterOutput(logits=probs.log(), probs=probs, weights=probs, indices=R._all_slots(10, 5, "cpu"),
                           mask=torch.ones(10, 5, dtype=torch.bool))
    assert float(L.dts_balance_loss(dense)) == pytest.approx(5.0)
    onehot = torch.eye(5, dtype=torch.bool).repeat(2, 1)  # (10, 5)
    sparse = RouterOutput(logits=probs.log(), probs=probs, weights=probs * onehot,
                            indices=R._all_slots(10, 5, "cpu"), mask=onehot)
    assert float(L.dts_balance_loss(sparse)) == pytest.approx(1 / 5)


def test_sum_aux_losses_sums_keys_over_routings():
    topk, tp, ec = (_init(ROUTERS[n]()) for n in ("topk", "top_p", "expert_choice"))
    x = _x()
    a, b, c = topk(x), tp(x), ec(x)
    mask = _pad_mask(24)
    total = L.sum_aux_losses([(topk, a), (tp, b), (ec, c)], token_mask=mask)
    assert set(total) == {"balance", "entropy"}
    balance = L.switch_balance_loss(a, token_mask=mask) + L.switch_balance_loss(b, token_mask=mask)
    torch.testing.assert_close(total["balance"], balance)
    torch.testing.assert_close(total["entropy"], L.top_p_entropy_loss(b, token_mask=mask))
    assert set(L.sum_aux_losses([(topk, a)])) == {"balance"}  # keys declared nowhere are absent
    assert L.sum_aux_losses([(ec, c)]) == {} and L.sum_aux_losses([]) == {}
    total["balance"].backward()  # the sum keeps the router gradient
    assert topk.gate.weight.grad is not None and tp.gate.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="Linear declares no aux_losses"):
        L.sum_aux_losses([(torch.nn.Linear(2, 2), a)])
