"""Expert offloading: exact outputs, score-aware cache vs LRU, prefetch, placement simulator."""

import itertools

import pytest
import torch

from moe_core.inference.offload import (
    HybridPlacement,
    LRUExpertCache,
    ScoreAwareExpertCache,
    offload_model,
    simulate_cache,
)


@pytest.mark.parametrize(
    ("capacity", "policy", "location", "prefetch"),
    [
        (0.25, "score", "memory", 1),
        (0.5, "lru", "disk", 0),
        (1.0, "score", "disk", 2),
        (0.5, "score", "memory", 2),
    ],
)
def test_offloaded_moekit_lm_gives_identical_outputs(tiny_lm, tmp_path, capacity, policy, location, prefetch):
    model = tiny_lm(num_experts=8)
    prompts = [torch.randint(0, 31, (2, 6)) for _ in range(3)]
    with torch.no_grad():
        want = [model(p) for p in prompts]
    engine, handles = offload_model(
        model,
        capacity=capacity,
        policy=policy,
        location=location,
        directory=str(tmp_path) if location == "disk" else None,
        prefetch_size=prefetch,
    )
    with torch.no_grad():
        for p, w in zip(prompts, want):
            assert torch.equal(model(p), w)
    st = engine.stats
    assert st.hits + st.misses > 0 and st.bytes_moved > 0
    if capacity == 1.0:  # everything fits: only the first use of each expert misses
        assert st.misses <= 3 * 8 and st.evictions == 0
    for h in handles:
        h.remove()


def test_offloaded_hf_model_gives_identical_outputs(hf_moe):
    model = hf_moe("qwen2_moe", 3)
    ids = torch.randint(0, 37, (2, 5))
    with torch.no_grad():
        want = model(ids).logits
        engine, _ = offload_model(model, capacity=0.5, prefetch_size=1)
        assert torch.equal(model(ids).logits, want)
    assert engine.stats.misses > 0
    assert not any(p.is_meta for p in model.parameters())  # expert weights left the model


@pytest.mark.parametrize("backend", ["auto", "padded"])
def test_offloaded_merged_model_with_other_backends_is_identical(tiny_lm, backend):
    pytest.importorskip("scipy")
    from moe_core.surgery.mcsmoe import collect_routing_stats, merge_model

    model = tiny_lm(num_experts=8, backend=backend)
    merge_model(model, collect_routing_stats(model, [torch.randint(0, 31, (2, 8))]), num_groups=4)
    ids = torch.randint(0, 31, (2, 7))
    with torch.no_grad():
        want = model(ids)
        engine, _ = offload_model(model, capacity=2, policy="score", prefetch_size=1)
        assert torch.equal(model(ids), want)
        assert torch.equal(model(ids), want)
    assert engine.caches[0].scores.shape == (4,) and engine.stats.hits > 0


def test_offloading_a_quantised_bank_is_refused(tiny_lm):
    from moe_core.surgery.quant import quantize_model_experts

    model = tiny_lm()
    quantize_model_experts(model, bits=8)
    with pytest.raises(TypeError, match="cannot be offloaded"):
        offload_model(model, capacity=0.5)


def _skewed_trace(steps=600, e=16, seed=0):
    """Each step: one hot expert (of 3) with a high score and one random cold expert with a low score."""
    g = torch.Generator().manual_seed(seed)
    trace = []
    for _ in range(steps):
        hot = int(torch.randint(0, 3, (1,), generator=g))
        cold = int(torch.randint(3, e, (1,), generator=g))
        s = torch.full((e,), 0.01)
        s[:3] = 0.15
        s[hot], s[cold] = 0.5, 0.2
        trace.append((s / s.sum(), [hot, cold]))
    return trace


def test_score_aware_cache_beats_lru_on_a_skewed_trace():
    trace = _skewed_trace()
    score = simulate_cache(ScoreAwareExpertCache(capacity=4, num_experts=16), trace, top_k=2)
    lru = simulate_cache(LRUExpertCache(capacity=4, num_experts=16), trace, top_k=2)
    assert score > lru + 0.05, (score, lru)


