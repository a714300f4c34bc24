"""Dense vs MoE language models on tiny shakespeare under the same wall-clock training budget.

Variants (matched active FFN width per token = the dense SwiGLU hidden 352 in every sparse layer):
dense; top-k MoE (8 x 176, k=2); DeepSeekMoE (16 fine-grained x 88, k=3 + 1 shared x 88, first layer
dense) with the paper's gate: the raw softmax probabilities of the selected experts, no renormalisation, no
scale (arXiv 2401.06066 eq. 5, as ``moe_core.layer.deepseek_moe``); the same layer with renormalised weights
times k (``fine_shared_renorm_x3``: not DeepSeekMoE's gate, kept as the variant measured before);
Chain-of-Experts (8 x 176, k=1, C=2 iterations) with the official code's raw softmax weight of the selected
expert (renormalising one weight would make it a constant 1 and starve the router of gradient); EvoMoE
(dense phase, then 4 x 352 behind the DTS gate annealed to top-1); dynamic top-p (8 x 176, p=0.4: active
experts vary, measured; entropy loss beta 1e-4). The top-2 variant scales its renormalised combine weights by
k (``routed_scaling_factor``, as DeepSeek-V3 scales its routed path), so that at uniform routing the sparse
FFN has the output scale of the dense FFN of the same active width. Each router adds the balance loss its
paper defines (``router.aux_losses``, weight 1e-2) and the z-loss (1e-3). Baseline shape: nanoGPT "baby GPT"
(4 layers, 4 heads, width 128, context 64, batch 12, lr 1e-3 -> 1e-4 cosine, AdamW betas (0.9, 0.99), wd
0.1).

Each model trains for ``--budget-s`` seconds of training time (evaluation excluded); the learning rate warms
up for 100 steps, then follows a cosine over the *elapsed fraction of the budget* so every model ends its
schedule at the budget. Val loss is the mean CE over the whole fixed validation split (non-overlapping
windows of 64 tokens). Char-level and BPE losses are per token of different tokenizers and are not
comparable with each other. ``--threads`` sets torch's intra-op threads (the MoE layers' many small GEMMs
gain less from a second thread than the dense FFN's few large ones: see BENCHMARKS.md).

    python benchmarks/lm_shakespeare.py --budget-s 180 --bpe-budget-s 30 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.lm.data import LMDataModule  # noqa: E402
from apps.lm.evomoe import EvoMoECallback  # noqa: E402
from apps.lm.model import LMConfig, count_parameters  # noqa: E402
from apps.lm.task import LMTask  # noqa: E402
from moe_core.runtime import allocator_state, tune_cpu_allocator  # noqa: E402
from moe_core.stats import routing_stats  # noqa: E402

BASE = dict(context_len=64, dim=128, n_layers=4, n_heads=4, ffn_hidden=352)
VARIANTS: dict[str, dict] = {
    "dense": dict(ffn="dense"),
    "moe_top2": dict(
        ffn="moe", num_experts=8, top_k=2, expert_hidden=176, router_kwargs={"routed_scaling_factor": 2.0}
    ),
    "deepseekmoe": dict(
        ffn="moe",
        num_experts=16,
        top_k=3,
        expert_hidden=88,
        num_shared_experts=1,
        first_dense_layers=1,
        router_kwargs={"renormalize": False},  # the paper's gate: raw softmax weights
    ),
    "fine_shared_renorm_x3": dict(
        ffn="moe",
        num_experts=16,
        top_k=3,
        expert_hidden=88,
        num_shared_experts=1,
        first_dense_layers=1,
        router_kwargs={"renormalize": True, "routed_scaling_factor": 3.0},
    ),
    "coe_c2": dict(
        ffn="coe", num_experts=8, top_k=1, expert_hidden=176, coe_iterations=2,
        router_kwargs={"renormalize": False},  # official CoE: raw softmax weight of the selected expert
        coe_outer_residual=False,  # recorded with the CoE code's residual (LMConfig's earlier default)
    ),
    "evomoe": dict(ffn="evomoe", num_experts=4, top_k=1, expert_hidden=352),
    "top_p": dict(
        ffn="moe", num_experts=8, top_k=2, expert_hidden=176, router="top_p", router_kwargs={"threshold": 0.4}
    ),
}


def unigram_entropy(tokens) -> float:
    counts = torch.bincount(torch.as_tensor(tokens[:].astype("int64")))
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum())


@torch.no_grad()
def evaluate(task: LMTask, val_x: torch.Tensor, val_y: torch.Tensor, bs: int = 128) -> tuple[float, dict]:
    task.model.eval()
    tot, n, active = 0.0, 0, {}
    for i in range(0, len(val_x), bs):
        out = task.model(val_x[i : i + bs])
        ce = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]), val_y[i : i + bs].reshape(-1), reduction="sum"
        )
        tot, n = tot + float(ce), n + val_y[i : i + bs].numel()
        for name, r in out.routings:
            layer = name.split(".")[0]
            active.setdefault(layer, []).append(float(routing_stats(r)["active_experts"]))
    task.model.train()
    # experts per token per layer (CoE iterations summed)
    per_layer = {}
    for name in active:
        per_layer[name] = statistics.mean(active[name]) * (
            len(active[name]) / max(1, math.ceil(len(val_x) / bs))
        )
    return tot / n, per_layer


def run_variant(
    name: str,
    dm: LMDataModule,
    budget_s: float,
    seed: int,
    eval_every_s: float,
    val: tuple[torch.Tensor, torch.Tensor],
    lr: float = 1e-3,
) -> dict:
    torch.manual_seed(seed)
    cfg = LMConfig(vocab_size=dm.vocab_size, **BASE, **VARIANTS[name])
    task = LMTask(
        config=cfg,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=100,
        weight_decay=0.1,
        betas=(0.9, 0.99),
        w_balance=0.01,
        w_z=0.001,  # w_entropy: LMTask's default 1e-4 (the top-p paper's beta; only top-p declares it)
    )
    opt = task.configure_optimizers()["optimizer"]
    loader = dm.train_dataloader()
    evo = None
    curve, train_time, step, seen_tokens = [], 0.0, 0, 0
    next_eval = 0.0
    it = iter(loader)
    while True:
        if train_time >= next_eval:
            vl, _ = evaluate(task, *val)
            curve.append({"step": step, "train_s": round(train_time, 2), "val_loss": vl})
            next_eval += eval_every_s
            print(f"  {name:21s} step {step:5d} t={train_time:6.1f}s val {vl:.4f}", flush=True)
        if train_time >= budget_s:
            break
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        t0 = time.perf_counter()
        frac = min(train_time / budget_s, 1.0)
        if name == "evomoe":
            if evo is None and frac >= 0.3:  # switch after 30 % of the budget; anneal over the next 40 %
                rate = step / max(train_time, 1e-9)
                evo = EvoMoECallback(
                    switch_step=step,
                    mask_ratio=0.1,
                    seed=seed,
                    max_temperature=2.0,
                    min_temperature=0.3,
                    decay_steps=max(1, int(0.4 * budget_s * rate)),
                    schedule="exp",
                )
            if evo is not None:
                evo.apply(task.model, step)
        lr_f = (step + 1) / 100 if step < 100 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr * lr_f
        out = task.model(x)
        loss = task._losses(out, y)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        train_time += dt
        step += 1
        seen_tokens += x.numel()
    final, active = evaluate(task, *val)
    params = count_parameters(task.model, active_experts=active or None)
    return {
        "variant": name,
        "val_loss": final,
        "steps": step,
        "train_s": round(train_time, 1),
        "tokens_per_s": seen_tokens / train_time,
        "total_params": params["total"],
        "active_params": params["active"],
        "active_experts_per_layer": active,
        "curve": curve,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=180.0, help="training seconds per char-level model")
    ap.add_argument(
        "--bpe-budget-s", type=float, default=None, help="training seconds per BPE model (default: same)"
    )
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tokenizers", default="char,bpe")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--evals", type=int, default=10, help="val evaluations per run (loss curve points)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's, = cores)"
    )
    ap.add_argument("--batch-size", type=int, default=12, help="sequences per step (baby GPT: 12)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (baby GPT: 1e-3)")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's malloc defaults")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_shakespeare.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_malloc_tuning:
        tune_cpu_allocator()  # as the moekit CLI does (moe_core.runtime)
    variants = args.variants.split(",")
    rows, uptimes = [], []
    for tok in args.tokenizers.split(","):
        budget = args.budget_s if tok == "char" or args.bpe_budget_s is None else args.bpe_budget_s
        dm = LMDataModule(
            tokenizer=tok,
            bpe_vocab_size=512,
            context_len=64,
            batch_size=args.batch_size,
            batches_per_epoch=1_000_000,
            seed=args.seed,
        )
        dm.setup()
        vds = dm.val_dataloader().dataset
        val_x = torch.stack([vds[i][0] for i in range(len(vds))])  # (W, T) windows
        val_y = torch.stack([vds[i][1] for i in range(len(vds))])  # (W, T)
        from apps.lm.data import load_tokens

        h1 = unigram_entropy(load_tokens(dm.folder, "train"))
        print(
            f"[{tok}] vocab {dm.vocab_size}, val windows {len(val_x)}, unigram entropy {h1:.3f}, "
            f"budget {budget}s"
        )
        for v in variants:
            uptimes.append(os.getloadavg()[0])
            r = run_variant(v, dm, budget, args.seed, budget / args.evals, (val_x, val_y), lr=args.lr)
            r.update(
                tokenizer=tok,
                vocab_size=dm.vocab_size,
                budget_s=budget,
                unigram_entropy=h1,
                load_avg_1m_at_start=uptimes[-1],
                load_avg_1m_at_end=os.getloadavg()[0],
            )
            rows.append(r)
            print(
                f"  -> {v}: val {r['val_loss']:.4f} steps {r['steps']} tok/s {r['tokens_per_s']:.0f} "
                f"load {r['load_avg_1m_at_start']:.1f}->{r['load_avg_1m_at_end']:.1f}",
                flush=True,
            )
    # table with ratios against the dense model of the same tokenizer
    print(
        f"\n{'tok':4s} {'variant':21s} {'val loss':>8s} {'vs dense':>8s} {'tok/s':>7s} {'steps':>6s} "
        f"{'total':>9s} {'active':>9s}"
    )
    for r in rows:
        same_tok = [d for d in rows if d["tokenizer"] == r["tokenizer"]]
        dense = next((d for d in same_tok if d["variant"] == "dense"), None)
        r["val_loss_minus_dense"] = r["val_loss"] - dense["val_loss"] if dense else None
        r["tokens_per_s_ratio_vs_dense"] = r["tokens_per_s"] / dense["tokens_per_s"] if dense else None
        diff = f"{r['val_loss_minus_dense']:+.3f}" if dense else "-"
        print(
            f"{r['tokenizer']:4s} {r['variant']:21s} {r['val_loss']:8.4f} {diff:>8s} "
            f"{r['tokens_per_s']:7.0f} {r['steps']:6d} {r['total_params']:9d} {r['active_params']:9d}"
        )
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    meta = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cpus, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "budget_s": args.budget_s,
        "bpe_budget_s": args.bpe_budget_s or args.budget_s,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "malloc_tuning": allocator_state() or "glibc defaults",
        "load_avg_1m": {"min": min(uptimes), "max": max(uptimes)},
        "anchor": "nanoGPT baby GPT (4L/4H/128, ctx 64, 2000 iters batch 12): val ~1.88 in ~3 min on CPU",
        "note": "budgets count training time only (evaluation excluded); "
        "load_avg_1m: the machine's load over the run",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        toks = sorted({r["tokenizer"] for r in rows})
        fig, axes = plt.subplots(1, len(toks), figsize=(6 * len(toks), 4), squeeze=False)
        for ax, tok in zip(axes[0], toks):
            for r in rows:
                if r["tokenizer"] == tok:
                    c = r["curve"]
                    ax.plot(
                        [p["train_s"] for p in c],
                        [p["val_loss"] for p in c],
                        marker="o",
                        ms=3,
                        label=f"{r['variant']} ({r['val_loss']:.3f})",
                    )
            if tok == "char":
                ax.axhline(1.88, color="gray", ls="--", lw=1, label="nanoGPT anchor 1.88")
            ax.set_title(f"tiny shakespeare, {tok}-level")
            ax.set_xlabel("training seconds")
            ax.set_ylabel("val loss (nats/token)")
            ax.set_ylim(
                top=min(4.5, max(p["val_loss"] for r in rows if r["tokenizer"] == tok for p in r["curve"]))
            )
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except Exception as e:  # noqa: BLE001
        print(f"plot failed: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
