"""Model invariants: causality for every block kind, CoE(C=1, outer residual) == standard MoE block, SMHA with
all heads == MHA, parameter counting against a dense model, a tiny model overfits one batch; every FFN kind is
a moe_core layer returning MoEOutput; routing statistics come from moe_core.stats; renamed router arguments
are refused by name."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from apps.lm.evomoe import evomoe_layers, switch_to_sparse
from apps.lm.model import EvoMoELayer, LMConfig, TransformerLM, count_parameters
from apps.lm.routing import _CLASSES, build_router
from apps.lm.task import LMTask
from moe_core.experts import SwiGLUExperts
from moe_core.layer import ChainOfExpertsLayer, DenseLayer, MoELayer
from moe_core.stats import routing_stats
from moe_core.types import MoEOutput

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


# every router kind the causal LM accepts (expert choice is refused: see test_non_causal_routing_is_refused)
LM_ROUTERS = {
    "topk": {}, "topk_k1": {}, "noisy_topk": {}, "top_p": {"threshold": 0.5}, "null_expert": {"num_null": 2},
    "grouped": {"num_groups": 2}, "sigmoid_topk": {},
    "sigmoid_topk_groups": {"num_groups": 2, "topk_groups": 1}, "dts": {},
}


def _router_variant(key: str) -> dict:
    kind = key.removesuffix("_k1").removesuffix("_groups")
    return dict(ffn="moe", num_experts=4, top_k=1 if key.endswith("_k1") else 2, router=kind,
                router_kwargs=LM_ROUTERS[key])


CAUSAL_CASES = {**VARIANTS, **{f"router_{k}": _router_variant(k) for k in LM_ROUTERS},
                "coe_sigmoid": dict(ffn="coe", num_experts=4, top_k=2, router="sigmoid_topk")}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(CAUSAL_CASES))
def test_causality(name, mode):
    """Changing tokens after t leaves logits up to t unchanged, in eval and in training mode (where the
    stochastic routers draw the same noise for both inputs: the generator is reseeded before each call)."""
    m = _model(**CAUSAL_CASES[name])
    m.train(mode == "train")
    x = torch.randint(0, V, (3, T))

    def logits(inp):
        torch.manual_seed(123)
        return m(inp).logits

    for t in (0, 5, T - 2):
        x2 = x.clone()
        x2[:, t + 1 :] = (x2[:, t + 1 :] + 7) % V  # change every token after t
        a, b = logits(x), logits(x2)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the change is visible later (test can fail)


def test_non_causal_routing_is_refused():
    """Expert choice leaked future tokens into earlier logits (6.8e-4 on the landed code); capacity dropping
    does too. Both are refused with an error that says why; expert choice stays available in moe_core."""
    with pytest.raises(ValueError, match="expert_choice.*not causal"):
        LMConfig(**{**SMALL, "ffn": "moe", "router": "expert_choice"})
    with pytest.raises(ValueError, match="expert_choice.*not causal"):
        LMConfig(**{**SMALL, "ffn": "coe", "router": "expert_choice"})
    with pytest.raises(ValueError, match="capacity_factor.*not causal"):
        LMConfig(**{**SMALL, "ffn": "moe", "router_kwargs": {"capacity_factor": 1.0}})


def test_coe_one_iteration_with_outer_residual_equals_moe_block():
    coe = _model(ffn="coe", num_experts=4, top_k=2, coe_iterations=1, coe_inner_residual=False,
                 coe_outer_residual=True)
    moe = _model(ffn="moe", num_experts=4, top_k=2)
    sd = coe.state_dict()
    # CoE stores the single router under ffn.routers.0, the MoE layer under ffn.router
    moe.load_state_dict({k.replace("ffn.routers.0.", "ffn.router."): v for k, v in sd.items()})
    x = torch.randint(0, V, (2, T))
    torch.testing.assert_close(coe(x).logits, moe(x).logits, rtol=0, atol=0)
    # with the CoE code's default (no outer residual, inner residual) the output differs
    coe.blocks[0].ffn_residual = False
    assert not torch.allclose(coe(x).logits, moe(x).logits)


def test_coe_block_keeps_the_residual_stream_by_default():
    # block output = h + z^C with h = x + attn(norm1(x)) (the stream every other FFN kind keeps); the CoE
    # code's default (z^C alone) stalled at the unigram loss in the Wikipedia benchmark
    model = _model(ffn="coe", num_experts=4, top_k=1, coe_iterations=2)
    block = model.blocks[0]
    x = torch.randn(2, T, model.config.dim)
    h = x + block.attn(block.norm1(x))[0]
    expected = h + block.ffn(block.norm2(h)).output
    torch.testing.assert_close(block(x)[0], expected)
    assert not torch.allclose(block(x)[0], block.ffn(block.norm2(h)).output)


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


@pytest.mark.parametrize("key", list(LM_ROUTERS))
def test_every_router_kind_builds_and_trains_one_step(key):
    torch.manual_seed(0)
    variant = _router_variant(key)
    task = LMTask(config=LMConfig(**{**SMALL, **variant}), warmup_steps=0)
    blk = task.model.blocks[0]
    assert type(blk.ffn.router) is _CLASSES[variant["router"]] and blk.ffn.router.num_experts == 4
    if hasattr(blk.ffn.router, "top_k"):
        assert blk.ffn.router.top_k == variant["top_k"]  # the config's k reaches every fixed-k router
    x = torch.randint(0, V, (2, T))
    out = task.model.train()(x)
    terms = task._losses(out, torch.roll(x, -1, dims=1))
    assert out.logits.shape == (2, T, V) and len(out.routings) == 2
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in blk.ffn.router.parameters())


ROUTER_GRAD_CASES = {
    **{f"router_{k}": _router_variant(k) for k in LM_ROUTERS},
    "coe_k1": dict(ffn="coe", num_experts=4, top_k=1, coe_iterations=2),
    "sigmoid_k1": dict(ffn="moe", num_experts=4, top_k=1, router="sigmoid_topk"),
    "moa": VARIANTS["moa"],
    "smha": VARIANTS["smha"],
}


@pytest.mark.parametrize("name", list(ROUTER_GRAD_CASES))
def test_task_loss_alone_trains_every_router(name):
    """With the balance, z and entropy terms off, the cross-entropy alone must send gradient to every router
    (on the landed code top-1 routing with renormalised weights got ~1e-14: every weight was exactly 1)."""
    torch.manual_seed(0)
    task = LMTask(config=LMConfig(**{**SMALL, **ROUTER_GRAD_CASES[name]}), w_balance=0.0, w_z=0.0,
                  w_entropy=0.0)
    x = torch.randint(0, V, (4, T))
    terms = task._losses(task.model.train()(x), torch.roll(x, -1, dims=1))
    torch.testing.assert_close(terms["loss"], terms["ce"], rtol=0, atol=0)  # nothing but the task loss
    terms["loss"].backward()
    routers = task.model.routers_by_name()
    assert routers, "the case has no router"
    router_params = {id(p) for r in routers.values() for p in r.parameters()}
    for rname, router in routers.items():
        g = router.gate.weight.grad
        assert g is not None, rname
        layer, slot = rname.split(".")[:2]  # e.g. layer0, ffn
        owner = getattr(task.model.blocks[int(layer.removeprefix("layer"))], slot)
        scale = max(float(p.grad.norm()) for p in owner.parameters()
                    if p.grad is not None and id(p) not in router_params)  # the experts / heads it routes to
        # a useful gradient: ~2e-2 of the routed weights' here (landed top-1: ~1e-10 of it)
        assert float(g.norm()) > 1e-3 * scale, (rname, float(g.norm()), scale)


def _expected_declared(router, r, batch_size: int) -> dict[str, torch.Tensor]:
    """Independent table of the loss each router's paper defines (the oracle for ``aux_losses``)."""
    from moe_core import losses as Lo

    kind = type(router).__name__
    if kind == "TopPRouter":
        return {"balance": Lo.switch_balance_loss(r), "entropy": Lo.top_p_entropy_loss(r)}
    if kind == "NoisyTopKRouter":
        return {"balance": Lo.noisy_load_importance_loss(
            r, w_importance=getattr(router, "w_importance", 1.0), w_load=getattr(router, "w_load", 1.0))}
    if kind == "NullExpertRouter":
        return {"balance": Lo.null_expert_balance_loss(r)}
    if kind == "SigmoidTopKRouter":
        return {"balance": Lo.deepseek_balance_loss(r, batch_size=batch_size, normalize_scores=True)}
    return {"balance": Lo.switch_balance_loss(r)}


