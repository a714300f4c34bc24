"""Expert parallelism and FSSDP on 2 and 4 gloo processes equal one process (outputs, gradients, losses).

One ``torch.multiprocessing.spawn`` per world size runs every scenario; the oracle (the single-process
``MoELayer`` / training loop) is computed here in the parent and compared with each rank's results.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moekit_parallel_workers as W  # noqa: E402

from moe_core.parallel.fssdp import flatten_experts  # noqa: E402

ATOL = 1e-5


def _spawn(world: int, outdir: Path, ckpt_in: Path | None) -> list[dict]:
    mp.spawn(
        W.worker, args=(world, W.free_port(), str(outdir), str(ckpt_in) if ckpt_in else None), nprocs=world
    )
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    out = tmp_path_factory.mktemp("world2")
    return {"world": 2, "ranks": _spawn(2, out, None), "ckpt": out / "ckpt.pt"}


@pytest.fixture(scope="module")
def run4(tmp_path_factory, run2):
    out = tmp_path_factory.mktemp("world4")
    return {"world": 4, "ranks": _spawn(4, out, run2["ckpt"])}


@pytest.fixture(params=[2, 4], ids=["world2", "world4"])
def run(request, run2):
    return run2 if request.param == 2 else request.getfixturevalue("run4")


def _reference(router_kind: str):
    layer = W.build_layer(router_kind)
    x, g = W.tokens()
    x = x.clone().requires_grad_(True)
    out = layer(x).output
    out.backward(g)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    return layer, out.detach(), x.grad, grads


def test_reference_has_an_expert_without_tokens():
    layer, *_ = _reference("topk")
    x, _ = W.tokens()
    routing = layer.router(x)
    assert routing.counts()[W.EMPTY_EXPERT] == 0
    assert (routing.counts() > 0).sum() == W.E - 1


@pytest.mark.parametrize("router_kind", ["topk", "masked", "cold"])
def test_expert_parallel_equals_single_process(run, router_kind):
    world, ranks = run["world"], run["ranks"]
    layer, out, x_grad, grads = _reference(router_kind)
    local = W.E // world
    dense_sum: dict[str, torch.Tensor] = {}
    for r, res in enumerate(ranks):
        got = res["layers"][("ep", router_kind)]
        lo, hi = W.token_slices(world)[r]
        torch.testing.assert_close(got["out"], out[lo:hi], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(got["x_grad"], x_grad[lo:hi], atol=ATOL, rtol=1e-5)
        for name, g in got["grads"].items():
            if name.startswith("experts."):  # expert shard: kept on the owner, equals the reference slice
                torch.testing.assert_close(g, grads[name][r * local : (r + 1) * local], atol=ATOL, rtol=1e-5)
            else:  # dense: partial sums over this rank's tokens
                dense_sum[name] = dense_sum.get(name, 0) + g
    assert set(dense_sum) == {n for n in grads if not n.startswith("experts.")}
    for name, g in dense_sum.items():
        torch.testing.assert_close(g, grads[name], atol=ATOL, rtol=1e-5)
    if router_kind == "cold" and world == 4:  # the scenario really has a rank that receives no token
        assert ranks[3]["layers"][("ep", "cold")]["stats"]["rows_computed"] == 0
    # the empty expert's gradient is exactly zero on its owner
    owner = W.EMPTY_EXPERT // local
    e_local = W.EMPTY_EXPERT % local
    owner_grads = ranks[owner]["layers"][("ep", router_kind)]["grads"]
    assert owner_grads["experts.gate_up_proj"][e_local].abs().max() == 0


@pytest.mark.parametrize("kind", ["fssdp", "fssdp_remat"])
@pytest.mark.parametrize("router_kind", ["topk", "masked", "cold"])
def test_sparse_materialisation_equals_single_process(run, kind, router_kind):
    world, ranks = run["world"], run["ranks"]
    layer, out, x_grad, grads = _reference(router_kind)
    ref_flat_grad = flatten_experts(_with_grads(layer, grads))[0]  # (E, P)
    shard_grads = []
    dense_sum: dict[str, torch.Tensor] = {}
    for r, res in enumerate(ranks):
        got = res["layers"][(kind, router_kind)]
        lo, hi = W.token_slices(world)[r]
        torch.testing.assert_close(got["out"], out[lo:hi], atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(got["x_grad"], x_grad[lo:hi], atol=ATOL, rtol=1e-5)
        shard_grads.append(got["grads"]["expert_shard"])
        for name, g in got["grads"].items():
            if name != "expert_shard":
                dense_sum[name] = dense_sum.get(name, 0) + g
        # only experts selected by this rank's tokens were materialised
        assert got["stats"]["experts_materialised"] <= W.E - 1
    if router_kind == "cold" and world == 4:  # rank 0 materialises nothing (all its slots are dropped)
        assert ranks[0]["layers"][(kind, "cold")]["stats"]["experts_materialised"] == 0
    full = torch.cat(shard_grads, dim=1)[:, : ref_flat_grad.shape[1]]  # (E, P)
    torch.testing.assert_close(full, ref_flat_grad, atol=ATOL, rtol=1e-5)
    for name, g in dense_sum.items():
        torch.testing.assert_close(g, grads[name], atol=ATOL, rtol=1e-5)


def _with_grads(layer, grads):
    bank = copy.deepcopy(layer.experts)
    for name, p in bank.named_parameters():
        p.data = grads[f"experts.{name}"].clone()
    return bank


@pytest.mark.parametrize("kind", ["ep", "fssdp"])
def test_training_steps_match_single_process(run, kind):
    ref = W.reference_training(run["world"])
    for res in run["ranks"]:
        assert res[f"train_{kind}"] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert ref[-1] < ref[0]  # the oracle itself learns (the comparison is not vacuous)


def test_checkpoint_from_world2_loads_at_world1_and_world4(run2, run4):
    ck = torch.load(run2["ckpt"], weights_only=False)
    net = W.TinyNet(seed=99).double()
    net.load_state_dict(ck["state_dict"])  # world size 1: plain single-process model, same keys and shapes
    probe, _ = W.tokens(10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(net(probe.double()), ck["probe_out"], atol=1e-6, rtol=1e-6)
    for res in run4["ranks"]:
        torch.testing.assert_close(res["loaded_probe_ep"], ck["probe_out"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(res["loaded_probe_fssdp"], ck["probe_out"], atol=1e-6, rtol=1e-6)


def test_reported_bytes_match_the_routing(run):
    """EP ``bytes_step`` = 4 crossings x (pairs sent + received) x D x 4 bytes; FSSDP counts whole experts."""
    world, ranks = run["world"], run["ranks"]
    layer = W.build_layer("topk")
    x, _ = W.tokens()
    with torch.no_grad():
        idx = layer.router(x).indices  # (N, K)
    owner = idx // (W.E // world)  # (N, K)
    src = torch.zeros_like(owner)
    for r, (lo, hi) in enumerate(W.token_slices(world)):
        src[lo:hi] = r
    chunk = -(-flatten_experts(layer.experts)[0].shape[1] // world)
    need = torch.zeros(world, W.E, dtype=torch.bool)
    need[src.reshape(-1), idx.reshape(-1)] = True
    for r, res in enumerate(ranks):
        sent = int(((src == r) & (owner != r)).sum())
        received = int(((src != r) & (owner == r)).sum())
        assert res["layers"][("ep", "topk")]["stats"]["bytes_step"] == 4 * (sent + received) * W.D * 4
        st = res["layers"][("fssdp", "topk")]["stats"]
        assert st["experts_materialised"] == int(need[r].sum())
        assert st["bytes_gather_received"] == need[r].sum() * (world - 1) * chunk * 4
        assert st["bytes_gather_sent"] == (need.sum() - need[r].sum()) * chunk * 4
