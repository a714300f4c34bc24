"""Benchmark of the moe_core tools for trained MoE models on a char-level tiny-shakespeare MoE LM.

Trains a small MoE LM (defined here: ``apps/lm`` had no trainable model when this was written), then
measures on the held-out 10 %:
  * MC-SMoE: val loss and parameter count before/after merging (experts halved), after LoSparse compression;
  * bit-nested quantisation: val loss at 8, 6, 4 (and 2) bits and with usage-planned per-expert widths;
  * SCMoE vs greedy: teacher-forced next-token accuracy;
  * offloading: cache hit rate and time per decoded token at cache sizes of 25 / 50 / 100 % of the experts
    (score-aware + prefetch vs LRU; experts stored on disk), against the all-in-memory model;
  * issue-18 sections (``--only-new`` runs only these, after training): D²MoE dual routing vs static bit
    plans (val loss, mean bits per (token, expert) pair, bytes loaded per token) and the HEBF pipeline
    simulation; C3PO mode finding and generation with the re-mixed routing at every step; MC-SMoE iterative
    row pruning on the cubic schedule during KD vs one-shot magnitude compression.

Run: ``.venv/bin/python benchmarks/moe_tools.py [--train-steps 500] [--only-new --out ...]``; writes
``benchmarks/results/moe_tools.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.datadir import data_dir, require_file  # noqa: E402
from moe_core.blocks import find_moe_blocks, router_selection  # noqa: E402
from moe_core.experts import SwiGLUExperts  # noqa: E402
from moe_core.inference.c3po import (  # noqa: E402
    c3po_generate,
    collect_pathways,
    critical_blocks,
    kernel_regression,
    mean_embedding,
    mode_finding,
    remixed_logits,
)
from moe_core.inference.offload import OffloadStats, offload_model  # noqa: E402
from moe_core.inference.override import RouterHook  # noqa: E402
from moe_core.inference.scmoe import greedy_generate, scmoe_logits  # noqa: E402
from moe_core.layer import MoELayer  # noqa: E402
from moe_core.routers import TopKRouter  # noqa: E402
from moe_core.surgery.bank import count_parameters  # noqa: E402
from moe_core.surgery.mcsmoe import (  # noqa: E402
    collect_routing_stats,
    compress_and_finetune,
    compress_model,
    kd_loss,
    merge_model,
)
from moe_core.surgery.quant import (  # noqa: E402
    choose_bits,
    dual_quantize_model_experts,
    dual_routing_bytes,
    expert_order,
    hebf_load_order,
    quantize_model_experts,
    simulate_loading,
)

SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# ------------------------------------------------------------------------------------------ model
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cache=None, pos: int = 0):
        b, t, d = x.shape
        q, k, v = (
            self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )  # (B, h, T, d/h)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        a = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)
        return self.o(a.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, experts, top_k) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.moe = MoELayer(
            router=TopKRouter(dim=dim, num_experts=experts, top_k=top_k),
            experts=SwiGLUExperts(num_experts=experts, dim=dim, hidden_dim=hidden),
        )

    def forward(self, x, cache=None):
        x = x + self.attn(self.n1(x), cache)
        out = self.moe(self.n2(x))
        return x + out.output, out.routing


class MoELM(nn.Module):
    def __init__(self, vocab, dim=64, heads=4, hidden=128, layers=4, experts=8, top_k=2, ctx=128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, experts, top_k) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward_with_routing(self, ids, caches=None, start: int = 0):
        h = self.tok(ids) + self.pos(torch.arange(start, start + ids.shape[1]))
        routings = []
        for i, b in enumerate(self.blocks):
            h, r = b(h, None if caches is None else caches[i])
            routings.append(r)
        return self.head(self.norm(h)), routings

    def forward(self, ids):
        return self.forward_with_routing(ids)[0]


class AppLM(nn.Module):
    """``apps.lm.model.TransformerLM`` (ffn=moe) behind this script's interface. Decoding recomputes the last
    ``context_len`` tokens every step (the app model has no KV cache); the "cache" dict keeps the ids."""

    def __init__(self, vocab, dim=64, heads=4, hidden=128, layers=4, experts=8, top_k=2, ctx=64) -> None:
        super().__init__()
        from apps.lm.model import LMConfig, TransformerLM

        cfg = LMConfig(
            vocab_size=vocab,
            context_len=ctx,
            dim=dim,
            n_layers=layers,
            n_heads=heads,
            ffn_hidden=hidden * top_k,
            ffn="moe",
            num_experts=experts,
            top_k=top_k,
            expert_hidden=hidden,
        )
        self.lm, self.ctx = TransformerLM(config=cfg), ctx

    @property
    def blocks(self):
        return self.lm.blocks

    def forward_with_routing(self, ids, caches=None, start: int = 0):
        if caches is None:
            out = self.lm(ids)
            return out.logits, [r for _, r in out.routings]
        hist = torch.cat([caches[0]["ids"], ids], 1) if "ids" in caches[0] else ids
        caches[0]["ids"] = hist
        out = self.lm(hist[:, -self.ctx :])
        return out.logits[:, -ids.shape[1] :], [r for _, r in out.routings]

    def forward(self, ids):
        return self.lm(ids).logits


def balance_loss(routings) -> torch.Tensor:
    """Switch balance loss E * sum_i f_i P_i averaged over layers (inline; no dependency on losses.py)."""
    tot = 0.0
    for r in routings:
        e = r.probs.shape[1]
        f = torch.bincount(r.indices.reshape(-1), minlength=e).float() / r.indices.numel()
        tot = tot + e * (f * r.probs.mean(0)).sum()
    return tot / len(routings)


# ------------------------------------------------------------------------------------------ data
def load_data():
    path = require_file(
        data_dir() / "tinyshakespeare" / "input.txt", sha256=SHA256, url=URL, what="tiny shakespeare"
    )
    text = path.read_text()
    chars = sorted(set(text))
    ids = torch.tensor(_encode(text, chars), dtype=torch.long)
    n = int(0.9 * len(ids))
    return ids[:n], ids[n:], len(chars)


def _encode(text, chars):
    table = {c: i for i, c in enumerate(chars)}
    return [table[c] for c in text]


def windows(data, n, t, gen):
    starts = torch.randint(0, len(data) - t - 1, (n,), generator=gen)
    x = torch.stack([data[s : s + t] for s in starts])
    y = torch.stack([data[s + 1 : s + t + 1] for s in starts])
    return x, y


@torch.no_grad()
def val_loss(model, vx, vy, bs=32) -> float:
    model.eval()
    tot = 0.0
    for i in range(0, len(vx), bs):
        logits = model(vx[i : i + bs])
        tot += F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), vy[i : i + bs].reshape(-1), reduction="sum"
        )
    return float(tot) / vy.numel()


def train(model, train_ids, *, steps, ctx, bs, lr, seed):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    t0, step, loss = time.perf_counter(), 0, float("nan")
    while step < steps:
        x, y = windows(train_ids, bs, ctx, gen)
        logits, routings = model.forward_with_routing(x)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        total = ce + 0.01 * balance_loss(routings)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        step, loss = step + 1, float(ce.detach())
        if step % 50 == 0:
            print(f"  step {step}  train ce {loss:.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return step, loss


def kd_finetune(student, teacher, train_ids, *, steps, ctx, seed, bs=32, lr=1e-3) -> int:
    """Fine-tune ``student`` with MC-SMoE's KD loss against ``teacher`` for ``steps`` steps."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    student.train()
    step = 0
    while step < steps:
        x, y = windows(train_ids, bs, ctx, gen)
        with torch.no_grad():
            t_logits = teacher(x)
        loss = kd_loss(student(x), t_logits, y, temperature=2.0, kd_lambda=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    student.eval()
    return step


# ------------------------------------------------------------------------------------------ decode
@torch.no_grad()
def decode_time(model, prompt, n_new, repeats=3) -> list[float]:
    """Seconds per generated token (greedy, KV cache, batch 1), one value per repeat."""
    out = []
    for _ in range(repeats):
        caches = [{} for _ in model.blocks]
        t0 = time.perf_counter()
        logits, _ = model.forward_with_routing(prompt, caches, 0)
        pos = prompt.shape[1]
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(n_new):
            logits, _ = model.forward_with_routing(nxt, caches, pos)
            pos += 1
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append((time.perf_counter() - t0) / n_new)
    return out


@torch.no_grad()
def decode_tokens(model, prompt, n_new) -> torch.Tensor:
    caches = [{} for _ in model.blocks]
    logits, _ = model.forward_with_routing(prompt, caches, 0)
    pos, toks = prompt.shape[1], []
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(n_new):
        toks.append(nxt)
        logits, _ = model.forward_with_routing(nxt, caches, pos)
        pos += 1
        nxt = logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(toks, 1)


# ------------------------------------------------------------------------- issue-18 sections
@torch.no_grad()
def _routing(model, x):
    """Per block ``(weights (N, K), indices (N, K))`` of one forward pass."""
    got = {}

    def fn(p, ref, probs, out):
        got[p] = tuple(t.detach() for t in router_selection(out))

    with RouterHook(model, fn):
        model(x)
    return [got[p] for p in sorted(got)]


def d2moe_rows(model, vx, vy) -> list[dict]:
    """Dual routing vs static plans on the same nested codes (group size 32)."""
    rows = []
    blk = find_moe_blocks(model)[0].experts
    numel = 3 * blk.dim * blk.hidden_dim
    routes = [_routing(model, vx[i : i + 32]) for i in range(0, len(vx), 32)]
    for label, th, cands in (
        ("static 2-bit", (), (2,)),
        ("static 3-bit", (), (3,)),
        ("static 4-bit", (), (4,)),
        ("dual: top weight >= 0.5 -> 4 bit, else 2 bit", (0.5,), (2, 4)),
        ("dual: weight >= 0.7 -> 4 bit, else 2 bit", (0.7,), (2, 4)),
        ("dual: weight >= 0.5 -> 3 bit, else 2 bit", (0.5,), (2, 3)),
    ):
        qm = copy.deepcopy(model)
        banks = dual_quantize_model_experts(qm, thresholds=th, candidates=cands, group_size=32)
        pair_bits = [
            torch.cat([bank.pair_bits(r[b][1], r[b][0]).float().flatten() for r in routes])
            for b, bank in enumerate(banks)
        ]
        mean_bits = float(torch.cat(pair_bits).mean())
        k = routes[0][0][0].shape[1]
        # a 32-window prefill batch: each used expert must hold the planes of its widest pair
        resident = statistics.median(
            sum(
                dual_routing_bytes(
                    bank.pair_bits(r[b][1], r[b][0]),
                    r[b][1],
                    num_experts=bank.num_experts,
                    expert_numel=numel,
                )["resident_bytes"]
                for b, bank in enumerate(banks)
            )
            for r in routes
        )
        rows.append(
            {
                "section": "d2moe",
                "variant": label,
                "val_loss": val_loss(qm, vx, vy),
                "mean_pair_bits": mean_bits,
                # decode with nothing cached: each token loads its K experts' planes in every layer
                "bytes_loaded_per_token": mean_bits * numel / 8 * k * len(banks),
                "resident_bytes_per_32_window_batch_median": resident,
            }
        )
    return rows


def hebf_rows(model, vx, *, windows_n: int = 16) -> list[dict]:
    """Simulated I/O + compute pipeline of one prefill window under dual routing (plane = 1 time unit,
    compute = tokens x c with c set so total compute equals total I/O): HEBF vs coldest-first vs index."""
    res: dict[str, list[tuple[float, float]]] = {"hebf": [], "coldest_first": [], "index_order": []}
    for w in range(windows_n):
        routes = _routing(model, vx[w : w + 1])
        needed, counts, bits_l, use_l = {}, {}, [], []
        for layer, (wts, idx) in enumerate(routes):
            e_n = find_moe_blocks(model)[layer].router.num_experts
            pb = torch.where(wts >= 0.5, 4, 2)  # the dual rule of the d2moe rows
            need = torch.zeros(e_n, dtype=torch.long).scatter_reduce(0, idx.flatten(), pb.flatten(), "amax")
            cnt = torch.bincount(idx.flatten(), minlength=e_n).float()
            for e in range(e_n):
                if need[e] > 0:
                    needed[(layer, e)] = int(need[e])
                    counts[(layer, e)] = float(cnt[e])
            bits_l.append(need)
            use_l.append(cnt)
        io = float(sum(needed.values()))
        c = io / sum(counts.values())
        compute = {key: c * v for key, v in counts.items()}
        orders = {
            "hebf": hebf_load_order(bits_l, use_l, layerwise=True),
            "coldest_first": hebf_load_order(bits_l, [-u for u in use_l], layerwise=True),
            "index_order": expert_order(bits_l),
        }
        for name, order in orders.items():
            sim = simulate_loading(order, plane_seconds=1.0, compute_seconds=compute, needed=needed)
            res[name].append((sim["finish_seconds"] / io, sim["stall_seconds"] / io))
    return [
        {
            "section": "hebf_sim",
            "variant": name,
            "makespan_over_io_median": statistics.median(v[0] for v in vals),
            "stall_over_io_median": statistics.median(v[1] for v in vals),
            "windows": windows_n,
        }
        for name, vals in res.items()
    ]


def c3po_new_rows(model, train_ids, vx, vy, *, ctx: int) -> list[dict]:
    rows = []
    blocks = critical_blocks(len(find_moe_blocks(model)), 2)
    embed = mean_embedding(model.tok if isinstance(model, MoELM) else model.lm.embed)
    rx, ry = windows(train_ids, 512, ctx, torch.Generator().manual_seed(99))
    with torch.no_grad():
        r_ok = torch.cat([model(rx[i : i + 64])[:, -1].argmax(-1) for i in range(0, 512, 64)]) == ry[:, -1]
    ref_x = rx[r_ok]
    ref_paths = torch.cat(
        [collect_pathways(model, ref_x[i : i + 64], blocks=blocks) for i in range(0, len(ref_x), 64)]
    )
    own = torch.cat([collect_pathways(model, vx[i : i + 64], blocks=blocks) for i in range(0, len(vx), 64)])
    with torch.no_grad():
        base = torch.cat([model(vx[i : i + 64])[:, -1] for i in range(0, len(vx), 64)])
    acc0 = float((base.argmax(-1) == vy[:, -1]).float().mean())
    rows.append({"section": "c3po_new", "variant": "own routing (last token)", "accuracy": acc0})
    for label, hat in (
        (
            "kernel regression k=3 (embedding neighbours)",
            kernel_regression(embed(vx), embed(ref_x), ref_paths, k=3),
        ),
        (
            "mode finding k=3, alpha 0.5, 3 steps (pathway neighbours)",
            mode_finding(own, ref_paths, k=3, alpha=0.5, steps=3),
        ),
        ("mode finding k=3, alpha 0, 1 step", mode_finding(own, ref_paths, k=3, alpha=0.0, steps=1)),
    ):
        with torch.no_grad():
            last = torch.cat(
                [
                    remixed_logits(model, vx[i : i + 64], hat[i : i + 64], blocks=blocks)[:, -1]
                    for i in range(0, len(vx), 64)
                ]
            )
        acc = float((last.argmax(-1) == vy[:, -1]).float().mean())
        rows.append(
            {"section": "c3po_new", "variant": label, "accuracy": acc, "ratio_vs_own": acc / max(acc0, 1e-9)}
        )
    # generation: 48-char prompts, 16 greedy chars, accuracy against the real continuation
    n_p, p_len, n_new = 64, 48, 16
    px, fut = vx[:n_p, :p_len], torch.cat([vx[:n_p, p_len:], vy[:n_p, -1:]], 1)[:, :n_new]
    hat_gen = kernel_regression(embed(px), embed(ref_x), ref_paths, k=3)
    t0 = time.perf_counter()
    base_gen = greedy_generate(model, px, max_new_tokens=n_new)[:, p_len:]
    t_base = time.perf_counter() - t0
    acc_g0 = float((base_gen == fut).float().mean())
    rows.append(
        {"section": "c3po_gen", "variant": "greedy, own routing", "char_accuracy": acc_g0, "seconds": t_base}
    )
    for positions in ("generated", "all", "last"):
        t0 = time.perf_counter()
        gen = c3po_generate(model, px, hat_gen, blocks=blocks, max_new_tokens=n_new, positions=positions)
        dt = time.perf_counter() - t0
        acc = float((gen[:, p_len:] == fut).float().mean())
        rows.append(
            {
                "section": "c3po_gen",
                "variant": f"kernel regression k=3, re-mixed routing on {positions} tokens at every step",
                "char_accuracy": acc,
                "ratio_vs_own": acc / max(acc_g0, 1e-9),
                "seconds": dt,
                "prompts": n_p,
                "new_tokens": n_new,
            }
        )
    return rows


def mcsmoe_new_rows(model, aligned, train_ids, vx, vy, *, ctx: int, steps: int, seed: int) -> list[dict]:
    """Merged model -> compressed: one-shot magnitude (then KD) vs iterative row pruning during KD."""
    rows = []

    def batches(s):
        gen = torch.Generator().manual_seed(s)
        while True:
            yield windows(train_ids, 32, ctx, gen)

    oneshot = copy.deepcopy(aligned)
    compress_model(oneshot, rank=16, keep_ratio=0.1)
    rows.append(
        {
            "section": "mcsmoe_new",
            "variant": "merged + one-shot LoSparse rank 16, S keep 0.1 (magnitude, element-wise)",
            "val_loss": val_loss(oneshot, vx, vy),
            "params": count_parameters(oneshot),
        }
    )
    kd_finetune(oneshot, model, train_ids, steps=steps, ctx=ctx, seed=seed)
    rows.append(
        {
            "section": "mcsmoe_new",
            "variant": f"  ... then KD fine-tune {steps} steps (official weighting)",
            "val_loss": val_loss(oneshot, vx, vy),
            "params": count_parameters(oneshot),
        }
    )
    it = copy.deepcopy(aligned)
    st = compress_and_finetune(
        it,
        model,
        batches(seed),
        rank=16,
        final_keep_ratio=0.1,
        total_steps=steps,
        initial_warmup=steps // 10,
        final_warmup=steps // 5,
        lr=1e-3,
    )
    it.eval()
    rows.append(
        {
            "section": "mcsmoe_new",
            "variant": f"merged + iterative row pruning during {steps} KD steps (cubic 1.0 -> 0.1, "
            "EMA |S grad S|), rank 16",
            "val_loss": val_loss(it, vx, vy),
            "params": count_parameters(it),
            "final_kept_fraction": st.final_kept_fraction,
        }
    )
    return rows


_COMMIT_AT_START: str | None = None


def commit() -> str:
    """HEAD when the run started (the code that ran), not when it finished."""
    global _COMMIT_AT_START
    if _COMMIT_AT_START is not None:
        return _COMMIT_AT_START
    try:
        _COMMIT_AT_START = subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True
        ).strip()
    except Exception:  # noqa: BLE001
        _COMMIT_AT_START = "unknown"
    return _COMMIT_AT_START


