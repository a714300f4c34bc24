"""Micro-benchmark of moekit's multi-gate backbones (MMoE: Ma et al., KDD 2018; PLE: Tang et al., RecSys 2020;
HoME: arXiv 2408.05430): the stacked gates (one matmul for all task gates, one ``bmm`` for all task mixtures)
against the per-task Python loop they replaced, on the same module and weights, interleaved in one process.

The loop versions (``moe_core.reference.loop_mmoe`` / ``loop_ple``, ``loop_home`` below) are the
pre-stacking forwards (``moe_core.multigate`` before the stacked gates): each task's gate called alone and
each task mixed alone with :func:`moe_core.multigate.mix`; both call the same (current) expert banks, so the
ratio is what stacking the gates and mixtures alone buys. Outputs are checked equal (float32, 1e-5) before
timing. Shapes follow the KuaiRand benchmark configs (``apps/recsys/configs``):
B=1024 rows, D=319 inputs, M=8 tasks, experts [128, 64].

Usage: ``python benchmarks/multigate_speed.py [--blocks 7] [--steps 5] [--threads 1]``
Writes ``benchmarks/results/multigate_speed.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from moe_core.multigate import PLE, HoME, MMoE, mix, routing_float
from moe_core.reference import loop_mmoe, loop_ple

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "multigate_speed.json"


def loop_home(h: HoME, v: torch.Tensor) -> torch.Tensor:
    """Per-task loop HoME (two levels, as benchmarked): ``(B, D) -> (B, M, H)``."""
    m, p, q = h.num_tasks, h.num_per_category, h.num_per_task
    x_meta = h.meta_feature_gate(v) if h.meta_feature_gate is not None else v
    ex_meta = h.meta_experts(x_meta)
    z_cat = [mix(g(v), ex_meta) for g in h.meta_cat_gates]
    z_sh = mix(h.meta_shared_gate(v), ex_meta)
    ex_sh = h.shared_experts(z_sh)
    ex_cat = h.cat_experts(torch.stack(z_cat, 1).repeat_interleave(p, 1))
    task_cat = [z_cat[h.cat_of[t]] for t in range(m)]
    ex_task = h.task_experts(torch.stack(task_cat, 1).repeat_interleave(q, 1))
    cand = torch.cat([ex_sh, ex_cat, ex_task], 1)
    own_all = ex_task.view(ex_task.shape[0], m, q, -1).unbind(1)
    outs = []
    for t, g in enumerate(h.task_gates):
        h_t = mix(g(torch.cat([task_cat[t], z_sh], -1)), cand)
        if h.self_gate:
            logits = routing_float(h.self_gates[t](task_cat[t]))
            h_t = h_t + mix(torch.sigmoid(logits) if q == 1 else logits.softmax(-1), own_all[t])
        outs.append(h_t)
    return torch.stack(outs, 1)


def build(dim: int, tasks: int) -> dict[str, tuple[nn.Module, Callable, Callable]]:
    """name -> (module, stacked forward, loop forward), the KuaiRand configs' backbones."""
    mmoe = MMoE(dim=dim, num_tasks=tasks, num_experts=8, expert_hidden=(128, 64))
    ple = PLE(dim=dim, num_tasks=tasks, num_levels=2, num_shared=2, num_specific=1, expert_hidden=(128, 64))
    cats = [[0, 1], [2, 3, 4, 5, 7], [6]] if tasks == 8 else [list(range(tasks))]
    home = HoME(
        dim=dim, categories=cats, levels=2, meta_num_shared=2, meta_num_per_category=1, num_shared=2,
        num_per_category=1, num_per_task=1, expert_hidden=(128, 64), feature_gate_rank=8,
    )  # fmt: skip
    return {
        "mmoe": (mmoe, lambda v: mmoe(v).task_outputs, lambda v: loop_mmoe(mmoe, v)),
        "ple": (ple, lambda v: ple(v).task_outputs, lambda v: loop_ple(ple, v)),
        "home": (home, lambda v: home(v).task_outputs, lambda v: loop_home(home, v)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=319)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    v = torch.randn(args.batch, args.dim)
    models = build(args.dim, args.tasks)
    for name, (mod, fast, loop) in models.items():
        mod.eval()  # same BN statistics for the check
        with torch.no_grad():
            torch.testing.assert_close(fast(v), loop(v), rtol=1e-5, atol=1e-5, msg=name)
        mod.train()
    # forward + backward (input and parameter gradients), interleaved so load from other jobs hits all alike
    times: dict[str, list[float]] = {f"{n} ({k})": [] for n in models for k in ("stacked", "loop")}
    for i in range(args.blocks + 1):  # block 0: warm-up, not recorded
        for name, (mod, fast, loop) in models.items():
            for kind, fn in (("stacked", fast), ("loop", loop)):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    mod.zero_grad(set_to_none=True)
                    fn(v).square().mean().backward()
                if i:
                    times[f"{name} ({kind})"].append((time.perf_counter() - t0) / args.steps * 1e3)
        print(f"block {i}/{args.blocks}", flush=True)
    rows = [
        {"model": k, "ms_per_step_median": statistics.median(t), "ms_per_step_blocks": t}
        for k, t in times.items()
    ]
    speedup = {
        n: statistics.median(times[f"{n} (loop)"]) / statistics.median(times[f"{n} (stacked)"])
        for n in models
    }
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    payload = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch "
            f"{torch.__version__}, {args.threads} thread(s)",
            "protocol": f"backbone forward+backward (no embeddings, towers or optimizer), B={args.batch}, "
            f"D={args.dim}, M={args.tasks}, {args.blocks} interleaved blocks of {args.steps} steps, median",
        },  # fmt: skip
        "rows": rows,
        "speedup_loop_over_stacked": speedup,
    }
    tmp = Path(args.out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, args.out)
    print(
        json.dumps({"ms": {r["model"]: round(r["ms_per_step_median"], 2) for r in rows}, "speedup": speedup})
    )


if __name__ == "__main__":
    main()
