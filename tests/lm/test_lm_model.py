"""Model invariants: causality for every block kind, CoE(C=1, outer residual) == standard MoE block, SMHA with
all heads == MHA, parameter counting against a dense model, a tiny model overfits one batch."""

from __future__ import annotations

import copy

import pytest
import torch

from apps.lm.evomoe import evomoe_layers, switch_to_sparse
from apps.lm.model import LMConfig, TransformerLM, count_parameters
from apps.lm.routing import _CLASSES
from apps.lm.task import LMTask

V, T = 23, 12
SMALL = dict(vocab_size=V, context_len=T, dim=16, n_layers=2, n_heads=2, ffn_hidden=32)

VARIANTS = {
    "dense": dict(ffn="dense"),
    "moe_topk": dict(ffn="moe", num_experts=4, top_k=2),
    "deepseekmoe": dict(ffn="moe", num_experts=8, top_k=3, expert_hidden=8, num_shared_experts=1,
                        first_dense_layers=1),
    "coe": dict(ffn="coe", num_experts=4, top_k=1, coe_iterations=2),
    "top_p": dict(ffn="moe", num_experts=4, router="top_p", router_kwargs={"threshold": 0.5}),
    "evomoe_sparse": dict(ffn="evomoe", num_experts=4, top_k=1),
    "moa": dict(attention="moa", attn_experts=4, attn_top_k=2, ffn="moe", num_experts=4, top_k=2),
    "smha": dict(attention="smha", attn_top_k=1),
}


def _model(**kw) -> TransformerLM:
    torch.manual_seed(0)
    m = TransformerLM(config=LMConfig(**{**SMALL, **kw}))
    for layer in evomoe_layers(m):
        switch_to_sparse(layer, mask_ratio=0.3, seed=1)
    return m.eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality(name):
    m = _model(**VARIANTS[name])
    x = torch.randint(0, V, (3, T))
    for t in (0, 5, T - 2):
        x2 = x.clone()
        x2[:, t + 1 :] = (x2[:, t + 1 :] + 7) % V  # change every token after t
        a, b = m(x).logits, m(x2).logits
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the change is visible later (test can fail)


def test_coe_one_iteration_with_outer_residual_equals_moe_block():
    coe = _model(ffn="coe", num_experts=4, top_k=2, coe_iterations=1, coe_inner_residual=False,
                 coe_outer_residual=True)
    moe = _model(ffn="moe", num_experts=4, top_k=2)
    sd = coe.state_dict()
    # CoE stores the single router under ffn.routers.0, the MoE layer under ffn.router
    moe.load_state_dict({k.replace("ffn.routers.0.", "ffn.router."): v for k, v in sd.items()})
    x = torch.randint(0, V, (2, T))
    torch.testing.assert_close(coe(x).logits, moe(x).logits, rtol=0, atol=0)
    # with the paper's default (no outer residual, inner residual) the output differs
    coe.blocks[0].outer_residual = False
    assert not torch.allclose(coe(x).logits, moe(x).logits)


def test_coe_params_independent_of_iterations_apart_from_routers():
    p1 = count_parameters(_model(ffn="coe", num_experts=4, top_k=1, coe_iterations=1))["total"]
    p3 = count_parameters(_model(ffn="coe", num_experts=4, top_k=1, coe_iterations=3))["total"]
    assert p3 - p1 == 2 * SMALL["n_layers"] * 4 * SMALL["dim"]  # two extra routers (E x D) per layer
    m = _model(ffn="coe", num_experts=4, top_k=1, coe_iterations=3)
    assert len(m(torch.randint(0, V, (1, T))).routings) == 3 * SMALL["n_layers"]


def test_smha_with_all_heads_equals_mha():
    smha = _model(attention="smha", attn_top_k=SMALL["n_heads"])
    mha = _model(attention="mha")
    sd = {k: v for k, v in smha.state_dict().items() if ".attn.router." not in k}
    mha.load_state_dict(sd)
    x = torch.randint(0, V, (2, T))
    torch.testing.assert_close(smha(x).logits, mha(x).logits, rtol=1e-5, atol=1e-6)


