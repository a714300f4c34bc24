"""Bank adapters: the canonical layout round-trips and HF fused banks compute what moekit banks compute."""

import pytest
import torch

from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer
from moe_core.routers import TopKRouter
from moe_core.surgery import mcsmoe, quant
from moe_core.surgery.bank import find_moe_blocks, get_expert_weights, set_expert_weights


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


def test_merge_and_quantize_commands_on_a_saved_model(tmp_path):
    pytest.importorskip("scipy")
    torch.manual_seed(0)
    layer = MoELayer(
        router=TopKRouter(dim=8, num_experts=4, top_k=2),
        experts=SwiGLUExperts(num_experts=4, dim=8, hidden_dim=12, backend="loop"),
    )
    torch.save(layer, tmp_path / "m.pt")
    torch.save(torch.randn(64, 8), tmp_path / "calib.pt")
    mcsmoe.main(
        [
            "--model",
            str(tmp_path / "m.pt"),
            "--calib",
            str(tmp_path / "calib.pt"),
            "--num-groups",
            "2",
            "--rank",
            "4",
            "--keep-ratio",
            "0.2",
            "--out",
            str(tmp_path / "merged.pt"),
        ]
    )
    merged = torch.load(tmp_path / "merged.pt", weights_only=False)
    assert merged.experts.experts.num_experts == 2 and torch.equal(
        merged.router.gate.weight, layer.router.gate.weight
    )
    quant.main(["--model", str(tmp_path / "m.pt"), "--bits", "4", "--out", str(tmp_path / "q.pt")])
    q = torch.load(tmp_path / "q.pt", weights_only=False)
    assert q.experts.bits.tolist() == [4, 4, 4, 4]
    x = torch.randn(5, 8)
    assert (q(x).output - layer(x).output).abs().max() < 0.1
