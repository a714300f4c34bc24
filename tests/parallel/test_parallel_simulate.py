"""Cost-model invariants of moe_core.parallel.simulate (closed forms and limiting cases)."""

from __future__ import annotations

import pytest
import torch

from moe_core.parallel.simulate import CostModel, bootstrap_trace, record_router_trace, simulate_step
from moe_core.routers import TopKRouter

M = CostModel(dim=8, hidden_dim=4, bytes_per_elem=2)


def test_expert_parallel_uniform_counts_closed_form():
    n, e, c = 4, 8, 10.0
    r = simulate_step(torch.full((n, e), c), "ep", M)
    pairs = e * c  # per device
    # each device sends (n-1)/n of its pairs and receives as many; each remote pair crosses 4 times
    # (dispatch and combine, forward and backward)
    assert r["bytes_max"] == pytest.approx(4 * 2 * pairs * (n - 1) / n * M.token_bytes)
    assert r["load_max"] == r["load_mean"] == pytest.approx(pairs)


def test_sparse_equals_fsdp_when_every_device_needs_every_expert():
    counts = torch.rand(4, 8) + 0.1
    s, f = simulate_step(counts, "sparse", M), simulate_step(counts, "fsdp", M)
    assert s["bytes_max"] == pytest.approx(f["bytes_max"])
    assert s["mem_expert_bytes_max"] == pytest.approx(f["mem_expert_bytes_max"])


def test_sparse_moves_less_when_devices_use_few_experts():
    counts = torch.zeros(4, 8)
    counts[:, :2] = 5.0
    s, f = simulate_step(counts, "sparse", M), simulate_step(counts, "fsdp", M)
    assert s["bytes_max"] == pytest.approx(f["bytes_max"] * 2 / 8)


def test_hecate_balances_a_hot_expert_that_stalls_expert_parallelism():
    counts = torch.full((4, 8), 2.0)
    counts[:, 0] = 100.0
    ep, hec = simulate_step(counts, "ep", M), simulate_step(counts, "hecate", M, slots=4)
    assert ep["load_max"] == pytest.approx(4 * (100 + 2))
    assert hec["load_max"] < 0.5 * ep["load_max"]
    assert simulate_step(torch.full((4, 8), 3.0), "hecate", M, slots=2)["load_max"] == pytest.approx(24.0)
    with pytest.raises(ValueError, match="strategy"):
        simulate_step(counts, "zero", M)


def test_bootstrap_trace_counts_every_recorded_pair():
    torch.manual_seed(0)
    router = TopKRouter(dim=8, num_experts=16, top_k=2)
    rec = record_router_trace(router, torch.randn(100, 8))
    trace = bootstrap_trace(rec, num_experts=16, num_devices=4, tokens_per_device=50, steps=3)
    assert trace.shape == (3, 4, 16)
    assert torch.all(trace.sum(-1) == 50 * 2)