@pytest.mark.parametrize("key", [k for k in LM_ROUTERS if k != "dts"])
def test_task_sums_the_loss_each_router_declares(key):
    """The LM's balance/entropy terms are the sum over routing decisions of each router's paper loss (the
    landed task added the Switch loss whatever the router)."""
    torch.manual_seed(0)
    task = LMTask(config=LMConfig(**{**SMALL, **_router_variant(key)}))
    x = torch.randint(0, V, (3, T))
    out = task.model.train()(x)
    terms = task._losses(out, torch.roll(x, -1, dims=1))
    routers = task.model.routers_by_name()
    want = {"balance": torch.zeros(()), "entropy": torch.zeros(())}
    for name, r in out.routings:
        for k, v in _expected_declared(routers[name], r, batch_size=3).items():
            want[k] = want[k] + v
    torch.testing.assert_close(terms["balance"], want["balance"])
    torch.testing.assert_close(terms["entropy"], want["entropy"])
    if key == "top_p":
        assert float(terms["entropy"]) > 0.1  # top-p declares its entropy loss (weight 1e-4 by default)


def test_sequence_wise_balance_differs_from_batch_balance():
    """DeepSeek-V3's loss is per sequence: on a batch whose sequences each prefer another expert the
    sequence-wise loss is above the whole-batch one, and the task uses the sequence-wise value."""
    from moe_core import losses as Lo

    torch.manual_seed(0)
    task = LMTask(config=LMConfig(**{**SMALL, **_router_variant("sigmoid_topk")}))
    x = torch.stack([torch.full((T,), i) for i in (1, 5, 9)])  # (3, T): one repeated token per sequence
    out = task.model.train()(x)
    _, r = out.routings[0]  # first MoE layer: each sequence routes its repeated token its own way
    seq = Lo.deepseek_balance_loss(r, batch_size=3, normalize_scores=True)
    whole = Lo.deepseek_balance_loss(r, normalize_scores=True)
    assert float(seq) > float(whole) + 1e-3
    terms = task._losses(out, torch.roll(x, -1, dims=1))
    expect = sum(Lo.deepseek_balance_loss(rr, batch_size=3, normalize_scores=True) for _, rr in out.routings)
    torch.testing.assert_close(terms["balance"], expect)


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


