"""The tools on every router kind, and their argument checks (new-user trial findings)."""

import copy

import pytest
import torch
from torch import nn

from moe_core import routers as R
from moe_core.blocks import find_moe_blocks
from moe_core.experts import SwiGLUExperts
from moe_core.inference.c3po import collect_pathways, remixed_logits
from moe_core.inference.offload import HybridPlacement, ScoreAwareExpertCache, offload_model
from moe_core.layer import MoELayer
from moe_core.surgery.mcsmoe import collect_routing_stats, compress_model, merge_model
from moe_core.surgery.quant import quantize_model_experts

D, E, H = 16, 6, 24


def _with_routers(tiny_lm, make_router) -> nn.Module:
    """The tools' tiny LM with every MoE block's router replaced by ``make_router()`` (real routing)."""
    model = tiny_lm()
    torch.manual_seed(1)
    for block in model.blocks:
        router = make_router()
        for name in ("gate", "null_gate", "noise"):
            lin = getattr(router, name, None)
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, 0, 0.5)
        if getattr(router, "expert_scale", None) is not None:
            with torch.no_grad():
                router.expert_scale.uniform_(0.5, 1.5)
        block.ffn = MoELayer(router=router, experts=SwiGLUExperts(num_experts=E, dim=D, hidden_dim=H))
    return model.eval()


REPRODUCED = {
    "topk_scaled": lambda: R.TopKRouter(dim=D, num_experts=E, top_k=2, routed_scaling_factor=2.0),
    "topk_raw_scaled": lambda: R.TopKRouter(
        dim=D, num_experts=E, top_k=2, renormalize=False, routed_scaling_factor=2.5
    ),
    "grouped": lambda: R.GroupedRouter(dim=D, num_experts=E, top_k=2, num_groups=2),
    "grouped_renorm_scale": lambda: R.GroupedRouter(
        dim=D, num_experts=E, top_k=4, num_groups=2, renormalize=True, expert_scale=True
    ),
    "noisy_eval": lambda: R.NoisyTopKRouter(dim=D, num_experts=E, top_k=2),
    "dts_eval": lambda: R.DenseToSparseRouter(dim=D, num_experts=E, top_k=2),
}


@pytest.mark.parametrize("kind", sorted(REPRODUCED))
def test_override_with_own_pathways_reproduces_logits(tiny_lm, kind):
    model = _with_routers(tiny_lm, REPRODUCED[kind])
    ids = torch.randint(0, 31, (3, 8))
    with torch.no_grad():
        want = model(ids)
        own = collect_pathways(model, ids)  # (B, L, E)
        got = remixed_logits(model, ids, own, blocks=list(range(own.shape[1])))
    assert torch.equal(got, want)


