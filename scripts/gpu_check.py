"""GPU check of moe_core: grouped dispatch against the slow reference in fp32 and bf16, a short bf16 LM
training run, and fwd+bwd timings of a fine-grained MoE layer against a dense FFN.

Run on a CUDA machine from the repo root: ``python scripts/gpu_check.py [--out results.json]``. Prints one
line per check and exits non-zero when a check fails. On a machine without CUDA it runs the same checks on CPU
(a smoke test of the script itself).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_core.experts import SwiGLUExperts, grouped_mm_works  # noqa: E402
from moe_core.reference import fused_swiglu_expert_fn, reference_moe  # noqa: E402

TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}  # max |err| / max |ref|, forward and every gradient


def dispatch_check(device: torch.device, backend: str, dtype: torch.dtype, scenario: str) -> dict:
    """One backend/dtype/routing scenario: output and gradients vs the float64 loop reference."""
    e, d, h, k, n = 8, 64, 128, 2, 512
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    bank = SwiGLUExperts(num_experts=e, dim=d, hidden_dim=h, backend=backend).to(device=device, dtype=dtype)
    x = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    idx = torch.randint(0, e, (n, k), generator=g)
    if scenario == "skewed":  # most pairs on expert 0, experts 5-7 empty
        idx = torch.where(torch.rand(n, k, generator=g) < 0.8, 0, torch.randint(0, 5, (n, k), generator=g))
    w = torch.rand(n, k, generator=g)
    mask = torch.rand(n, k, generator=g) < 0.8 if scenario == "masked" else None
    out = bank(x, idx.to(device), w.to(device=device, dtype=dtype), None if mask is None else mask.to(device))
    up = torch.randn(n, d, generator=g)
    out.backward(up.to(device=device, dtype=dtype))
    # reference in float64 on CPU with the same weights
    params = {name: p.detach().double().cpu().requires_grad_() for name, p in bank.named_parameters()}
    xr = x.detach().double().cpu().requires_grad_()
    ref = reference_moe(xr, idx, w.double(), mask, fused_swiglu_expert_fn(
        params["gate_up_proj"], params["down_proj"]))
    ref.backward(up.double())
    pairs = [("out", out.detach(), ref.detach()), ("grad_x", x.grad, xr.grad)]
    pairs += [(f"grad_{nm}", p.grad, params[nm].grad) for nm, p in bank.named_parameters()]
    errs = {nm: float((a.double().cpu() - b).abs().max() / b.abs().max().clamp_min(1e-12))
            for nm, a, b in pairs}
    worst = max(errs.values())
    return {"check": "dispatch", "backend": backend, "dtype": str(dtype).split(".")[-1], "scenario": scenario,
            "max_rel_err": worst, "ok": worst <= TOL[dtype]}


def lm_bf16_training(device: torch.device, steps: int = 200) -> dict:
    """A tiny DeepSeekMoE-style LM learns a repeating sequence under bf16 autocast (loss must fall 4x)."""
    from apps.lm.model import LMConfig
    from apps.lm.task import LMTask

    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=64, context_len=32, dim=64, n_layers=2, n_heads=4, ffn_hidden=128, ffn="moe",
                   num_experts=8, top_k=2, expert_hidden=32, num_shared_experts=1)
    task = LMTask(config=cfg, lr=3e-3, warmup_steps=5).to(device)
    opt = task.configure_optimizers()["optimizer"]
    seq = torch.arange(64).repeat(4)  # a deterministic pattern: next token = current + 1 (mod 64)
    x = torch.stack([seq[i : i + 32] for i in range(16)]).to(device)
    y = torch.stack([seq[i + 1 : i + 33] for i in range(16)]).to(device)
    first = last = None
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            terms = task._losses(task.model.train()(x), y)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        ce = float(terms["ce"].detach())
        first = ce if first is None else first
        last = ce
    dt = time.perf_counter() - t0
    return {"check": "lm_bf16", "first_ce": first, "last_ce": last, "steps": steps, "seconds": dt,
            "finite": bool(torch.isfinite(torch.tensor(last))), "ok": last < first / 4}


def layer_timing(device: torch.device, dtype: torch.dtype, repeats: int = 20) -> dict:
    """fwd+bwd median of a fine-grained MoE layer (E64 k6, D 1024) vs the dense FFN of equal active width."""
    from moe_core.layer import DenseLayer, build_moe_layer

    d, n = 1024, 8192
    moe = build_moe_layer(dim=d, hidden_dim=256, num_experts=64, top_k=6).to(device=device, dtype=dtype)
    dense = DenseLayer(dim=d, hidden_dim=6 * 256).to(device=device, dtype=dtype)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)

    def run(layer) -> float:
        times = []
        for i in range(repeats + 3):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            layer(x).output.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_dense, t_moe = run(dense), run(moe)
    return {"check": "layer_timing", "dtype": str(dtype).split(".")[-1], "dense_s": t_dense, "moe_s": t_moe,
            "ratio": t_moe / t_dense, "ok": True}


def lm_throughput(device: torch.device, seconds: float, *, compile: bool, small: bool = False) -> dict:
    """Train the wikipedia_moe.yaml architecture (DeepSeekMoE, 6 x 256, context 256, vocab 8192) for
    ``seconds`` under bf16 autocast (optionally ``torch.compile``) on learnable synthetic sequences
    (``x_{t+1} = (a x_t + b) mod V`` with per-sequence a, b); report tokens/s and MFU against a measured bf16
    matmul peak (FLOPs per token: active experts only, ``apps.lm.task.training_flops_per_token``)."""
    import yaml

    from apps.lm.model import LMConfig
    from apps.lm.task import LMTask, measure_peak_flops, training_flops_per_token

    raw = yaml.safe_load((ROOT / "apps" / "lm" / "configs" / "wikipedia_moe.yaml").read_text())
    cfg_d = dict(raw["model"]["init_args"]["config"], vocab_size=8192)
    if small:  # CPU dry run: the same code path at toy size
        cfg_d.update(dim=64, n_layers=2, context_len=32, ffn_hidden=128, expert_hidden=32, vocab_size=512)
    torch.manual_seed(0)
    task = LMTask(config=LMConfig(**cfg_d), lr=1e-3, warmup_steps=20, peak_flops=0, compile=compile)
    task = task.to(device)
    task.configure_model()
    opt = task.configure_optimizers()["optimizer"]
    v, t = task.config.vocab_size, task.config.context_len
    batch = 4 if small else 64
    gen = torch.Generator().manual_seed(1)

    def sample() -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randint(1, 7, (batch, 1), generator=gen)
        b = torch.randint(0, v, (batch, 1), generator=gen)
        x0 = torch.randint(0, v, (batch, 1), generator=gen)
        seq = [x0]
        for _ in range(t):
            seq.append((a * seq[-1] + b) % v)
        ids = torch.cat(seq, 1).to(device)  # (B, T+1)
        return ids[:, :-1], ids[:, 1:]

    def sync() -> None:
        if device.type != "cpu":
            torch.accelerator.synchronize(device)

    warmup = 5  # compilation and allocator warm-up: run first, excluded from the budget and the throughput
    steps, tokens, first, last, timed = 0, 0, None, None, 0.0
    t_begin = None
    while t_begin is None or time.perf_counter() - t_begin < seconds:
        x, y = sample()
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = task._losses(task.model.train()(x), y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        dt = time.perf_counter() - t0
        steps += 1
        ce = float(loss.detach())
        first = ce if first is None else first
        last = ce
        if steps > warmup:
            timed += dt
            tokens += x.numel()
        elif steps == warmup:
            t_begin = time.perf_counter()
    peak = measure_peak_flops(device, torch.bfloat16, n=512 if small else 8192)
    fpt = training_flops_per_token(task.model)
    tps = tokens / timed if timed else float("nan")
    return {"check": "lm_throughput", "compile": compile, "steps": steps, "seconds": seconds,
            "tokens_per_s": tps, "flops_per_token": fpt, "peak_bf16_flops": peak, "mfu": tps * fpt / peak,
            "first_loss": first, "last_loss": last, "learned": bool(last is not None and last < first),
            "ok": bool(last is not None and math.isfinite(last) and tokens > 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--lm-seconds", type=float, default=0.0,
                    help="also train the wikipedia_moe architecture this long in bf16 (tokens/s, MFU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the LM of --lm-seconds")
    ap.add_argument("--dry-run", action="store_true", help="toy sizes (a CPU smoke test of this script)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}", flush=True)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        gmm = grouped_mm_works(device, dtype)
        print(f"grouped_mm available for {dtype}: {gmm}", flush=True)
        for backend in ("grouped_mm", "padded", "loop", "auto"):
            if backend == "grouped_mm" and not gmm:
                continue
            for scenario in ("random", "skewed", "masked"):
                rows.append(dispatch_check(device, backend, dtype, scenario))
                print(rows[-1], flush=True)
    rows.append(lm_bf16_training(device))
    print(rows[-1], flush=True)
    if not args.dry_run:
        for dtype in (torch.float32, torch.bfloat16):
            rows.append(layer_timing(device, dtype, repeats=20 if device.type == "cuda" else 2))
            print(rows[-1], flush=True)
    if args.lm_seconds > 0:
        rows.append(lm_throughput(device, args.lm_seconds, compile=args.compile, small=args.dry_run))
        r = rows[-1]
        print(r, flush=True)
        print(f"LM bf16{' compiled' if args.compile else ''}: {r['tokens_per_s']:.0f} tokens/s, "
              f"MFU {100 * r['mfu']:.1f}% of a measured {r['peak_bf16_flops'] / 1e12:.1f} TFLOP/s bf16 peak, "
              f"loss {r['first_loss']:.2f} -> {r['last_loss']:.2f}", flush=True)
    if args.out:
        result = {"device": name, "torch": torch.__version__, "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} passed, {len(bad)} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
