"""Sparse upcycling and BAM: the mixture equals its dense source(s) at initialisation."""

import pytest
import torch

from moe_core.surgery.upcycling import (
    CausalSelfAttention,
    MixtureOfAttentionExperts,
    bam_merge,
    upcycle_ffn,
    upcycle_model,
)


def test_upcycled_top1_uses_the_raw_probability_and_refuses_renormalisation(dense_ffn):
    """Top-1: a renormalised single weight is a constant 1 (no router gradient), so the default is the raw
    top-1 probability (the layer equals p_max * FFN at init) and an explicit renormalize=True is refused."""
    ffn = dense_ffn()
    moe = upcycle_ffn(ffn, num_experts=5, top_k=1, router_std=1.0)
    x = torch.randn(40, 12, dtype=torch.float64)
    out = moe(x)
    p_max = out.routing.probs.max(-1, keepdim=True).values.to(x.dtype)  # (N, 1)
    assert (p_max < 0.99).any()
    torch.testing.assert_close(out.output, p_max * ffn(x), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="top_k=1|top_k == 1|constant"):
        upcycle_ffn(ffn, num_experts=5, top_k=1, renormalize=True)


@pytest.mark.parametrize("top_k", [2, 3])
def test_upcycled_layer_equals_dense_ffn_with_renormalised_topk(top_k, dense_ffn):
    ffn = dense_ffn()
    moe = upcycle_ffn(ffn, num_experts=5, top_k=top_k, router_std=1.0)  # large router: routing really varies
    x = torch.randn(40, 12, dtype=torch.float64)
    out = moe(x)
    assert out.routing.indices.unique().numel() > 1
    torch.testing.assert_close(out.output, ffn(x), rtol=1e-6, atol=1e-7)  # float32 router weights


def test_upcycled_layer_without_renormalisation_scales_by_selected_mass(dense_ffn):
    ffn = dense_ffn()
    moe = upcycle_ffn(ffn, num_experts=4, top_k=2, renormalize=False, router_std=0.1)
    x = torch.randn(30, 12, dtype=torch.float64)
    out = moe(x)
    mass = out.routing.weights.sum(-1, keepdim=True).to(x.dtype)
    assert (mass < 0.9).all()  # the relation is not trivially the renormalised one
    torch.testing.assert_close(out.output, mass * ffn(x), rtol=1e-6, atol=1e-7)


def test_upcycled_expert_parameters_are_e_times_dense(dense_ffn):
    ffn = dense_ffn()
    moe = upcycle_ffn(ffn, num_experts=7, top_k=2)
    dense_params = sum(p.numel() for p in ffn.parameters())
    assert sum(p.numel() for p in moe.experts.parameters()) == 7 * dense_params


def test_upcycle_model_keeps_logits_of_dense_lm(tiny_lm):
    dense = tiny_lm(dense=True).double()
    names = ["blocks.0.ffn", "blocks.2.ffn"]  # every other layer, as in the paper
    moe = upcycle_model(dense, ffn_names=names, num_experts=4, top_k=2, router_std=1.0)
    ids = torch.randint(0, 31, (3, 9))
    torch.testing.assert_close(moe(ids), dense(ids), rtol=1e-6, atol=1e-6)
    assert (
        type(moe.blocks[1].ffn).__name__ == "DenseSwiGLU" and type(moe.blocks[0].ffn).__name__ == "MoELayer"
    )
    with pytest.raises(ValueError, match="ffn_names"):
        upcycle_model(dense, ffn_names=[], num_experts=4, top_k=2)


def test_hf_mistral_upcycled_to_mixtral_matches_dense():
    transformers = pytest.importorskip("transformers")
    from moe_core.surgery.upcycling import mixtral_from_dense

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=41,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    dense = transformers.MistralForCausalLM(cfg).eval()
    moe = mixtral_from_dense(dense, num_experts=4, top_k=2, router_std=1.0).eval()
    ids = torch.randint(0, 41, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 48, 16)


@pytest.mark.parametrize("kv_shared", [False, True])
def test_bam_of_identical_models_reproduces_the_dense_model(tiny_lm, kv_shared):
    dense = tiny_lm(dense=True).double()
    names = [f"blocks.{i}" for i in range(3)]
    mixed = bam_merge(
        [dense, dense, dense],
        ffn_names=[n + ".ffn" for n in names],
        attention_names=[n + ".attn" for n in names],
        top_k=2,
        kv_shared=kv_shared,
        router_std=1.0,
    )
    ids = torch.randint(0, 31, (2, 8))
    torch.testing.assert_close(mixed(ids), dense(ids), rtol=1e-6, atol=1e-6)
    assert mixed.blocks[0].ffn.experts.num_experts == 3


def test_bam_averages_shared_parameters_and_keeps_each_models_experts(tiny_lm):
    a, b = tiny_lm(seed=1, dense=True), tiny_lm(seed=2, dense=True)
    mixed = bam_merge([a, b], ffn_names=["blocks.0.ffn"], attention_names=["blocks.0.attn"], top_k=1)
    torch.testing.assert_close(mixed.embed.weight, (a.embed.weight + b.embed.weight) / 2)
    torch.testing.assert_close(
        mixed.blocks[1].ffn.up_proj.weight,
        (a.blocks[1].ffn.up_proj.weight + b.blocks[1].ffn.up_proj.weight) / 2,
    )
    torch.testing.assert_close(mixed.blocks[0].ffn.experts.up_proj[1], b.blocks[0].ffn.up_proj.weight.t())
    torch.testing.assert_close(mixed.blocks[0].attn.experts[0].q_proj.weight, a.blocks[0].attn.q_proj.weight)
    with pytest.raises(ValueError, match="top_k"):
        bam_merge([a, b], ffn_names=["blocks.0.ffn"], attention_names=[], top_k=3)


def test_kv_shared_attention_experts_with_identical_experts_equal_one_attention():
    torch.manual_seed(0)
    att = CausalSelfAttention(dim=12, num_heads=3).double()
    mix = MixtureOfAttentionExperts(attentions=[att, att], kv_shared=True, router_std=2.0).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(mix(x), att(x), rtol=1e-6, atol=1e-6)  # float32 soft routing
    assert not hasattr(mix.experts[0], "k_proj")  # K/V are stored once