REFUSED = {
    "null": (lambda: R.NullExpertRouter(dim=D, num_experts=E, num_null=2, top_k=2), "NullExpertRouter.*null"),
    "sigmoid": (
        lambda: R.SigmoidTopKRouter(dim=D, num_experts=E, top_k=2, routed_scaling_factor=2.5),
        "SigmoidTopKRouter.*score",
    ),
    "sigmoid_grouped": (
        lambda: R.SigmoidTopKRouter(dim=D, num_experts=E, top_k=2, num_groups=3, topk_groups=2),
        "SigmoidTopKRouter.*num_groups=3/topk_groups=2",
    ),
    "topk_capacity": (
        lambda: R.TopKRouter(dim=D, num_experts=E, top_k=2, capacity_factor=1.0),
        "TopKRouter.*capacity",
    ),
    "top_p": (lambda: R.TopPRouter(dim=D, num_experts=E), "TopPRouter"),
    "expert_choice": (lambda: R.ExpertChoiceRouter(dim=D, num_experts=E), "ExpertChoiceRouter"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_override_refuses_routers_it_cannot_reproduce(tiny_lm, kind):
    make, pattern = REFUSED[kind]
    model = _with_routers(tiny_lm, make)
    ids = torch.randint(0, 31, (2, 8))
    own = torch.softmax(torch.randn(2, len(model.blocks), E), -1)
    with torch.no_grad(), pytest.raises(TypeError, match=pattern):
        remixed_logits(model, ids, own, blocks=list(range(own.shape[1])))


def test_override_refuses_dense_to_sparse_in_training(tiny_lm):
    model = _with_routers(tiny_lm, REPRODUCED["dts_eval"]).train()
    ids = torch.randint(0, 31, (2, 8))
    own = torch.softmax(torch.randn(2, len(model.blocks), E), -1)
    with torch.no_grad(), pytest.raises(TypeError, match="DenseToSparseRouter.*training"):
        remixed_logits(model, ids, own, blocks=list(range(own.shape[1])))


# ------------------------------------------------------------------ null-expert routers in merge/offload
def _null_model(tiny_lm):
    return _with_routers(tiny_lm, lambda: R.NullExpertRouter(dim=D, num_experts=E, num_null=3, top_k=2))


def test_routing_stats_of_null_router_cover_real_experts_and_used_slots(tiny_lm):
    model = _null_model(tiny_lm)
    ids = torch.randint(0, 31, (4, 8))
    used = []
    hook = find_moe_blocks(model)[0].router.register_forward_hook(lambda m, i, o: used.append(o.mask.sum()))
    stats = collect_routing_stats(model, [ids])
    hook.remove()
    assert stats[0].counts.shape == (E,)
    assert stats[0].logits.shape == (4 * 8, E)
    assert int(stats[0].counts.sum()) == int(used[0])  # null picks (masked, placeholder id 0) not counted
    assert int(used[0]) < 4 * 8 * 2  # the null experts were picked: the check above means something


def test_merge_model_on_null_router(tiny_lm):
    model = _null_model(tiny_lm)
    ids = torch.randint(0, 31, (4, 8))
    with torch.no_grad():
        want = model(ids)
    same = copy.deepcopy(model)
    merge_model(same, collect_routing_stats(same, [ids]), num_groups=E)  # one expert per group: identity
    with torch.no_grad():
        assert torch.equal(same(ids), want)
    groups = merge_model(model, collect_routing_stats(model, [ids]), num_groups=3)
    assert all(g.shape == (E,) and set(g.tolist()) == {0, 1, 2} for g in groups)
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_offload_model_on_null_router_is_bit_identical(tiny_lm):
    model = _null_model(tiny_lm)
    ids = torch.randint(0, 31, (2, 8))
    with torch.no_grad():
        want = model(ids)
    engine, _ = offload_model(model, capacity=2, prefetch_size=1)
    with torch.no_grad():
        assert torch.equal(model(ids), want)
    assert all(c.scores.shape == (E,) for c in engine.caches)


def test_scmoe_weak_routing_of_a_null_router_picks_real_experts(tiny_lm):
    """New-user trial: SCMoE's rank-k weak routing ranked the null columns too and sent ids >= E to the bank
    (a ValueError from the bank's id check; garbage before it)."""
    from moe_core.inference.scmoe import RankKRouting, scmoe_logits

    model = _null_model(tiny_lm)
    ids = torch.randint(0, 31, (2, 8))
    picked = []
    hook = find_moe_blocks(model)[0].experts.register_forward_pre_hook(lambda m, a: picked.append(a[1]))
    with RankKRouting(model, rank=1), torch.no_grad():
        model(ids)
    hook.remove()
    assert int(picked[0].max()) < E and int(picked[0].min()) >= 0
    with torch.no_grad():
        scores = scmoe_logits(model, ids, rank=1)  # -inf outside the plausible set, by design
    assert not torch.isnan(scores).any() and torch.isfinite(scores).any(-1).all()


# ------------------------------------------------------------------------------ HybridPlacement.makespan
def test_makespan_refuses_unknown_device_and_length_mismatch():
    hp = HybridPlacement(cpu_time_per_token=1.0, gpu_time_per_token=0.1, transfer_time=2.0)
    assert hp.makespan([3, 4], ["cpu", "gpu"]) == 3.0
    with pytest.raises(ValueError, match="'tpu'"):
        hp.makespan([3, 4], ["cpu", "tpu"])
    with pytest.raises(ValueError, match=r"tokens \(3\) and assignment \(2\)"):
        hp.makespan([3, 4, 5], ["cpu", "gpu"])


# ---------------------------------------------------------------------------------- offload_model args
@pytest.mark.parametrize(
    ("capacity", "error", "pattern"),
    [
        (1.5, ValueError, r"capacity .*\(0, 1\], got 1.5"),
        (3.7, ValueError, r"capacity .*\(0, 1\], got 3.7"),
        (0.0, ValueError, r"capacity .*\(0, 1\], got 0.0"),
        (100, ValueError, r"capacity=100 must be in \[1, E=6\]"),
        (0, ValueError, r"capacity=0 must be in \[1, E=6\]"),
        (True, TypeError, "capacity must be an int or a float, got True"),
        ("2", TypeError, "capacity must be an int or a float, got '2'"),
    ],
)
def test_offload_model_refuses_bad_capacity(tiny_lm, capacity, error, pattern):
    model = tiny_lm()
    with pytest.raises(error, match=pattern):
        offload_model(model, capacity=capacity)
    assert not any(p.is_meta for p in model.parameters())  # refused before the model was touched


def test_offload_model_prefetch_needs_score_policy(tiny_lm):
    with pytest.raises(ValueError, match="prefetch_size=1 needs policy='score'.*'lru'"):
        offload_model(tiny_lm(), capacity=2, policy="lru", prefetch_size=1)
    with pytest.raises(ValueError, match="prefetch_size must be an int >= 0, got -1"):
        offload_model(tiny_lm(), capacity=2, prefetch_size=-1)


def test_offload_model_small_fraction_keeps_one_expert(tiny_lm):
    engine, _ = offload_model(tiny_lm(), capacity=0.01)
    assert [c.capacity for c in engine.caches] == [1] * len(engine.caches)


def test_score_cache_victim_has_its_own_docstring():
    doc = ScoreAwareExpertCache.victim.__doc__
    assert doc is not None and "score" in doc and "least recently used" not in doc


# ------------------------------------------------------------------------ compress / quantize arguments
@pytest.mark.parametrize("keep_ratio", [1.5, -1.0])
def test_compress_model_refuses_keep_ratio_outside_unit_interval(tiny_lm, keep_ratio):
    model = tiny_lm()
    with pytest.raises(ValueError, match=rf"keep_ratio must be in \[0, 1\], got {keep_ratio}"):
        compress_model(model, rank=4, keep_ratio=keep_ratio)
    assert all(isinstance(b.ffn.experts, SwiGLUExperts) for b in model.blocks)  # untouched


def test_compress_model_refuses_negative_rank(tiny_lm):
    with pytest.raises(ValueError, match="rank must be >= 0, got -1"):
        compress_model(tiny_lm(), rank=-1, keep_ratio=0.5)


def test_quantize_model_experts_checks_bits_per_block(tiny_lm):
    model = tiny_lm()  # 3 MoE blocks of 6 experts
    with pytest.raises(ValueError, match="bits has 1 entries for 3 MoE blocks"):
        quantize_model_experts(model, bits=[torch.full((E,), 4)])
    shape_msg = r"bits for MoE block 1 must be an int or have shape \(6,\), got shape \(4,\)"
    with pytest.raises(ValueError, match=shape_msg):
        quantize_model_experts(model, bits=[4, torch.full((4,), 4), 4])
    with pytest.raises(ValueError, match=r"bits for MoE block 2 must be in \[1, 8\], got \[9"):
        quantize_model_experts(model, bits=[4, 4, torch.full((E,), 9)])
    with pytest.raises(TypeError, match="bits for MoE block 0 must hold integers"):
        quantize_model_experts(model, bits=[torch.full((E,), 4.5), 4, 4])
    with pytest.raises(TypeError, match="bits must be an int or a list"):
        quantize_model_experts(model, bits=4.0)
    assert all(isinstance(b.ffn.experts, SwiGLUExperts) for b in model.blocks)  # untouched
    banks = quantize_model_experts(model, bits=[2, torch.full((E,), 4), 8])
    assert [b.bits.tolist() for b in banks] == [[2] * E, [4] * E, [8] * E]
