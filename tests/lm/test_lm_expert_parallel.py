"""The app's MoE LM converted by ``moe_core.parallel.convert_to_expert_parallel`` on 2 gloo processes equals
the single-process model: logits, every gradient, routing names and the gathered state dict."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moekit_lm_ep_workers as W  # noqa: E402

from moe_core.layer import MoELayer  # noqa: E402

WORLD = 2
# float64 model, but routing math runs in float32 (moekit convention): a router's weight gradient summed over
# another split of the tokens rounds differently, ~1e-7 relative (measured 3e-12 on gradients of 3e-5)
GRAD_TOL = dict(rtol=1e-6, atol=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("lm_ep")
    mp.spawn(W.worker, args=(WORLD, _free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(W.CONFIGS))
def test_expert_parallel_lm_equals_single_process(ranks, name):
    ref = W.build(name)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    x, y = W.batch()
    out = ref(x)
    W.loss_of(out.logits, y, y.numel()).backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    sparse = [f"blocks.{i}.ffn" for i, b in enumerate(ref.blocks) if isinstance(b.ffn, MoELayer)]
    assert len(sparse) == (2 if name == "deepseekmoe" else 3)
    local = ref.config.num_experts // WORLD
    dense_sum: dict[str, torch.Tensor] = {}
    for r, res in enumerate(ranks):
        got = res[name]
        assert got["converted"] == sparse
        assert all(got["layer_types"][int(s.split(".")[1])] == "ExpertParallelMoELayer" for s in sparse)
        torch.testing.assert_close(got["logits"], out.logits[W.rows(r, WORLD)], rtol=1e-10, atol=1e-12)
        assert got["routing_names"] == [n for n, _ in out.routings]
        assert got["routers_by_name"] == sorted(ref.routers_by_name())
        # the gathered state dict is the single-process one: checkpoints move between world sizes
        assert got["state"].keys() == state.keys()
        for k, v in state.items():
            torch.testing.assert_close(got["state"][k], v, rtol=0, atol=0, msg=k)
        assert got["grads"].keys() == grads.keys()
        for n, g in got["grads"].items():
            if ".ffn.experts." in n:  # this rank's expert shard: its slice of the full gradient
                torch.testing.assert_close(g, grads[n][r * local : (r + 1) * local], **GRAD_TOL, msg=n)
            else:  # replicated: partial sums over this rank's sequences
                dense_sum[n] = dense_sum.get(n, 0) + g
    for n, g in dense_sum.items():
        torch.testing.assert_close(g, grads[n], **GRAD_TOL, msg=n)
    # the comparison is not vacuous: every routed expert and every router got gradient
    for s in sparse:
        assert bool((grads[f"{s}.experts.gate_up_proj"].flatten(1).abs().sum(1) > 0).all()), s
        assert float(grads[f"{s}.router.gate.weight"].abs().sum()) > 0, s