def test_scores_stay_bounded_decay_and_eviction_spares_needed_experts():
    cache = ScoreAwareExpertCache(capacity=2, num_experts=6, alpha=0.5)
    s = torch.tensor([0.6, 0.3, 0.05, 0.03, 0.01, 0.01])
    for _ in range(10):
        cache.observe(s, top_k=1)  # top-p = 2: experts 0 and 1
        assert (cache.scores >= 0).all() and (cache.scores <= s.max()).all()
    before = cache.scores.clone()
    cache.observe(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5]), top_k=1)
    torch.testing.assert_close(cache.scores[:4], 0.5 * before[:4])  # never selected: decays by (1 - alpha)
    cache.admit(0, set()), cache.admit(1, set())
    ok, evicted = cache.admit(2, protected={0, 1})
    assert not ok and evicted is None  # everything cached is needed now
    ok, evicted = cache.admit(2, protected={0, 2})
    assert ok and evicted == 1


def test_prefetch_candidates_are_uncached_and_highest_scored():
    cache = ScoreAwareExpertCache(capacity=3, num_experts=5)
    cache.observe(torch.tensor([0.1, 0.4, 0.3, 0.15, 0.05]), top_k=2)
    cache.admit(1, set())
    assert cache.prefetch_candidates(2) == [2, 3]


def test_placement_makespan_never_worse_than_trivial_plans_and_close_to_optimal():
    g = torch.Generator().manual_seed(0)
    worse_than_opt = 0
    for _ in range(60):
        n = int(torch.randint(1, 6, (1,), generator=g))
        tokens = torch.randint(1, 40, (n,), generator=g).tolist()
        cached = (torch.rand(n, generator=g) < 0.3).tolist()
        sim = HybridPlacement(
            cpu_time_per_token=float(torch.rand(1, generator=g)) * 2e-3 + 1e-4,
            gpu_time_per_token=1e-5,
            gpu_launch=1e-4,
            transfer_time=float(torch.rand(1, generator=g)) * 5e-3,
        )
        p = sim.plan(tokens, cached)
        assert p.makespan <= sim.makespan(tokens, ["cpu"] * n) + 1e-12
        assert p.makespan <= sim.makespan(tokens, ["gpu" if c else "transfer" for c in cached]) + 1e-12
        assert all(a == "gpu" for a, c in zip(p.assignment, cached) if c) or p.plan == "all_cpu"
        best = min(
            sim.makespan(tokens, [("gpu" if c else a) for a, c in zip(choice, cached)])
            for choice in itertools.product(("cpu", "transfer"), repeat=n)
        )
        worse_than_opt += p.makespan > best * 1.25
    assert worse_than_opt <= 6  # the greedy plan is usually within 25 % of the brute-force optimum
    with pytest.raises(ValueError, match="differ"):
        HybridPlacement(cpu_time_per_token=1, gpu_time_per_token=1, transfer_time=1).plan([1, 2], [True])


def test_disk_store_removes_only_the_folder_it_created(tmp_path):
    """A default ``disk`` store writes one file per expert into a fresh temporary folder and deletes it when
    the store goes away; a folder the caller named is left with its files."""
    import gc
    import os

    from moe_core.inference.offload import ExpertStore

    w = {"gate_up_proj": torch.randn(4, 6), "down_proj": torch.randn(3, 4)}
    store = ExpertStore(location="disk")
    store.put(0, 1, w)
    folder = store.directory
    assert os.listdir(folder) == ["l0_e1.pt"]
    torch.testing.assert_close(store.get(0, 1), w, rtol=0, atol=0)
    del store
    gc.collect()
    assert not os.path.exists(folder)
    kept = ExpertStore(location="disk", directory=str(tmp_path))
    kept.put(0, 0, w)
    del kept
    gc.collect()
    assert os.listdir(tmp_path) == ["l0_e0.pt"]
