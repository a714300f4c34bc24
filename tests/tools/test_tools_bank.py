"""Bank adapters: the canonical layout round-trips and HF fused banks compute what moekit banks compute."""

import pytest
import torch

from moe_core.blocks import find_moe_blocks, get_expert_weights, set_expert_weights
from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer
from moe_core.routers import TopKRouter
from moe_core.surgery import mcsmoe, quant


@pytest.mark.parametrize("kind", ["mixtral", "olmoe", "qwen2_moe"])
def test_hf_bank_matches_moekit_bank_with_copied_weights(hf_moe, kind):
    model = hf_moe(kind, 0)
    refs = find_moe_blocks(model)
    assert len(refs) == 3 and all(r.kind == "hf" for r in refs)
    hf_bank = refs[0].experts
    g, u, d = get_expert_weights(hf_bank)
    ours = SwiGLUExperts(num_experts=g.shape[0], dim=g.shape[1], hidden_dim=g.shape[2], backend="loop")
    set_expert_weights(ours, g, u, d)
    x, idx, w = torch.randn(9, 16), torch.randint(0, 6, (9, 2)), torch.rand(9, 2)
    with torch.no_grad():
        torch.testing.assert_close(hf_bank(x, idx, w), ours(x, idx, w), rtol=1e-5, atol=1e-6)
    set_expert_weights(hf_bank, *get_expert_weights(ours))  # and back: unchanged
    assert torch.equal(get_expert_weights(hf_bank)[2], d)


def test_set_expert_weights_rejects_bad_shapes():
    bank = SwiGLUExperts(num_experts=2, dim=4, hidden_dim=6)
    with pytest.raises(ValueError, match="expected gate/up"):
        set_expert_weights(bank, torch.zeros(2, 4, 6), torch.zeros(2, 4, 6), torch.zeros(2, 4, 6))
    with pytest.raises(TypeError, match="not a known expert bank"):
        get_expert_weights(torch.nn.Linear(2, 2))


def test_merged_compressed_and_quantized_models_survive_save_and_load(tmp_path):
    """The library path of ``moekit lm merge`` / ``quantize``: load a saved model, edit it, save, load."""
    pytest.importorskip("scipy")
    torch.manual_seed(0)
    layer = MoELayer(
        router=TopKRouter(dim=8, num_experts=4, top_k=2),
        experts=SwiGLUExperts(num_experts=4, dim=8, hidden_dim=12, backend="loop"),
    )
    torch.save(layer, tmp_path / "m.pt")
    calib = torch.randn(64, 8)

    model = torch.load(tmp_path / "m.pt", weights_only=False).eval()
    mcsmoe.merge_model(model, mcsmoe.collect_routing_stats(model, calib.split(16)), num_groups=2)
    mcsmoe.compress_model(model, rank=4, keep_ratio=0.2)
    torch.save(model, tmp_path / "merged.pt")
    merged = torch.load(tmp_path / "merged.pt", weights_only=False)
    assert merged.experts.experts.num_experts == 2
    assert torch.equal(merged.router.gate.weight, layer.router.gate.weight)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).output, model(x).output)

    model = torch.load(tmp_path / "m.pt", weights_only=False).eval()
    quant.quantize_model_experts(model, bits=4)
    torch.save(model, tmp_path / "q.pt")
    q = torch.load(tmp_path / "q.pt", weights_only=False)
    assert q.experts.bits.tolist() == [4, 4, 4, 4]
    with torch.no_grad():
        torch.testing.assert_close(q(x).output, model(x).output)
        assert (q(x).output - layer(x).output).abs().max() < 0.1
