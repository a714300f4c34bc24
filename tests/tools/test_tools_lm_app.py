"""The tools on the LM app's own model (apps.lm.model.TransformerLM with moe_core MoELayers)."""

import copy

import scipy.optimize  # noqa: F401 - merge_model needs it; a dev dependency, so a missing one must fail
import torch

from apps.lm.model import LMConfig, TransformerLM
from moe_core.inference.c3po import collect_pathways, remixed_logits
from moe_core.inference.offload import offload_model
from moe_core.inference.scmoe import greedy_generate, scmoe_generate
from moe_core.surgery.bank import count_parameters, find_moe_blocks
from moe_core.surgery.mcsmoe import collect_routing_stats, merge_model
from moe_core.surgery.quant import quantize_model_experts


def _lm(seed=0):
    torch.manual_seed(seed)
    cfg = LMConfig(
        vocab_size=29,
        context_len=24,
        dim=16,
        n_layers=3,
        n_heads=2,
        ffn_hidden=32,
        ffn="moe",
        num_experts=6,
        top_k=2,
        expert_backend="loop",
    )
    model = TransformerLM(config=cfg).eval()
    with torch.no_grad():  # a non-trivial routing
        for ref in find_moe_blocks(model):
            ref.router.gate.weight.normal_(0, 1.0)
    return model


def test_lm_app_model_merge_quantise_offload_scmoe_c3po():
    model = _lm()
    refs = find_moe_blocks(model)
    assert len(refs) == 3
    ids = torch.randint(0, 29, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
    # SCMoE beta 0 == greedy; C3PO with the model's own pathways == unchanged
    assert torch.equal(
        scmoe_generate(model, ids[:, :4], max_new_tokens=3, beta=0.0),
        greedy_generate(model, ids[:, :4], max_new_tokens=3),
    )
    own = collect_pathways(model, ids, blocks=[1, 2])
    with torch.no_grad():
        assert torch.equal(remixed_logits(model, ids, own, blocks=[1, 2]), want)
    # offloading is exact
    off = copy.deepcopy(model)
    offload_model(off, capacity=0.5, prefetch_size=1)
    with torch.no_grad():
        assert torch.equal(off(ids).logits, want)
    # merging halves the experts and keeps routers; quantisation at 8 bits stays close
    merged = copy.deepcopy(model)
    merge_model(merged, collect_routing_stats(merged, [ids], forward=lambda m, x: m(x)), num_groups=3)
    assert count_parameters(merged) < count_parameters(model)
    assert all(
        torch.equal(a.router.gate.weight, b.router.gate.weight) for a, b in zip(find_moe_blocks(merged), refs)
    )
    banks = quantize_model_experts(model, bits=8)
    errs = []
    for bits in (8, 2):
        for q in banks:
            q.set_bits(bits)
        with torch.no_grad():
            errs.append(float((model(ids).logits - want).abs().max()))
    assert 0 < errs[0] < errs[1] / 4, errs
