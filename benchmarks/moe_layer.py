"""Forward+backward time of moekit's MoE layer against a dense SwiGLU and HF transformers' Mixtral block.

Shapes (float32, T tokens): coarse E=8, k=2, D=512, H=1024 and fine-grained E=64, k=6, D=512, H=256. Every
implementation is timed in the same run, interleaved round by round:

* ``dense``: SwiGLU with hidden width k*H (the same active FLOPs as the MoE, no router) — the baseline;
* ``moekit``: ``MoELayer`` (TopKRouter + SwiGLUExperts, ``backend="auto"``), plus the explicit backends
  ``grouped_mm``, ``padded`` and ``loop`` (``--backends`` narrows them), so that ``auto`` is checked against
  the best of them (issue 17: at most 3 % slower);
* ``hf_eager`` / ``hf_grouped_mm``: ``MixtralSparseMoeBlock`` with ``config._experts_implementation`` set to
  ``eager`` / ``grouped_mm`` (transformers 5.x reads it at call time), weights copied from the moekit layer
  so that both route identically.

Each round runs forward, then backward with a fixed random upstream gradient, every implementation once, in an
order rotated from round to round. We report the median and
mean ± std of the times and the median over rounds of the per-round ratio to ``dense`` (robust to load drift
on a shared machine). Writes ``benchmarks/results/moe_layer.json``.

The process's allocator is tuned first (:func:`moe_core.runtime.tune_cpu_allocator`, as the ``moekit`` CLI
does; it applies to every implementation alike); ``--no-malloc-tuning`` keeps glibc's defaults, under which
every temporary above 32 MiB is page-faulted afresh each step (this taxes the MoE implementations, whose
routed activations are k times wider than the dense layer's).

Usage: ``python benchmarks/moe_layer.py [--quick] [--repeats 7] [--tokens 4096] [--threads 2]
[--backends grouped_mm padded loop] [--shapes fine] [--no-malloc-tuning]``; pin cores with ``taskset``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

import moe_core.experts as experts_mod
from moe_core.experts import SwiGLUExperts
from moe_core.layer import MoELayer, SwiGLU
from moe_core.routers import TopKRouter
from moe_core.runtime import allocator_state, tune_cpu_allocator

SHAPES = {"coarse": dict(E=8, k=2, D=512, H=1024), "fine": dict(E=64, k=6, D=512, H=256)}
TARGETS = {"coarse": 1.15, "fine": 1.2}
EXPLICIT = ("grouped_mm", "padded", "loop")
AUTO_SLACK = 1.03  # auto at most 3 % slower than the best explicit backend (issue 17)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


class _Dense(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.ffn = SwiGLU(dim=d, hidden_dim=h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


class _Moekit(nn.Module):
    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).output


def _build(
    shape: dict[str, int], backends: list[str], seed: int = 0, hf: bool = True
) -> dict[str, nn.Module]:
    e, k, d, h = shape["E"], shape["k"], shape["D"], shape["H"]
    torch.manual_seed(seed)
    impls: dict[str, nn.Module] = {"dense": _Dense(d, k * h)}
    router = TopKRouter(dim=d, num_experts=e, top_k=k, renormalize=True)
    base = SwiGLUExperts(num_experts=e, dim=d, hidden_dim=h)
    for b in backends:
        bank = SwiGLUExperts(num_experts=e, dim=d, hidden_dim=h, backend=b)
        bank.load_state_dict(base.state_dict())
        r = TopKRouter(dim=d, num_experts=e, top_k=k, renormalize=True)
        r.load_state_dict(router.state_dict())
        impls["moekit" if b == "auto" else f"moekit_{b}"] = _Moekit(MoELayer(router=r, experts=bank))
    if not hf:
        return impls
    try:
        import transformers
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        print("transformers not installed: HF rows skipped")
        return impls
    for impl in ("eager", "grouped_mm"):
        cfg = transformers.MixtralConfig(
            hidden_size=d,
            intermediate_size=h,
            num_local_experts=e,
            num_experts_per_tok=k,
            router_jitter_noise=0.0,
        )
        cfg._experts_implementation = impl
        hf = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            hf.gate.weight.copy_(router.gate.weight)
            gate_up = torch.cat([base.gate_proj, base.up_proj], dim=2).transpose(1, 2)  # (E, 2H, D)
            hf.experts.gate_up_proj.copy_(gate_up)
            hf.experts.down_proj.copy_(base.down_proj.transpose(1, 2))  # (E, D, H)
        impls[f"hf_{impl}"] = hf
    return impls


def _time_once(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    module.zero_grad(set_to_none=True)
    x.grad = None
    t0 = time.perf_counter()
    y = module(x)
    y.backward(grad)
    return time.perf_counter() - t0


def run(tokens: int, repeats: int, backends: list[str], shapes: list[str], hf: bool = True) -> list[dict]:
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        impls = _build(shape, backends, hf=hf)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(1, tokens, shape["D"], generator=gen).requires_grad_()
        grad = torch.randn(1, tokens, shape["D"], generator=gen)
        # identical routing in moekit and HF: same weights, same input
        with torch.no_grad():
            out = {k: m(x) for k, m in impls.items() if k != "dense"}
        ref = out.get("moekit")
        for k, o in out.items():
            err = float((o - ref).abs().max())
            if err > 1e-3:
                raise RuntimeError(f"{name}/{k} disagrees with moekit by {err}")
        for k, m in impls.items():
            # warm-up: one call each; auto's tuner also makes its timed trial calls here, as a training run
            # makes them in its first steps (steady state is what the rounds measure)
            for _ in range(1 + (2 * experts_mod._TUNE_TRIALS if k == "moekit" else 0)):
                _time_once(m, x, grad)
        times: dict[str, list[float]] = {k: [] for k in impls}
        names = list(impls)
        for r in range(repeats):
            # rotate the order each round: no implementation always runs right after the same other one
            for k in names[r % len(names) :] + names[: r % len(names)]:
                times[k].append(_time_once(impls[k], x, grad))
            print(
                f"  {name} round {r + 1}/{repeats}: "
                + ", ".join(f"{k}={v[-1]:.3f}s" for k, v in times.items())
            )
        for k, ts in times.items():
            ratios = [t / d for t, d in zip(ts, times["dense"], strict=True)]
            rows.append(
                {
                    "shape": name,
                    **shape,
                    "tokens": tokens,
                    "impl": k,
                    "median_s": statistics.median(ts),
                    "mean_s": statistics.mean(ts),
                    "std_s": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                    "min_s": min(ts),
                    "ratio_vs_dense": statistics.median(ratios),
                    "ratio_of_medians": statistics.median(ts) / statistics.median(times["dense"]),
                    "ratio_of_mins": min(ts) / min(times["dense"]),
                    "ratio_vs_auto": statistics.median(
                        [t / a for t, a in zip(ts, times["moekit"], strict=True)]
                    )
                    if "moekit" in times
                    else None,
                    "times_s": ts,
                }
            )
    return rows


def _table(rows: list[dict]) -> str:
    head = (
        f"{'shape':7} {'impl':18} {'median s':>9} {'mean±std s':>14} {'min s':>7} {'x dense':>8} "
        f"{'x (min)':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['shape']:7} {r['impl']:18} {r['median_s']:9.3f} {r['mean_s']:7.3f}±{r['std_s']:<6.3f} "
            f"{r['min_s']:7.3f} {r['ratio_vs_dense']:8.2f} {r['ratio_of_mins']:8.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 512 tokens, 2 rounds, no JSON unless --out"
    )
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument(
        "--backends",
        nargs="+",
        default=list(EXPLICIT),
        choices=list(EXPLICIT),
        help="explicit moekit backends timed beside auto (default: all, so auto is checked against each)",
    )
    p.add_argument("--no-hf", action="store_true", help="skip the transformers Mixtral rows")
    p.add_argument("--note", default="", help="free text stored in meta (e.g. what else loaded the machine)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/moe_layer.json)"
    )
    p.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="keep glibc's malloc defaults (see moe_core.runtime; tuned by default, as the moekit CLI does)",
    )
    a = p.parse_args()
    if not a.no_malloc_tuning:
        tune_cpu_allocator()
    if a.threads is not None:
        if a.threads < 1:
            p.error(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    tokens, repeats = (512, 2) if a.quick else (a.tokens, a.repeats)
    backends = ["auto", *a.backends]
    load_before = _load()
    rows = run(tokens, repeats, backends, a.shapes, hf=not a.no_hf)
    meta = {
        "machine": _machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "tokens": tokens,
        "repeats": repeats,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a",
        "load_avg_before": load_before,
        "load_avg_after": _load(),
        "malloc_tuning": allocator_state() or "glibc defaults",
        "dispatch_tuning": experts_mod._tuning_enabled(),
        "user_note": a.note,
        "targets_vs_dense": TARGETS,
        "target_auto_vs_best_backend": AUTO_SLACK,
        "note": "forward+backward of the whole layer (router included except for dense); "
        "x dense = median over rounds of the per-round ratio to dense",
    }
    print(_table(rows))
    print(f"load average before/after: {load_before} / {meta['load_avg_after']}")
    print(f"malloc: {meta['malloc_tuning']}")
    for name in a.shapes:
        get = {r["impl"]: r for r in rows if r["shape"] == name}
        if "moekit" in get:
            ok = get["moekit"]["ratio_vs_dense"] <= TARGETS[name]
            faster = "hf_grouped_mm" in get and get["moekit"]["median_s"] < get["hf_grouped_mm"]["median_s"]
            print(
                f"{name}: moekit {get['moekit']['ratio_vs_dense']:.2f}x dense (target <= {TARGETS[name]}: "
                f"{'met' if ok else 'NOT met'}); faster than HF grouped_mm: {faster}"
            )
            # per-round ratio explicit / auto (median over rounds): auto's slack is 1 / the smallest
            explicit = {b: get[f"moekit_{b}"]["ratio_vs_auto"] for b in EXPLICIT if f"moekit_{b}" in get}
            if explicit:
                best = min(explicit, key=explicit.__getitem__)
                slack = 1.0 / explicit[best]
                print(
                    f"{name}: auto / best explicit backend ({best}) = {slack:.3f} (target <= {AUTO_SLACK}: "
                    f"{'met' if slack <= AUTO_SLACK else 'NOT met'})"
                )
    out = a.out or (None if a.quick else Path(__file__).parent / "results" / "moe_layer.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        os.replace(tmp, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