FFN_LAYERS = {"dense": DenseLayer, "moe": MoELayer, "coe": ChainOfExpertsLayer, "evomoe": EvoMoELayer}


@pytest.mark.parametrize("ffn", list(FFN_LAYERS))
def test_every_ffn_kind_is_a_moe_core_layer_returning_moe_output(ffn):
    """The FFN slot holds moe_core.layer parts (EvoMoE: a DTS router and a moe_core bank) and always returns
    MoEOutput: the block never asks which kind it holds, and routing names follow the routings returned."""
    kw = {"dense": {}, "moe": dict(num_shared_experts=1), "coe": dict(coe_iterations=3),
          "evomoe": {}}[ffn]
    m = _model(ffn=ffn, num_experts=4, top_k=2, first_dense_layers=1, **kw)
    assert isinstance(m.blocks[0].ffn, DenseLayer)
    ffn_layer = m.blocks[1].ffn
    assert type(ffn_layer) is FFN_LAYERS[ffn]
    if ffn != "dense":
        assert isinstance(ffn_layer.experts, SwiGLUExperts)
    z = torch.randn(2, T, SMALL["dim"])
    out = ffn_layer(z)
    assert isinstance(out, MoEOutput) and out.output.shape == z.shape
    want = {"dense": 0, "moe": 1, "coe": 3, "evomoe": 1}[ffn]
    assert len(out.routings()) == want
    names = [n for n, _ in m(torch.randint(0, V, (2, T))).routings]
    assert names == list(m.routers_by_name()) and len(names) == want


def test_routing_statistics_are_moe_core_stats_under_one_prefix():
    """The task logs every scalar of moe_core.stats.routing_stats (and the per-expert load) under
    routing/<stage>/<routing name>/<statistic>; nothing under the old train_routing/ names."""
    torch.manual_seed(0)
    task = LMTask(config=LMConfig(**{**SMALL, **VARIANTS["coe"]}))
    logged: dict[str, float] = {}
    task.log = lambda key, value, **kw: logged.__setitem__(key, float(value))
    out = task.model.train()(torch.randint(0, V, (3, T)))
    task._log_routing(out, "train")
    want = {}
    for name, r in out.routings:
        for key, v in routing_stats(r).items():
            if v.dim() == 0:
                want[f"routing/train/{name}/{key}"] = float(v)
            else:
                want.update({f"routing/train/{name}/{key}_e{e}": x for e, x in enumerate(v.tolist())})
    assert logged == pytest.approx(want)
    assert "routing/train/layer1.ffn.it1/load_entropy" in logged
    assert "routing/train/layer0.ffn.it0/entropy" in logged
    r = out.routings[0][1]
    load = r.counts().double() / r.counts().sum()
    ent = float(-(load * load.clamp_min(1e-30).log()).sum() / math.log(4))  # oracle of load_entropy
    assert logged["routing/train/layer0.ffn.it0/load_entropy"] == pytest.approx(ent, rel=1e-5)


@pytest.mark.parametrize(
    ("old", "new"), [("n_groups", "num_groups"), ("route_scale", "routed_scaling_factor")]
)
def test_renamed_router_kwargs_raise_naming_the_new_name(old, new):
    with pytest.raises(ValueError, match=f"router_kwargs.{old} was renamed {new}"):
        LMConfig(**{**SMALL, "ffn": "moe", "router": "sigmoid_topk", "router_kwargs": {old: 2}})
    with pytest.raises(ValueError, match=f"router_kwargs.{old} was renamed {new}"):
        build_router("sigmoid_topk", dim=8, num_experts=4, top_k=2, kwargs={old: 2})
