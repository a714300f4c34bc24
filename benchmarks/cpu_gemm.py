"""Where the fine-grained MoE layer's GEMM time goes on CPU: grouped GEMMs against the equal-FLOP dense GEMM,
with PyTorch's default float32 matmul (MKL on x86 builds) and, where the build has it, oneDNN.

``benchmarks/moe_layer.py`` measures the whole layer against a dense SwiGLU; its GEMMs are most of the time,
and a grouped GEMM over 64 experts of ~384 rows costs more per FLOP than one dense GEMM of 4096 rows. This
script isolates that price for the fine shape's two forward projections (E=64, k=6, D=512, H=256, 4096
tokens; routing of a fresh ``TopKRouter`` on random tokens, as in moe_layer.py):

* ``gate_up``: ``(P, 512) x (E, 512, 512)`` grouped vs ``(4096, 512) x (512, 3072)`` dense (equal FLOPs);
* ``down``: ``(P, 256) x (E, 256, 512)`` grouped vs ``(4096, 1536) x (1536, 512)`` dense.

Rows per implementation: ``torch`` (``torch.mm``: the dense baseline's kernel), ``grouped_mm`` (moekit's
kernel: ``torch._grouped_mm``, one ``mm`` per expert on CPU), ``bmm_uniform`` (``torch.bmm`` over 64 equal
groups of P/64 rows: MKL's batched GEMM, the bound for a grouped GEMM on perfectly balanced routing), and
with ``torch.ops.mkldnn._linear_pointwise`` available, ``onednn`` dense and ``onednn_grouped`` (one call per
expert). Each prints the median time, GFLOP/s, and the ratio to the dense GEMM of the same library; the
``onednn / torch`` ratio shows how far the default float32 matmul is from this CPU's best. oneDNN's
``_linear_pointwise`` is an internal operator (used by ``torch.compile``'s CPU backend), checked here for
float32 accuracy against float64; moekit does not call it.

Usage: ``python benchmarks/cpu_gemm.py [--threads 2] [--repeats 11]``; writes
``benchmarks/results/cpu_gemm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from moe_core.experts import _GMM
from moe_core.routers import TopKRouter
from moe_core.runtime import tune_cpu_allocator

E, K, D, H, T = 64, 6, 512, 256, 4096


def _onednn() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``x @ w.T`` through oneDNN, or None where this build lacks the operator or it is not float32-exact."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return None

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return op(x, w, None, "none", [], "")

    try:
        x, w = torch.randn(64, 256), torch.randn(128, 256)
        ref = x.double() @ w.double().t()
        err = float((linear(x, w).double() - ref).abs().max() / ref.abs().max())
    except (RuntimeError, NotImplementedError) as e:
        print(f"oneDNN linear unavailable: {e}")
        return None
    if err > 1e-5:  # a bf16/tf32 fast-math mode would be ~1e-3
        print(f"oneDNN linear is not float32-exact here (relative error {err:.1e}): skipped")
        return None
    return linear


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, interleaved round by round (robust to drift)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_gemm.json"))
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with torch.no_grad():
        routing = TopKRouter(dim=D, num_experts=E, top_k=K, renormalize=True)(torch.randn(T, D))
    counts = torch.bincount(routing.indices.reshape(-1), minlength=E)  # (E,)
    offs = counts.cumsum(0).to(torch.int32)
    bounds = [0, *offs.tolist()]
    p = T * K
    onednn = _onednn()
    rows = []
    for name, d_in, d_out in (("gate_up", D, 2 * H), ("down", H, D)):
        xs, w = torch.randn(p, d_in), torch.randn(E, d_in, d_out)  # routed rows, per-expert weights
        x_dense, w_dense = torch.randn(T, d_in * (K if name == "down" else 1)), None
        w_dense = torch.randn(x_dense.shape[1], d_out * (1 if name == "down" else K))
        flops = 2.0 * p * d_in * d_out  # equal for the grouped and the dense GEMM
        fns: dict[str, Callable[[], object]] = {
            "torch": lambda x=x_dense, wd=w_dense: x @ wd,
            "grouped_mm": lambda x=xs, ww=w: _GMM(x, ww, offs=offs),
            "bmm_uniform": lambda x=xs, ww=w: torch.bmm(x.view(E, p // E, -1), ww),
        }
        if onednn is not None:
            wd_t = w_dense.t().contiguous()  # (out, in): oneDNN's weight layout
            w_t = w.transpose(1, 2).contiguous()  # (E, out, in)

            def grouped_onednn(x: torch.Tensor = xs, wt: torch.Tensor = w_t) -> list[torch.Tensor]:
                return [onednn(x[a:b], wt[e]) for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]

            fns["onednn"] = lambda x=x_dense, wt=wd_t: onednn(x, wt)
            fns["onednn_grouped"] = grouped_onednn
        ms = _median_ms(fns, args.repeats)
        for impl, t in ms.items():
            base = ms["onednn"] if impl.startswith("onednn") else ms["torch"]
            rows.append({
                "gemm": name, "impl": impl, "median_ms": round(t, 3), "gflops": round(flops / t / 1e6, 1),
                "ratio_vs_dense_same_library": round(t / base, 3),
                "ratio_vs_torch_dense": round(t / ms["torch"], 3),
            })
    print(f"{'gemm':8} {'impl':15} {'ms':>8} {'GFLOP/s':>8} {'x dense (same lib)':>19} {'x torch dense':>14}")
    for r in rows:
        print(f"{r['gemm']:8} {r['impl']:15} {r['median_ms']:8.2f} {r['gflops']:8.1f} "
              f"{r['ratio_vs_dense_same_library']:19.3f} {r['ratio_vs_torch_dense']:14.3f}")
    meta = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "threads": args.threads,
        "repeats": args.repeats, "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "routing_rows_per_expert": {"min": int(counts.min()), "max": int(counts.max()), "mean": p / E},
        "onednn": onednn is not None,
        "note": "median ms; ratio_vs_dense_same_library: grouped / dense GEMM of equal FLOPs in one library",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
