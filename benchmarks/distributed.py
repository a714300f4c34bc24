"""Scale-out benchmark: expert parallelism vs sparse materialisation (Hecate FSSDP, arXiv 2502.02581).

Part 1 (measured): per-step time (forward + backward + SGD step) and bytes moved per rank for a small MoE
model on 2 and 4 CPU processes (gloo), expert parallelism (``ep``, the baseline of the ratio) against sparse
materialisation (``sparse``) and sparse materialisation with re-gather in backward (``sparse_remat``).
Part 2 (model): the trace-driven simulation of ``moe_core.parallel.simulate`` for 8 to 256 devices on a
balanced and a skewed routing trace recorded from a moe_core TopKRouter.

Usage: .venv/bin/python benchmarks/distributed.py [--steps 12] [--quick]
Writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_core.experts import SwiGLUExperts  # noqa: E402
from moe_core.layer import MoELayer  # noqa: E402
from moe_core.parallel import convert_to_expert_parallel, convert_to_fssdp  # noqa: E402
from moe_core.parallel.expert_parallel import ExpertParallelMoELayer  # noqa: E402
from moe_core.parallel.fssdp import FSSDPMoELayer  # noqa: E402
from moe_core.parallel.simulate import (  # noqa: E402
    STRATEGIES,
    CostModel,
    bootstrap_trace,
    record_router_trace,
    simulate_trace,
)
from moe_core.routers import TopKRouter  # noqa: E402

DIM, HIDDEN, EXPERTS, TOP_K, LAYERS, TOKENS_PER_RANK = 128, 256, 16, 2, 2, 512


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            MoELayer(
                router=TopKRouter(dim=DIM, num_experts=EXPERTS, top_k=TOP_K),
                experts=SwiGLUExperts(num_experts=EXPERTS, dim=DIM, hidden_dim=HIDDEN),
            )
            for _ in range(LAYERS)
        )
        self.head = nn.Linear(DIM, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x).output
        return self.head(x).squeeze(-1)


def _layer_bytes(net: nn.Module) -> float:
    """Bytes this rank sent + received in one training step (forward and backward) over all MoE layers."""
    return sum(
        m.last_stats["bytes_step"]
        for m in net.modules()
        if isinstance(m, ExpertParallelMoELayer | FSSDPMoELayer)
    )


def _worker(rank: int, world: int, port: int, mode: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=300),
    )
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = Net()
    if mode == "ep":
        convert_to_expert_parallel(net)
        ignore = [n for n, _ in net.named_parameters() if ".experts." in n]
    else:
        convert_to_fssdp(net, rematerialize=(mode == "sparse_remat"))
        ignore = [n for n, _ in net.named_parameters() if n.endswith("expert_shard")]
    DDP._set_params_and_buffers_to_ignore_for_model(net, ignore)
    model = DDP(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(100 + rank)
    times, nbytes, mats = [], [], []
    for step in range(steps + 2):
        x = torch.randn(TOKENS_PER_RANK, DIM, generator=g)
        dist.barrier()
        t0 = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        dt = torch.tensor(time.perf_counter() - t0)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        if step >= 2:
            times.append(dt.item())
            nbytes.append(_layer_bytes(net))
            mats.append(
                sum(
                    m.last_stats.get("experts_materialised", 0.0)
                    for m in net.modules()
                    if isinstance(m, FSSDPMoELayer)
                )
            )
    shard_bytes = sum(p.numel() * p.element_size() for n, p in net.named_parameters() if n in ignore)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {"times": times, "bytes": nbytes, "materialised": mats, "expert_param_bytes": shard_bytes}, f
            )
    dist.barrier()  # nobody leaves while a peer still talks to it (a gloo subgroup otherwise hung at exit)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(steps: int) -> list[dict]:
    rows = []
    for world in (2, 4):
        base = None
        for mode in ("ep", "sparse", "sparse_remat"):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                mp.spawn(_worker, args=(world, _free_port(), mode, steps, out), nprocs=world)
                r = json.load(open(out))
            med = statistics.median(r["times"])
            row = {
                "part": "measured",
                "world": world,
                "mode": mode,
                "steps": steps,
                "step_ms_median": 1e3 * med,
                "step_ms_mean": 1e3 * statistics.mean(r["times"]),
                "step_ms_std": 1e3 * statistics.pstdev(r["times"]),
                "bytes_per_rank_step": statistics.mean(r["bytes"]),
                "experts_materialised_per_step": statistics.mean(r["materialised"]) if mode != "ep" else None,
                "resident_expert_param_bytes_per_rank": r["expert_param_bytes"],
            }
            base = row if mode == "ep" else base
            row["time_ratio_vs_ep"] = med / (base["step_ms_median"] / 1e3)
            row["bytes_ratio_vs_ep"] = row["bytes_per_rank_step"] / base["bytes_per_rank_step"]
            rows.append(row)
            print(
                f"world={world} {mode:13s} step {row['step_ms_median']:8.1f} ms "
                f"(mean {row['step_ms_mean']:.1f} ± {row['step_ms_std']:.1f}) "
                f"x{row['time_ratio_vs_ep']:.2f} vs ep | "
                f"bytes/rank/step {row['bytes_per_rank_step'] / 1e6:8.3f} MB "
                f"x{row['bytes_ratio_vs_ep']:.2f} | "
                f"resident expert params {row['resident_expert_param_bytes_per_rank'] / 1e6:.2f} MB",
                flush=True,
            )
    return rows


def simulate(quick: bool) -> list[dict]:
    num_experts, top_k, dim = 256, 8, 64
    torch.manual_seed(0)
    router = TopKRouter(dim=dim, num_experts=num_experts, top_k=top_k)
    balanced = torch.randn(20000, dim)
    direction = torch.randn(dim)
    skewed = torch.randn(20000, dim) + 2.5 * direction / direction.norm() * dim**0.5 / 4
    traces = {
        "balanced": record_router_trace(router, balanced),
        "skewed": record_router_trace(router, skewed),
    }
    model = CostModel(dim=7168, hidden_dim=2048, bytes_per_elem=2)
    rows = []
    devices = (8, 32, 256) if quick else (8, 16, 32, 64, 128, 256)
    for name, rec in traces.items():
        load = torch.bincount(rec.reshape(-1), minlength=num_experts).double()
        print(
            f"\ntrace {name}: expert load max/mean = {load.max() / load.mean():.2f}, "
            f"top-8 experts take {load.sort(descending=True).values[:8].sum() / load.sum():.1%} of pairs"
        )
        for tokens in (256, 4096):
            print(f"  tokens/device/step = {tokens}")
            print(f"  {'n':>4} " + " ".join(f"{s + ' GB/dev':>14} {s + ' imb':>10}" for s in STRATEGIES))
            for n in devices:
                trace = bootstrap_trace(
                    rec, num_experts=num_experts, num_devices=n, tokens_per_device=tokens, steps=2, seed=n
                )
                cells = []
                for s in STRATEGIES:
                    r = simulate_trace(trace, s, model)
                    rows.append(
                        {
                            "part": "simulated",
                            "trace": name,
                            "tokens_per_device": tokens,
                            "n_devices": n,
                            "strategy": s,
                            **r,
                        }
                    )
                    cells.append(f"{r['bytes_max'] / 1e9:14.3f} {r['imbalance']:10.2f}")
                print(f"  {n:>4} " + " ".join(cells), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--quick", action="store_true", help="fewer steps and device counts")
    args = ap.parse_args()
    steps = 4 if args.quick else args.steps
    measured = measure(steps)
    simulated = simulate(args.quick)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at end, "
        f"torch {torch.__version__}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit.strip(),
        "measured_model": {
            "dim": DIM,
            "hidden_dim": HIDDEN,
            "experts": EXPERTS,
            "top_k": TOP_K,
            "layers": LAYERS,
            "tokens_per_rank": TOKENS_PER_RANK,
            "dtype": "float32",
            "backend": "gloo",
        },
        "cost_model": CostModel(dim=7168, hidden_dim=2048, bytes_per_elem=2).__dict__,
    }
    out = ROOT / "benchmarks" / "results" / "distributed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": measured + simulated}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
