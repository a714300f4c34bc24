"""2-D (data x expert) parallelism and world-size-independent distributed checkpoints (issue 17).

Oracle: one process training the same float64 LM on the whole batch. Step 1 runs on 4 gloo processes as a
(dp 2, ep 2) mesh: logits and (synced) gradients equal the single-process ones; its
``torch.distributed.checkpoint`` folder resumes step 2 on 2 processes (ep 2), whose checkpoint resumes step 3
in one process: parameters after 3 steps equal 3 uninterrupted single-process steps (optimizer state
included: AdamW moments that were lost would change the third update)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moekit_mesh_workers as W  # noqa: E402

from moe_core.parallel.mesh import load_distributed  # noqa: E402

TOL = dict(rtol=1e-6, atol=1e-12)  # float64 model; routing math runs in float32
# after three AdamW steps: m / sqrt(v) amplifies the float32 routing rounding of tiny gradient entries
PARAM_TOL = dict(rtol=1e-5, atol=1e-9)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, ep: int, out: Path, step: int, load: Path | None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(W.worker, args=(world, ep, _port(), str(out), step, str(load) if load else None), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _reference_steps(n: int) -> tuple[torch.nn.Module, list[dict]]:
    model = W.build()
    opt = W.optimizer(model)
    record = []
    for step in range(1, n + 1):
        loss, logits = W.local_loss(model, step, 0, 1)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        record.append({"logits": logits.detach(), "grads": grads})
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, record


@pytest.mark.slow
def test_2d_mesh_step_and_checkpoint_resume_4_2_1(tmp_path):
    ref_model, ref = _reference_steps(3)
    a = _spawn(4, 2, tmp_path / "a", 1, None)
    local = W.CFG["num_experts"] // 2  # experts per ep rank
    for r, res in enumerate(a):
        assert res["converted"] == ["blocks.0.ffn", "blocks.1.ffn"]
        assert (res["dp_rank"], res["ep_rank"]) == (r // 2, r % 2)
        torch.testing.assert_close(res["logits"], ref[0]["logits"][r : r + 1], **TOL)
        for n, g in res["grads"].items():
            want = ref[0]["grads"][n]
            if ".ffn.experts." in n:  # this rank's shard of the full gradient
                want = want[res["ep_rank"] * local : (res["ep_rank"] + 1) * local]
            torch.testing.assert_close(g, want, **TOL, msg=n)
    b = _spawn(2, 2, tmp_path / "b", 2, tmp_path / "a" / "ckpt")
    for r, res in enumerate(b):
        torch.testing.assert_close(res["logits"], ref[1]["logits"][2 * r : 2 * r + 2], **TOL)
    model = W.build()
    opt = W.optimizer(model)
    load_distributed(str(tmp_path / "b" / "ckpt"), model, opt)  # one process, no process group
    loss, logits = W.local_loss(model, 3, 0, 1)
    torch.testing.assert_close(logits.detach(), ref[2]["logits"], **TOL)
    loss.backward()
    opt.step()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **PARAM_TOL, msg=lambda m, n=n: f"{n}: {m}")
    # the optimizer state travelled (AdamW's step count: 3 updates, not 1 after a fresh start)
    assert all(int(opt.state[p]["step"]) == 3 for p in model.parameters())
