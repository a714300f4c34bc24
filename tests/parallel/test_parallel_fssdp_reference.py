"""Single-process FSSDP reference (Hecate, arXiv 2502.02581): placement, sparse all-gather and
reduce-scatter invariants."""

from __future__ import annotations

import pytest
import torch

from moe_core.experts import SwiGLUExperts
from moe_core.parallel.fssdp import (
    chunk_size,
    ep_plan,
    flatten_experts,
    fsdp_plan,
    plan_placement,
    shard_rows,
    sparse_all_gather_reference,
    sparse_reduce_scatter_reference,
    unflatten_experts,
)


def _shards(world: int):
    torch.manual_seed(0)
    bank = SwiGLUExperts(num_experts=6, dim=4, hidden_dim=5)  # P = 60, not divisible by 4 or 8: padding
    flat, layout = flatten_experts(bank)
    return bank, flat, layout, [shard_rows(flat, r, world) for r in range(world)]


@pytest.mark.parametrize("world", [1, 3, 4, 8])
def test_gathered_expert_equals_concatenated_shards_and_the_bank(world):
    bank, flat, layout, shards = _shards(world)
    plan = plan_placement(torch.tensor([5.0, 0.0, 1.0, 9.0, 2.0, 3.0]), world, slots=6)
    gathered = sparse_all_gather_reference(shards, plan.hosts)
    for d in range(world):
        assert sorted(gathered[d]) == plan.experts_on(d)
        for e, row in gathered[d].items():
            torch.testing.assert_close(row, torch.cat([s[e] for s in shards]))
            params = unflatten_experts(row[None], layout)
            for name, t in params.items():
                torch.testing.assert_close(t[0], getattr(bank, name)[e])
    assert not any(1 in g for g in gathered)  # expert 1 has no load: materialised nowhere


def test_reduce_scatter_equals_dense_all_reduce_sliced():
    world, e_total = 4, 6
    _, flat, _, _ = _shards(world)
    c = chunk_size(flat.shape[1], world)
    plan = plan_placement(torch.tensor([50.0, 1.0, 1.0, 1.0, 0.0, 3.0]), world, slots=3)
    g = torch.Generator().manual_seed(1)
    grads = [{e: torch.randn(world * c, generator=g) for e in plan.experts_on(d)} for d in range(world)]
    out = sparse_reduce_scatter_reference(grads, e_total, c)
    dense = torch.zeros(world, e_total, world * c)  # every device holds a dense gradient, zeros elsewhere
    for d in range(world):
        for e, t in grads[d].items():
            dense[d, e] = t
    all_reduced = dense.sum(0)  # (E, W*C)
    for r in range(world):
        torch.testing.assert_close(out[r], all_reduced[:, r * c : (r + 1) * c])


def test_uniform_load_with_one_replica_per_expert_is_expert_parallelism():
    n, slots = 4, 2
    plan = plan_placement(torch.full((n * slots,), 10.0), n, slots)
    assert plan.replicas().tolist() == [1] * (n * slots)
    assert sorted(len(plan.experts_on(d)) for d in range(n)) == [slots] * n
    torch.testing.assert_close(plan.device_load, ep_plan(torch.full((8,), 10.0), n).device_load)


def test_every_expert_everywhere_is_fsdp():
    world = 4
    _, flat, _, shards = _shards(world)
    gathered = sparse_all_gather_reference(shards, fsdp_plan(torch.ones(6), world).hosts)
    padded = torch.nn.functional.pad(flat, (0, chunk_size(flat.shape[1], world) * world - flat.shape[1]))
    for d in range(world):  # a dense all-gather: every device has every full expert
        torch.testing.assert_close(torch.stack([gathered[d][e] for e in range(6)]), padded)


def test_skewed_load_gets_replicas_and_beats_expert_parallelism():
    load = torch.tensor([400.0, 30, 20, 10, 10, 10, 10, 10])
    n = 4
    plan = plan_placement(load, n, slots=4)
    assert plan.replicas()[0] > 1  # the hot expert is replicated
    assert plan.device_load.max() < ep_plan(load, n).device_load.max()
    assert plan.device_load.sum().item() == pytest.approx(load.sum().item())
    for d in range(n):
        assert len(plan.experts_on(d)) <= 4
    for hosts in plan.hosts:
        assert len(hosts) == len(set(hosts))


def test_plan_placement_rejects_bad_input():
    with pytest.raises(ValueError, match="slots"):
        plan_placement(torch.ones(9), 2, slots=4)
    with pytest.raises(ValueError, match="non-negative"):
        plan_placement(torch.tensor([1.0, -1.0]), 2, slots=1)
    with pytest.raises(ValueError, match="num_devices"):
        plan_placement(torch.ones(2), 0, slots=1)
