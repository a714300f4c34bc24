"""routing_stats: values against direct counts on hand-made and routed fixtures; detached outputs."""

from __future__ import annotations

import math

import pytest
import torch

from moe_core import routers as R
from moe_core.stats import routing_stats
from moe_core.types import RouterOutput

D = 8


def test_stats_on_hand_made_routing():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    idx = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 1]])
    mask = torch.tensor([[True, True], [True, False], [True, False], [False, False]])
    r = RouterOutput(logits=probs.log(), probs=probs, weights=probs.gather(1, idx) * mask, indices=idx,
                     mask=mask, aux={"drop_fraction": torch.tensor(0.5)})
    s = routing_stats(r)
    counts = torch.tensor([2.0, 2.0, 0.0])  # t0 -> 0, 1; t1 -> 1; t2 -> 0
    torch.testing.assert_close(s["expert_load"], counts / 4)
    assert float(s["max_load"]) == pytest.approx(0.5)
    assert float(s["max_over_mean_load"]) == pytest.approx(1.5)
    assert float(s["dropped_fraction"]) == pytest.approx(0.5)
    assert float(s["active_experts"]) == pytest.approx(1.0)
    assert float(s["zero_expert_tokens"]) == pytest.approx(0.25)
    ent = -(probs * probs.log()).sum(-1).mean()
    assert float(s["entropy"]) == pytest.approx(float(ent), rel=1e-6)


def test_stats_are_detached_and_match_router_quantities():
    router = R.TopKRouter(dim=D, num_experts=4, top_k=2, capacity_factor=0.5)
    torch.nn.init.normal_(router.gate.weight, std=2.0)
    out = router(torch.randn(32, D, generator=torch.Generator().manual_seed(0)))
    s = routing_stats(out)
    assert all(not v.requires_grad for v in s.values())
    assert float(s["dropped_fraction"]) == pytest.approx(1 - float(out.mask.float().mean()))
    assert float(s["dropped_fraction"]) > 0
    assert float(s["active_experts"]) == pytest.approx(float(out.mask.sum(-1).float().mean()))
    torch.testing.assert_close(s["expert_load"], out.counts().float() / out.counts().sum())


def test_stats_balanced_expert_choice_and_uniform_entropy():
    router = R.ExpertChoiceRouter(dim=D, num_experts=4, capacity_factor=1.0)
    torch.nn.init.zeros_(router.gate.weight)  # uniform probabilities
    s = routing_stats(router(torch.randn(16, D)))
    assert float(s["max_over_mean_load"]) == pytest.approx(1.0)
    assert float(s["active_experts"]) == pytest.approx(1.0)
    assert float(s["entropy"]) == pytest.approx(math.log(4), rel=1e-6)
    assert float(s["dropped_fraction"]) == 0.0


def test_stats_null_and_sigmoid_routers():
    null = R.NullExpertRouter(dim=D, num_experts=4, num_null=4, top_k=4)
    torch.nn.init.normal_(null.gate.weight, std=1.0)
    torch.nn.init.normal_(null.null_gate.weight, std=1.0)
    out = null(torch.randn(20, D))
    s = routing_stats(out)
    assert s["expert_load"].shape == (4,)
    assert float(s["active_experts"]) == pytest.approx(float(out.mask.sum(-1).float().mean()))
    sig = R.SigmoidTopKRouter(dim=D, num_experts=4, top_k=2)
    torch.nn.init.zeros_(sig.gate.weight)  # sigmoid 0.5 everywhere -> normalised uniform
    assert float(routing_stats(sig(torch.randn(5, D)))["entropy"]) == pytest.approx(math.log(4), rel=1e-6)