def _median_ms(fn, repeats: int = 7) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(ts)


@torch.no_grad()
def arch_rows(seed: int = 0) -> list[dict]:
    """UoE MLP routing, BAM parallel block and MoGE imbalance on synthetic inputs (no training)."""
    from moe_core.bam import ParallelBlock, bam_parallel_block
    from moe_core.routers import GroupedRouter
    from moe_core.surgery.upcycling import CausalSelfAttention
    from moe_core.uoe import DataSelectionUoE, ExpertSelectionUoE, UnionMLP

    rows = []
    torch.manual_seed(seed)
    b, t, d, h, e = 16, 64, 64, 256, 8
    x = torch.randn(b, t, d)
    mlp = UnionMLP(dim=d, hidden_dim=h, num_experts=e)
    ds_all = DataSelectionUoE(mlp=mlp, top_k=e, capacity=1.0)
    ds = DataSelectionUoE(mlp=mlp, top_k=2, capacity=0.5)
    es = ExpertSelectionUoE(mlp=mlp, top_k=2, seq_len=t)
    dense_ms = _median_ms(lambda: mlp(x))
    for label, layer, frac in (
        ("dense MLP (D=64, H=256)", mlp, 1.0),
        ("UoE data selection, all experts, capacity 1.0", ds_all, 1.0),
        ("UoE data selection, top-2 of 8, capacity 0.5", ds, 0.5),
        ("UoE expert selection, top-2 of 8 per sample", es, 2 / e),
    ):
        ms = _median_ms(lambda layer=layer: layer(x))
        rows.append(
            {
                "section": "uoe",
                "variant": label,
                "ms_median": ms,
                "ratio_vs_dense": ms / dense_ms,
                "expert_flops_fraction": frac,
                "max_abs_diff_vs_dense": float((layer(x) - mlp(x)).abs().max()),
            }
        )

    class SwiGLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
            self.down_proj = nn.Linear(h, d, bias=False)

        def forward(self, z):
            return self.down_proj(F.silu(self.gate_proj(z)) * self.up_proj(z))

    torch.manual_seed(seed + 1)
    seed_blk = ParallelBlock(
        norm=nn.LayerNorm(d), attention=CausalSelfAttention(dim=d, num_heads=4), ffn=SwiGLU()
    )
    seq_norm2 = nn.LayerNorm(d)

    def sequential(z):  # the usual pre-norm block with the same modules (a second norm for the FFN)
        z = z + seed_blk.attention(seed_blk.norm(z))
        return z + seed_blk.ffn(seq_norm2(z))

    mixed_same = bam_parallel_block([seed_blk] * 4, top_k=2, router_std=1.0)
    base_ms = _median_ms(lambda: seed_blk(x))
    rows.append(
        {
            "section": "bam",
            "variant": "dense parallel block (seed)",
            "ms_median": base_ms,
            "ratio_vs_seed": 1.0,
        }
    )
    rows.append(
        {
            "section": "bam",
            "variant": "dense sequential pre-norm block (same modules)",
            "ms_median": _median_ms(lambda: sequential(x)),
            "ratio_vs_seed": _median_ms(lambda: sequential(x)) / base_ms,
        }
    )
    rows.append(
        {
            "section": "bam",
            "variant": "BAM parallel block from 4 identical seeds (top-2 FFN, soft attention)",
            "ms_median": _median_ms(lambda: mixed_same(x)),
            "ratio_vs_seed": _median_ms(lambda: mixed_same(x)) / base_ms,
            "max_abs_diff_vs_seed": float((mixed_same(x).output - seed_blk(x).output).abs().max()),
        }
    )

    # MoGE: device imbalance IS = (max_d T_d - min_d T_d) / tokens over 4 devices, top-4 of 16 experts
    tok = x.reshape(-1, d)
    g = 4
    topk = TopKRouter(dim=d, num_experts=16, top_k=4)
    grouped = GroupedRouter(dim=d, num_experts=16, top_k=4, num_groups=g, expert_scale=True)
    grouped.gate.load_state_dict(topk.gate.state_dict())
    for label, router in (("top-4 of 16 (plain top-k)", topk), ("MoGE grouped, 1 per group of 4", grouped)):
        idx = router(tok).indices
        per_dev = torch.bincount((idx // (16 // g)).flatten(), minlength=g).float()
        rows.append(
            {
                "section": "moge",
                "variant": label,
                "imbalance_score": float((per_dev.max() - per_dev.min()) / tok.shape[0]),
            }
        )
    return rows


def new_sections(a, model, aligned, train_ids, vx, vy) -> list[dict]:
    """The issue-18 rows: MC-SMoE iterative compression, D2MoE dual routing, HEBF simulation, C3PO."""
    rows = mcsmoe_new_rows(model, aligned, train_ids, vx, vy, ctx=a.ctx, steps=a.kd_steps, seed=a.seed + 1)
    rows += d2moe_rows(model, vx, vy)
    rows += hebf_rows(model, vx)
    rows += c3po_new_rows(model, train_ids, vx, vy, ctx=a.ctx)
    for r in rows:
        print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    return rows


def write_results(a, rows, model, vx, vy, vocab, steps, last, t_train, extra=None) -> None:
    blk = find_moe_blocks(model)[0].experts
    meta = {
        "machine": f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "torch": torch.__version__,
        "train_seconds": round(t_train, 1),
        "train_steps": steps,
        "last_train_ce": last,
        "val_tokens": int(vy.numel()),
        "model": f"{type(model).__name__} dim {blk.dim}, {len(model.blocks)} layers, E=8, top-2, "
        f"SwiGLU experts H={blk.hidden_dim}, char-level; "
        + (
            "defined in this script"
            if a.model == "script"
            else "apps.lm TransformerLM trained by this script's loop"
        ),
        "note": "val loss in nats/char on fixed random held-out windows; uniform-guess loss = "
        f"{math.log(vocab):.3f}",
        "sections": "issue-18 sections only (--only-new)" if a.only_new else "all",
        **(extra or {}),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".json", delete=False) as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(f.name, out)
    print(f"wrote {a.out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-steps", type=int, default=500)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kd-steps", type=int, default=80)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--val-windows", type=int, default=128)
    p.add_argument(
        "--model",
        choices=("script", "app"),
        default="script",
        help="script: the MoE LM defined here (KV-cache decode); app: apps.lm.model.TransformerLM "
        "(same size, trained by this script's loop; decode recomputes the window, no KV cache)",
    )
    p.add_argument("--out", default=None, help="default benchmarks/results/moe_tools[_app].json")
    p.add_argument(
        "--only-arch",
        action="store_true",
        help="no training: UoE / BAM / MoGE rows on synthetic inputs only (default out moe_tools_arch.json)",
    )
    p.add_argument(
        "--only-new",
        action="store_true",
        help="after training, run only the issue-18 sections (D2MoE dual routing, HEBF simulation, C3PO mode "
        "finding and generation, MC-SMoE iterative compression)",
    )
    a = p.parse_args(argv)
    commit()  # record HEAD now: the code that runs
    a.out = a.out or str(
        ROOT / "benchmarks" / "results" / f"moe_tools{'_app' if a.model == 'app' else ''}.json"
    )
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    if a.only_arch:
        out = Path(
            a.out
            if a.out != str(ROOT / "benchmarks" / "results" / "moe_tools.json")
            else ROOT / "benchmarks" / "results" / "moe_tools_arch.json"
        )
        rows = arch_rows(a.seed)
        for r in rows:
            print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
        meta = {
            "machine": f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit(),
            "torch": torch.__version__,
            "note": "synthetic inputs (B=16, T=64, D=64), no training; "
            "times are medians of 7 forward passes on a shared machine",
        }
        with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".json", delete=False) as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        os.replace(f.name, out)
        print(f"wrote {out}")
        return
    train_ids, val_ids, vocab = load_data()
    gen = torch.Generator().manual_seed(123)
    vx, vy = windows(val_ids, a.val_windows, a.ctx, gen)
    model = MoELM(vocab) if a.model == "script" else AppLM(vocab)
    print(f"training {count_parameters(model):,} params for {a.train_steps} steps ...", flush=True)
    t_train = time.perf_counter()
    steps, last = train(model, train_ids, steps=a.train_steps, ctx=a.ctx, bs=32, lr=3e-3, seed=a.seed)
    t_train = time.perf_counter() - t_train
    rows = []
    base_loss, base_params = val_loss(model, vx, vy), count_parameters(model)
    rows.append(
        {
            "section": "mcsmoe",
            "variant": "trained MoE (E=8, top-2)",
            "val_loss": base_loss,
            "params": base_params,
            "train_steps": steps,
        }
    )
    print(f"base val loss {base_loss:.4f}  params {base_params:,}  steps {steps}", flush=True)

    # ---- MC-SMoE: merge to half the experts, then compress
    calib = [windows(train_ids, 16, a.ctx, torch.Generator().manual_seed(7 + i))[0] for i in range(8)]
    stats = collect_routing_stats(model, calib)
    for align in (True, False):
        merged = copy.deepcopy(model)
        merge_model(merged, stats, num_groups=4, align=align)
        rows.append(
            {
                "section": "mcsmoe",
                "variant": f"merged E=8->4 ({'aligned' if align else 'no alignment'})",
                "val_loss": val_loss(merged, vx, vy),
                "params": count_parameters(merged),
            }
        )
        if align:
            aligned = merged
    if a.only_new:
        t_new = time.perf_counter()
        rows += new_sections(a, model, aligned, train_ids, vx, vy)
        extra = {"new_seconds": round(time.perf_counter() - t_new, 1)}
        write_results(a, rows, model, vx, vy, vocab, steps, last, t_train, extra=extra)
        return
    for rank, keep in ((32, 0.1), (16, 0.1), (8, 0.05)):
        comp = copy.deepcopy(aligned)
        compress_model(comp, rank=rank, keep_ratio=keep)
        rows.append(
            {
                "section": "mcsmoe",
                "variant": f"merged + LoSparse rank {rank}, S keep {keep}",
                "val_loss": val_loss(comp, vx, vy),
                "params": count_parameters(comp),
            }
        )
    if a.kd_steps > 0:  # MC-SMoE fine-tunes the merged model with KD from the original
        ft = copy.deepcopy(aligned)
        kd_steps = kd_finetune(ft, model, train_ids, steps=a.kd_steps, ctx=a.ctx, seed=a.seed + 1)
        cont = copy.deepcopy(model)  # fair baseline: the unmerged model trained for the same extra steps
        train(cont, train_ids, steps=kd_steps, ctx=a.ctx, bs=32, lr=1e-3, seed=a.seed + 1)
        rows.append(
            {
                "section": "mcsmoe",
                "variant": f"unmerged + {kd_steps} more CE steps (baseline for KD)",
                "val_loss": val_loss(cont, vx, vy),
                "params": count_parameters(cont),
            }
        )
        rows.append(
            {
                "section": "mcsmoe",
                "variant": f"merged + KD fine-tune ({kd_steps} steps)",
                "val_loss": val_loss(ft, vx, vy),
                "params": count_parameters(ft),
            }
        )
        comp = copy.deepcopy(ft)
        compress_model(comp, rank=16, keep_ratio=0.1)
        rows.append(
            {
                "section": "mcsmoe",
                "variant": "merged + KD + LoSparse rank 16, S keep 0.1",
                "val_loss": val_loss(comp, vx, vy),
                "params": count_parameters(comp),
            }
        )
    for r in rows:
        if r["section"] == "mcsmoe":
            print(f"  {r['variant']:45s} val {r['val_loss']:.4f}  params {r['params']:,}", flush=True)

    # ---- bit-nested quantisation
    qm = copy.deepcopy(model)
    banks = quantize_model_experts(qm, bits=8, group_size=32)
    blk = find_moe_blocks(model)[0].experts
    expert_numel = 3 * blk.dim * blk.hidden_dim
    for b in (8, 6, 4, 3, 2):
        for q in banks:
            q.set_bits(b)
        rows.append(
            {
                "section": "quant",
                "variant": f"{b}-bit prefix of one INT8 code",
                "bits": b,
                "val_loss": val_loss(qm, vx, vy),
                "expert_bytes": sum(q.storage_bytes() for q in banks),
            }
        )
    cands = (2, 3, 4, 6, 8)
    budget = 8 * expert_numel * 3 / 8  # average 3 bits per weight per layer
    originals = [
        (r.experts.gate_proj.detach(), r.experts.up_proj.detach(), r.experts.down_proj.detach())
        for r in find_moe_blocks(model)
    ]
    for label, use_errors in (("hottest-first", False), ("usage x error per byte", True)):
        planned = [
            choose_bits(
                s.freq,
                expert_numel=expert_numel,
                budget_bytes=budget,
                candidates=cands,
                errors=q.expert_errors(cands, reference=ref) if use_errors else None,
            )
            for s, q, ref in zip(stats, banks, originals)
        ]
        for q, b in zip(banks, planned):
            q.set_bits(b)
        rows.append(
            {
                "section": "quant",
                "variant": f"planned widths ({label}), 3-bit budget",
                "bits": [b.tolist() for b in planned],
                "val_loss": val_loss(qm, vx, vy),
                "expert_bytes": sum(q.storage_bytes() for q in banks),
            }
        )
    rows.append(
        {
            "section": "quant",
            "variant": "float32 experts (reference)",
            "bits": 32,
            "val_loss": base_loss,
            "expert_bytes": 4 * expert_numel * 8 * len(find_moe_blocks(model)),
        }
    )
    for r in rows[-8:]:
        print(f"  {r['variant']:45s} val {r['val_loss']:.4f}  bytes {r['expert_bytes']:,}", flush=True)

    # ---- SCMoE vs greedy (teacher forced next-token accuracy on held-out windows)
    with torch.no_grad():
        strong = torch.cat([model(vx[i : i + 32]) for i in range(0, len(vx), 32)])
        greedy_acc = float((strong.argmax(-1) == vy).float().mean())
        rows.append({"section": "scmoe", "variant": "greedy (top-2 routing)", "accuracy": greedy_acc})
        for rank, beta in ((2, 0.5), (2, 0.1), (1, 0.5), (7, 0.5)):
            sc = torch.cat(
                [
                    scmoe_logits(model, vx[i : i + 32], alpha=0.1, beta=beta, rank=rank)
                    for i in range(0, len(vx), 32)
                ]
            )
            rows.append(
                {
                    "section": "scmoe",
                    "variant": f"SCMoE alpha 0.1 beta {beta} weak rank {rank}",
                    "accuracy": float((sc.argmax(-1) == vy).float().mean()),
                    "ratio_vs_greedy": float((sc.argmax(-1) == vy).float().mean()) / greedy_acc,
                }
            )
    for r in rows[-5:]:
        print(f"  {r['variant']:45s} acc {r['accuracy']:.4f}", flush=True)

    # ---- C3PO: last-token accuracy with kernel-regression re-mixing of the last 2 MoE layers
    blocks = critical_blocks(len(find_moe_blocks(model)), 2)
    embed = mean_embedding(model.tok if isinstance(model, MoELM) else model.lm.embed)
    rx, ry = windows(train_ids, 512, a.ctx, torch.Generator().manual_seed(99))
    with torch.no_grad():
        r_ok = torch.cat([model(rx[i : i + 64])[:, -1].argmax(-1) for i in range(0, 512, 64)]) == ry[:, -1]
    ref_x = rx[r_ok]  # references the model gets right (C3PO's reference set)
    ref_paths = torch.cat(
        [collect_pathways(model, ref_x[i : i + 64], blocks=blocks) for i in range(0, len(ref_x), 64)]
    )
    ref_emb = embed(ref_x)
    with torch.no_grad():
        base_last = torch.cat([model(vx[i : i + 64])[:, -1] for i in range(0, len(vx), 64)])
        hat = kernel_regression(embed(vx), ref_emb, ref_paths, k=3)
        c3_last = torch.cat(
            [
                remixed_logits(model, vx[i : i + 64], hat[i : i + 64], blocks=blocks)[:, -1]
                for i in range(0, len(vx), 64)
            ]
        )
    acc0 = float((base_last.argmax(-1) == vy[:, -1]).float().mean())
    acc1 = float((c3_last.argmax(-1) == vy[:, -1]).float().mean())
    rows.append({"section": "c3po", "variant": "own routing (last token)", "accuracy": acc0})
    rows.append(
        {
            "section": "c3po",
            "variant": f"kernel regression k=3, last 2 layers, {len(ref_x)} refs",
            "accuracy": acc1,
            "ratio_vs_own": acc1 / max(acc0, 1e-9),
        }
    )
    print(f"  C3PO last-token accuracy {acc0:.4f} -> {acc1:.4f}", flush=True)

    # ---- offloading: decode time per token and hit rate
    prompt = val_ids[:16].unsqueeze(0)
    n_new = a.decode_tokens
    base_t = decode_time(model, prompt, n_new)
    want = decode_tokens(model, prompt, n_new)
    base_row = len(rows)
    for frac in (0.25, 0.5, 1.0):
        for policy, prefetch in (("score", 1), ("score", 0), ("lru", 0)):
            om = copy.deepcopy(model)
            with tempfile.TemporaryDirectory() as d:
                engine, handles = offload_model(
                    om, capacity=frac, policy=policy, prefetch_size=prefetch, location="disk", directory=d
                )
                same = torch.equal(decode_tokens(om, prompt, n_new), want)
                engine.stats = OffloadStats()  # count the timed runs only (the cache stays warm)
                ts, bs = [], []
                for _ in range(5):  # interleave with the in-memory model: the shared machine is noisy
                    bs += decode_time(model, prompt, n_new, repeats=1)
                    ts += decode_time(om, prompt, n_new, repeats=1)
                base_t += bs
                st = engine.stats.as_dict()
                for h in handles:
                    h.remove()
            rows.append(
                {
                    "section": "offload",
                    "variant": f"{policy}{' + prefetch 1' if prefetch else ''}",
                    "cache_fraction": frac,
                    "s_per_token_median": statistics.median(ts),
                    "ratio_vs_in_memory": statistics.median(ts) / statistics.median(bs),
                    "bytes_per_token": st["bytes_moved"] / (5 * (n_new + prompt.shape[1])),
                    "tokens_identical": same,
                    **st,
                }
            )
    rows.insert(
        base_row,
        {
            "section": "offload",
            "variant": "all experts in memory",
            "cache_fraction": 1.0,
            "s_per_token_median": statistics.median(base_t),
            "hit_rate": 1.0,
            "ratio_vs_in_memory": 1.0,
        },
    )
    for r in rows[-10:]:
        print(
            f"  {r['variant']:22s} cache {r['cache_fraction']:.2f}  hit {r['hit_rate']:.3f}  "
            f"{1e3 * r['s_per_token_median']:.2f} ms/token  x{r['ratio_vs_in_memory']:.2f}  "
            f"same tokens {r.get('tokens_identical', True)}",
            flush=True,
        )

    rows += new_sections(a, model, aligned, train_ids, vx, vy)
    write_results(a, rows, model, vx, vy, vocab, steps, last, t_train)


if __name__ == "__main__":
    main()
