"""2-D (data x expert) parallelism, with replicated or FSDP2-sharded parameters, and world-size-independent
distributed checkpoints (issue 17).

Oracle: one process training the same float64 LM on the whole batch. Step 1 runs on 4 gloo processes as a
(dp 2, ep 2) mesh: logits and gradients (summed by ``sync_grads_2d``, or reduced by FSDP2 and gathered to full
tensors here) equal the single-process ones; its ``torch.distributed.checkpoint`` folder resumes step 2 on 2
processes, whose checkpoint resumes step 3 in one process: parameters after 3 steps equal 3 uninterrupted
single-process steps (optimizer state included: AdamW moments that were lost would change the third update).
The chains cross modes (a replicated checkpoint resumed under FSDP and vice versa) and mesh shapes
(EP 2 x DP 2 -> EP 2 x DP 1, or EP 1 x DP 2, where FSDP alone shards the experts)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader

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


def _spawn(world: int, ep: int, out: Path, step: int, load: Path | None, mode: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    args = (world, ep, _port(), str(out), step, str(load) if load else None, mode)
    mp.spawn(W.worker, args=args, nprocs=world)
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


# (mode of the 4-rank EP 2 x DP 2 step 1, (ep, mode) of the 2-rank step 2)
CHAINS = {
    "replicated": ("replicated", (2, "fsdp_world")),  # FSDP with dp = 1 for the experts
    "fsdp_world": ("fsdp_world", (1, "fsdp_world")),
    "fsdp_dp": ("fsdp_dp", (2, "replicated")),
}


def _check_step(results: list[dict], ref: dict, ep: int, rows: int) -> None:
    """Every rank's logits (its ``rows`` sequences) and gradients equal the single-process step's."""
    local = W.CFG["num_experts"] // ep  # experts per ep rank
    for r, res in enumerate(results):
        assert res["converted"] == ["blocks.0.ffn", "blocks.1.ffn"]
        assert (res["dp_rank"], res["ep_rank"]) == (r // ep, r % ep)
        torch.testing.assert_close(res["logits"], ref["logits"][r * rows : (r + 1) * rows], **TOL)
        assert res["grads"].keys() == ref["grads"].keys()
        for n, g in res["grads"].items():
            want = ref["grads"][n]
            if ".ffn.experts." in n:  # this rank's shard of the full gradient
                want = want[res["ep_rank"] * local : (res["ep_rank"] + 1) * local]
            tol = TOL
            if ".router." in n:  # float32 routing math: its error scales with the tensor, not each entry
                tol = dict(rtol=TOL["rtol"], atol=max(TOL["atol"], TOL["rtol"] * float(want.abs().max())))
            torch.testing.assert_close(g, want, **tol, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("chain", list(CHAINS))
def test_2d_mesh_step_and_checkpoint_resume_4_2_1(tmp_path, chain):
    mode_a, (ep_b, mode_b) = CHAINS[chain]
    ref_model, ref = _reference_steps(3)
    full_numel = sum(p.numel() for p in ref_model.parameters())
    expert_numel = sum(p.numel() for n, p in ref_model.named_parameters() if ".ffn.experts." in n)
    a = _spawn(4, 2, tmp_path / "a", 1, None, mode_a)
    _check_step(a, ref[0], ep=2, rows=1)
    for res in a:  # what each rank holds: EP halves the experts; FSDP also shards the dense weights
        if mode_a == "replicated":
            assert res["numel"] == full_numel - expert_numel // 2
        else:
            assert res["numel"] < (full_numel - expert_numel) // 2 + expert_numel // 4 + 64
    # FSDP runs write their own shards (no gather): DCP's chunks of a dense and an expert tensor
    chunks = {"replicated": (1, 1), "fsdp_world": (4, 4), "fsdp_dp": (2, 4)}[mode_a]
    meta = FileSystemReader(str(tmp_path / "a" / "ckpt")).read_metadata().state_dict_metadata
    for key, n in zip(("model.embed.weight", "optim.blocks.0.ffn.experts.gate_up_proj.exp_avg"), chunks):
        assert len(meta[key].chunks) == n, key
    b = _spawn(2, ep_b, tmp_path / "b", 2, tmp_path / "a" / "ckpt", mode_b)
    _check_step(b, ref[1], ep=ep_b, rows=2)
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
