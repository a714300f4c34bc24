"""SCMoE self-contrast decoding."""

import math

import pytest
import torch

from moe_core.blocks import find_moe_blocks
from moe_core.inference.scmoe import (
    RankKRouting,
    contrast_scores,
    greedy_generate,
    lm_logits,
    scmoe_generate,
    scmoe_logits,
)


def test_beta_zero_equals_greedy_decoding_moekit(tiny_lm):
    model = tiny_lm()
    ids = torch.randint(0, 31, (3, 4))
    out = scmoe_generate(model, ids, max_new_tokens=6, beta=0.0, rank=2)
    assert torch.equal(out, greedy_generate(model, ids, max_new_tokens=6))


def test_beta_zero_equals_greedy_decoding_hf(hf_moe):
    model = hf_moe("mixtral", 1)
    ids = torch.randint(0, 37, (2, 3))
    out = scmoe_generate(model, ids, max_new_tokens=4, beta=0.0, rank=1)
    want = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, want)


def test_contrast_changes_decisions_for_positive_beta(tiny_lm):
    model = tiny_lm()
    ids = torch.randint(0, 31, (4, 16))
    with torch.no_grad():
        strong = lm_logits(model, ids)
        sc = scmoe_logits(model, ids, alpha=0.5, beta=2.0, rank=2)
    assert (sc.argmax(-1) != strong.argmax(-1)).any()  # the weak pass really differs


def test_rank_zero_with_weight_one_equals_top1_routing(tiny_lm):
    model = tiny_lm()
    ids = torch.randint(0, 31, (2, 7))
    with torch.no_grad(), RankKRouting(model, rank=0):
        weak = model(ids)
    for ref in find_moe_blocks(model):
        ref.router.top_k = 1  # renormalised top-1 has weight exactly 1
    with torch.no_grad():
        assert torch.equal(weak, model(ids))


def test_plausibility_constraint_and_shift_invariance():
    torch.manual_seed(0)
    s, w = torch.randn(5, 11), torch.randn(5, 11)
    sc = contrast_scores(s, w, alpha=0.1, beta=0.5)
    assert torch.isfinite(sc.gather(1, s.argmax(1, keepdim=True))).all()  # strong argmax is always valid
    valid = torch.isfinite(sc)
    assert torch.equal(valid, s >= math.log(0.1) + s.max(1, keepdim=True).values)
    assert torch.equal(sc.argmax(1), contrast_scores(s + 3.0, w - 7.0, alpha=0.1, beta=0.5).argmax(1))
    only = contrast_scores(s, w, alpha=1.0, beta=0.5)
    assert torch.equal(torch.isfinite(only).sum(1), torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha"):
        contrast_scores(s, w, alpha=0.0)
