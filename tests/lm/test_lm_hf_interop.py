"""Hugging Face interop (issue 17): tiny random Mixtral, Qwen2-MoE (shared expert, qkv bias, grouped-query
attention), OLMoE (q/k norm) and Qwen3-MoE (per-head q/k norm) checkpoints imported into moekit give the
transformers logits (float32, tight tolerance); moekit models exported to transformers give moekit's logits;
export -> import round-trips the weights exactly; the exported directory loads with
``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from apps.lm.hf import _sparse_pattern, export_hf, from_hf, import_hf, to_hf  # noqa: E402
from apps.lm.model import LMConfig, TransformerLM  # noqa: E402
from apps.lm.tokenizers import BPETokenizer  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64, bos_token_id=None,
              eos_token_id=None,
              pad_token_id=None)  # fmt: skip


def _hf(family: str, vocab: int = 96, **kw) -> torch.nn.Module:
    common = {**COMMON, "vocab_size": vocab}
    cfgs = {
        "mixtral": lambda: transformers.MixtralConfig(**common, intermediate_size=24, num_local_experts=4),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
            **common, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40,
            num_experts=6, norm_topk_prob=False, **kw,
        ),
        "olmoe": lambda: transformers.OlmoeConfig(**common, intermediate_size=24, num_experts=4),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
            **common, intermediate_size=48, moe_intermediate_size=16, num_experts=4, head_dim=8,
            norm_topk_prob=True,
        ),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfgs[family](), dtype=torch.float32).eval()
    with torch.no_grad():  # random non-trivial norms and biases (their inits are ones / zeros)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
            elif "gate.weight" in name:
                p.normal_(0, 0.5)  # spread router choices
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe"])
def test_import_matches_transformers_logits(family):
    hf = _hf(family)
    lm = from_hf(hf)
    ids = torch.randint(0, 96, (3, 20))
    with torch.no_grad():
        want = hf(ids).logits
        got = lm(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert lm.config.n_kv_heads == 2 and lm.config.ffn == "moe"
    # the experts really are used sparsely (k of E), not a dense mixture
    assert lm.blocks[0].ffn.router.top_k == 2


def test_qwen2_mlp_only_layers_import_and_patterns_moekit_cannot_express():
    hf = _hf("qwen2_moe", mlp_only_layers=[0])  # layer 0 dense MLP, layer 1 MoE (the DeepSeekMoE pattern)
    lm = from_hf(hf)
    assert (lm.config.first_dense_layers, lm.config.moe_every) == (1, 1)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)
    assert _sparse_pattern(6, 1, [0, 1]) == (2, 1) and _sparse_pattern(6, 2, []) == (1, 2)
    with pytest.raises(ValueError, match=r"sparse layers \[0, 2, 3\]"):
        _sparse_pattern(4, 1, [1])  # a dense layer between MoE layers
    with pytest.raises(ValueError, match="no MoE layer"):
        _sparse_pattern(2, 1, [0, 1])


def test_qwen2_sparse_step_pattern_imports():
    hf = _hf("qwen2_moe", decoder_sparse_step=2)  # layer 0 dense MLP, layer 1 MoE
    lm = from_hf(hf)
    assert not lm.config.sparse_layer(0) and lm.config.sparse_layer(1)
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "extra"),
    [
        ("mixtral", {}),
        ("qwen2_moe", dict(attn_bias=True, num_shared_experts=1, router_kwargs={"renormalize": False})),
        ("qwen2_moe", dict(attn_bias=True, num_shared_experts=1, shared_gate=True, first_dense_layers=1,
                           moe_every=2)),
        # the shipped DeepSeekMoE (wikipedia_moe.yaml): no q/k/v bias, ungated shared expert, layer 0 dense
        ("qwen2_moe", dict(num_shared_experts=1, first_dense_layers=1, router_kwargs={"renormalize": False})),
        ("olmoe", dict(qk_norm="full")),
        ("qwen3_moe", dict(qk_norm="head", tie_embeddings=False)),
        ("qwen3_moe", dict(qk_norm="head", first_dense_layers=1)),
    ],
)
def test_export_matches_moekit_logits_and_round_trips(family, extra, tmp_path):
    torch.manual_seed(1)
    cfg = LMConfig(vocab_size=300, context_len=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                   ffn="moe", num_experts=4, top_k=2, expert_hidden=16, norm_eps=1e-6, **extra)
    lm = TransformerLM(config=cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    ids = torch.randint(0, 300, (2, 16))
    hf = to_hf(lm, family)
    assert hf.config.model_type == family
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm(ids).logits, rtol=1e-4, atol=1e-5)
    tok = BPETokenizer.fit("the cat sat on the mat. " * 50, vocab_size=300)
    out = export_hf(lm, tmp_path / "hf", tokenizer=tok, family=family)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, lm(ids).logits, rtol=1e-4, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(out)("the cat")["input_ids"] == tok.encode("the cat")
    back, tok2 = import_hf(out, context_len=32)
    assert tok2.encode("the mat") == tok.encode("the mat")
    a, b = lm.state_dict(), back.state_dict()
    gated_on_import = cfg.num_shared_experts and not cfg.shared_gate  # Qwen2-MoE's shared expert has a gate
    sparse = [i for i in range(cfg.n_layers) if cfg.sparse_layer(i)]
    assert [i for i in range(cfg.n_layers) if back.config.sparse_layer(i)] == sparse
    assert set(b) - set(a) == ({f"blocks.{i}.ffn.shared_gate.weight" for i in sparse} if gated_on_import
                               else set())  # fmt: skip
    for k in a:
        if "shared_experts.down_proj" in k and not cfg.shared_gate:
            continue  # exported as 2x down with a zero gate; checked through the logits below
        assert torch.equal(a[k], b[k]), k  # exact round trip
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, lm(ids).logits, rtol=1e-5, atol=1e-6)


def test_export_refuses_what_transformers_cannot_express():
    lm = TransformerLM(config=LMConfig(vocab_size=50, context_len=16, dim=16, n_layers=1, n_heads=2,
                                       ffn="coe", num_experts=4, top_k=1))
    with pytest.raises(ValueError, match="cannot export as .*ffn='coe'"):
        to_hf(lm)
    lm = TransformerLM(config=LMConfig(vocab_size=50, context_len=16, dim=16, n_layers=1, n_heads=2,
                                       ffn="moe", num_experts=4, top_k=2,
                                       router_kwargs={"routed_scaling_factor": 2.0}))
    with pytest.raises(ValueError, match="need plain 'topk'"):
        to_hf(lm)


def test_import_and_export_commands_and_continued_pretraining(tmp_path, capsys):
    from apps.lm.commands import export, import_
    from apps.lm.generate import load_checkpoint
    from apps.lm.task import LMTask

    tok = BPETokenizer.fit("the cat sat on the mat. " * 50, vocab_size=300)
    hf = _hf("qwen2_moe", vocab=tok.vocab_size)
    hf.save_pretrained(tmp_path / "qwen")
    from apps.lm.tokenizers import save_tokenizer

    save_tokenizer(tok, tmp_path / "qwen" / "tokenizer.json")
    ckpt = tmp_path / "imported.ckpt"
    import_([f"--hf-dir={tmp_path / 'qwen'}", f"--out={ckpt}", "--context-len=32"])
    printed = capsys.readouterr().out
    assert "init_weights:" in printed and "shared_gate: true" in printed
    model, tok2 = load_checkpoint(ckpt)  # what lm generate / lm test read
    ids = torch.randint(0, tok.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)
    assert tok2.encode("the cat") == tok.encode("the cat")
    # continued pretraining starts from exactly these weights
    task = LMTask(config=model.config, init_weights=str(ckpt))
    task.configure_model()
    for (k, a), b in zip(model.state_dict().items(), task.model.state_dict().values()):
        assert torch.equal(a, b), k
    small = LMConfig(**{**model.config.__dict__, "dim": 16, "n_heads": 2})
    bad = LMTask(config=small, init_weights=str(ckpt))
    with pytest.raises(ValueError, match="does not fit model.config"):
        bad.configure_model()
    export([f"--ckpt={ckpt}", f"--out-dir={tmp_path / 'back'}"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert loaded.config.model_type == "qwen2_moe"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)
