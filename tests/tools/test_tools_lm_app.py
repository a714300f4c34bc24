"""The tools on the LM app's own model (apps.lm.model.TransformerLM with moe_core MoELayers), as library
calls and as the app's ``merge`` / ``quantize`` commands."""

import copy

import scipy.optimize  # noqa: F401 - merge_model needs it; a dev dependency, so a missing one must fail
import torch

from apps.lm import commands
from apps.lm.model import LMConfig, TransformerLM
from moe_core.inference.c3po import collect_pathways, remixed_logits
from moe_core.inference.offload import offload_model
from moe_core.inference.scmoe import greedy_generate, scmoe_generate
from moe_core.surgery.bank import count_parameters, find_moe_blocks
from moe_core.surgery.mcsmoe import collect_routing_stats, compress_model, merge_model
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


def test_merge_and_quantize_commands_equal_the_library_calls(tmp_path):
    """``moekit lm merge`` / ``quantize`` (apps.lm.commands, jsonargparse) on a saved LM: the options keep
    their historical spellings and reach the library functions (oracle: the same calls made directly)."""
    model = _lm()
    calib = torch.randint(0, 29, (4, 10), generator=torch.Generator().manual_seed(1))
    probe = torch.randint(0, 29, (2, 10), generator=torch.Generator().manual_seed(2))
    torch.save(model, tmp_path / "moe.pt")
    torch.save(calib, tmp_path / "calib.pt")

    def run(command, out: str, *argv: str):
        command(["--model", str(tmp_path / "moe.pt"), *argv, "--out", str(tmp_path / out)])
        got = torch.load(tmp_path / out, weights_only=False)
        with torch.no_grad():
            return got, got(probe).logits

    def oracle(*edits):
        want = copy.deepcopy(model)
        for edit in edits:
            edit(want)
        with torch.no_grad():
            return want(probe).logits

    def merged(m):
        merge_model(m, collect_routing_stats(m, calib.split(2)), num_groups=3)

    got, logits = run(commands.merge, "merged.pt", "--calib", str(tmp_path / "calib.pt"), "--num-groups", "3",
                      "--batch-size", "2")
    torch.testing.assert_close(logits, oracle(merged), rtol=0, atol=0)
    assert count_parameters(got) < count_parameters(model)
    _, logits = run(commands.merge, "compressed.pt", "--calib", str(tmp_path / "calib.pt"), "--num-groups",
                    "3", "--batch-size", "2", "--rank", "2", "--keep-ratio", "0.5")
    torch.testing.assert_close(
        logits, oracle(merged, lambda m: compress_model(m, rank=2, keep_ratio=0.5)), rtol=0, atol=0
    )
    got, logits = run(commands.quantize, "q4.pt", "--bits", "4", "--group-size", "8")
    torch.testing.assert_close(
        logits, oracle(lambda m: quantize_model_experts(m, bits=4, group_size=8)), rtol=0, atol=0
    )
    with torch.no_grad():
        assert (logits - model(probe).logits).abs().max() > 1e-4  # 4 bits really changed the experts