def test_moa_one_expert_top1_equals_single_head_attention():
    m = _model(attention="moa", attn_experts=1, attn_top_k=1)
    blk = m.blocks[0].attn
    x = torch.randn(2, T, SMALL["dim"])
    y, _ = blk(x)
    hd = blk.head_dim
    q = blk.rope(blk.q(x)[:, None])  # (B, 1, T, hd)
    k, v = blk.kv(x).split(hd, dim=-1)
    att = (q @ blk.rope(k[:, None]).transpose(-1, -2)) / hd**0.5
    att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    ref = blk.proj((att @ v[:, None])[:, 0])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


def test_active_params_of_matched_moe_equal_dense_plus_router():
    dense = count_parameters(_model(ffn="dense"))
    moe = count_parameters(_model(ffn="moe", num_experts=4, top_k=2, expert_hidden=16))
    routers = SMALL["n_layers"] * 4 * SMALL["dim"]
    assert moe["active"] == dense["total"] + routers
    assert moe["total"] == dense["total"] + routers + SMALL["n_layers"] * 3 * SMALL["dim"] * 32
    ds = count_parameters(_model(ffn="moe", num_experts=8, top_k=3, expert_hidden=8, num_shared_experts=1))
    assert ds["active"] == dense["total"] + SMALL["n_layers"] * 8 * SMALL["dim"]


def test_bad_config_errors():
    with pytest.raises(ValueError, match="ffn"):
        LMConfig(ffn="sparse")
    with pytest.raises(ValueError, match="router"):
        _model(ffn="moe", router="nope")
    with pytest.raises(ValueError, match="context_len"):
        _model()(torch.zeros(1, T + 1, dtype=torch.long))


@pytest.mark.parametrize("name", ["dense", "moe_topk", "coe"])
def test_tiny_model_overfits_one_batch(name):
    torch.manual_seed(0)
    task = LMTask(config=LMConfig(**{**SMALL, **VARIANTS[name]}), lr=1e-2, warmup_steps=0, weight_decay=0.0)
    opt = task.configure_optimizers()["optimizer"]
    x = torch.randint(0, V, (4, T))
    y = torch.roll(x, -1, dims=1)
    first = None
    for _ in range(250):
        loss = task._losses(task.model(x), y)["ce"]
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.5 and float(loss) < 0.1, (first, float(loss))


def test_bf16_autocast_forward_runs_and_is_close():
    m = _model(**VARIANTS["moe_topk"])
    x = torch.randint(0, V, (2, T))
    ref = m(x).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x).logits
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1
    assert copy.deepcopy(m)(x).logits.shape == ref.shape


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "expert_choice", "top_p", "null_expert", "grouped",
                                    "sigmoid_topk", "dts"])
def test_every_router_kind_builds_and_trains_one_step(router):
    torch.manual_seed(0)
    kw = {"grouped": {"num_groups": 2}, "null_expert": {"num_null": 2}}.get(router, {})
    task = LMTask(config=LMConfig(**{**SMALL, "ffn": "moe", "num_experts": 4, "top_k": 2, "router": router,
                                     "router_kwargs": kw}), warmup_steps=0)
    blk = task.model.blocks[0]
    assert type(blk.ffn.router).__name__ == _CLASSES[router] and blk.ffn.router.num_experts == 4
    if hasattr(blk.ffn.router, "top_k"):
        assert blk.ffn.router.top_k == 2  # the config's k reaches every fixed-k router
    x = torch.randint(0, V, (2, T))
    out = task.model.train()(x)
    terms = task._losses(out, torch.roll(x, -1, dims=1))
    assert out.logits.shape == (2, T, V) and len(out.routings) == 2
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in blk.ffn.router.parameters())


def test_fused_optimizer_gives_the_same_update_as_the_loop():
    """Oracle: PyTorch's for-loop AdamW; the fused kernel (chosen by default on CPU) must match it."""
    params = {}
    for fused in (False, True):
        torch.manual_seed(0)
        task = LMTask(config=LMConfig(**{**SMALL, **VARIANTS["moe_topk"]}), lr=1e-3, fused_optimizer=fused)
        opt = task.configure_optimizers()["optimizer"]
        assert bool(opt.defaults.get("fused")) is fused
        x = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            loss = task._losses(task.model(x), torch.roll(x, -1, dims=1))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        params[fused] = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
    torch.testing.assert_close(params[True], params[False], rtol=1e-5, atol=1e-6)
    assert LMTask(config=LMConfig(**SMALL)).configure_optimizers()["optimizer"].defaults["fused"] is True
