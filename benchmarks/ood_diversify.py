"""Diversification under a spurious correlation: a synthetic task with a known answer (arXiv 2312.16313;
DivDis arXiv 2202.03418, D-BAT arXiv 2202.04414; losses in ``moe_core.diversify``).

Task [D]. A binary label y; a *core* cue ``core = ±U(0.1, 1)`` that always agrees with y, and a *spurious*
cue ``spur = ±U(1, 2)`` (larger margin, so plain ERM prefers it) that agrees with y with probability
``rho``; 8 Gaussian noise dimensions; the 10 raw features are mixed by a fixed random rotation. Training
has ``rho = 1`` (both cues explain the labels perfectly), the shifted test set has ``rho = 0.5`` (the
spurious cue is useless): only the core hypothesis reaches ~100 % there. A model is an MLP backbone
(10 -> 64 -> 64) with H linear heads; every head is trained on the labelled data, and DivDis / D-BAT add a
diversification term on unlabelled rows drawn with ``rho_unlab``. One head is selected with 32 labelled
rows of the test distribution (``moe_core.diversify.select_head``).

Experiments (seeds and std in the JSON):
  * ``main``: ERM vs DivDis vs D-BAT, unlabelled data from the test distribution (rho_unlab = 0.5);
  * ``unlabelled``: sensitivity to the unlabelled distribution, rho_unlab in {1, 0.75, 0.5, 0.25, 0};
  * ``heads``: number of heads H in {2, 4, 8} at a well-aligned (0.5) and a misaligned unlabelled set;
  * ``backbone``: trained from scratch vs frozen random vs frozen pretrained (pretrained on an auxiliary
    task: predicting the signs of both cues from decorrelated rows, i.e. generic features).

Run: ``nice .venv/bin/python benchmarks/ood_diversify.py [--seeds 5]``; writes
``benchmarks/results/ood_diversify.json`` and ``ood_diversify.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
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

from moe_core.diversify import DiversifiedHeads, diversification_loss, select_head  # noqa: E402

log = logging.getLogger("ood_diversify")
RAW_DIM, NOISE_DIM = 10, 8
WEIGHTS = {"divdis": 1.0, "dbat": 0.1}  # diversification weight per method (tuned once on main, seed 0)


def make_data(
    n: int, rho: float, *, mix: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 10)`` features and ``(n,)`` labels; the spurious cue agrees with the label w.p. ``rho``."""
    y = torch.randint(0, 2, (n,), generator=gen)
    sign = 2.0 * y - 1
    core = sign * (0.1 + 0.9 * torch.rand(n, generator=gen))
    agree = torch.rand(n, generator=gen) < rho
    spur = torch.where(agree, sign, -sign) * (1.0 + torch.rand(n, generator=gen))
    noise = 0.5 * torch.randn(n, NOISE_DIM, generator=gen)
    raw = torch.cat([core[:, None], spur[:, None], noise], dim=1)  # (n, 10)
    return raw @ mix, y


def backbone(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(RAW_DIM, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())


def pretrain(net: nn.Module, *, mix: torch.Tensor, seed: int, steps: int = 300) -> nn.Module:
    """Auxiliary task: predict sign(core) and sign(spur) from decorrelated rows (generic features)."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    x, _ = make_data(2000, 0.5, mix=mix, gen=gen)
    raw = x @ mix.t()  # un-mix to read the two cue signs as targets
    targets = (raw[:, :2] > 0).float()  # (n, 2)
    head = nn.Linear(64, 2)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(head(net(x)), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def run_one(
    *,
    method: str,
    heads: int,
    rho_unlab: float,
    seed: int,
    mix: torch.Tensor,
    backbone_kind: str = "scratch",
    steps: int = 400,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = make_data(1000, 1.0, mix=mix, gen=gen)
    x_un, _ = make_data(1000, rho_unlab, mix=mix, gen=gen)
    x_val, y_val = make_data(32, 0.5, mix=mix, gen=gen)
    x_te, y_te = make_data(4000, 0.5, mix=mix, gen=gen)
    x_id, y_id = make_data(2000, 1.0, mix=mix, gen=gen)
    net = backbone(seed)
    if backbone_kind == "pretrained":
        net = pretrain(net, mix=mix, seed=seed)
    if backbone_kind != "scratch":
        for p in net.parameters():
            p.requires_grad_(False)
    torch.manual_seed(seed + 1)
    hd = DiversifiedHeads(in_dim=64, num_heads=heads, num_classes=2)
    params = [p for p in [*net.parameters(), *hd.parameters()] if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(steps):
        loss = hd.labelled_loss(hd(net(x_tr)), y_tr)
        if method != "erm":
            loss = loss + WEIGHTS[method] * diversification_loss(hd(net(x_un)).softmax(-1), method=method)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        best = select_head(hd(net(x_val)).softmax(-1), y_val)
        acc_te = (hd(net(x_te)).argmax(-1) == y_te[:, None]).float().mean(0)  # (H,)
        acc_id = (hd(net(x_id)).argmax(-1) == y_id[:, None]).float().mean(0)
    return {
        "test_acc_selected": float(acc_te[best]),
        "test_acc_best_head": float(acc_te.max()),
        "id_acc_selected": float(acc_id[best]),
        "selected_head": best,
    }


def summarise(method: str, runs: list[dict], **cfg) -> dict:
    out = {"method": method, **cfg, "seeds": len(runs)}
    for k in ("test_acc_selected", "test_acc_best_head", "id_acc_selected"):
        vals = [r[k] for r in runs]
        out[k] = round(statistics.mean(vals), 4)
        out[k + "_std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
        out[k + "_runs"] = [round(v, 4) for v in vals]
    return out


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colors = {"erm": "tab:gray", "divdis": "tab:blue", "dbat": "tab:orange"}
    main = [r for r in rows if r["experiment"] == "main"]
    axes[0].bar(
        [r["method"] for r in main],
        [r["test_acc_selected"] for r in main],
        yerr=[r["test_acc_selected_std"] for r in main],
        color=[colors[r["method"]] for r in main],
    )
    axes[0].set_title("accuracy under shift (selected head)")
    for m in ("divdis", "dbat"):
        sub = sorted(
            (r for r in rows if r["experiment"] == "unlabelled" and r["method"] == m),
            key=lambda r: r["rho_unlab"],
        )
        axes[1].errorbar(
            [r["rho_unlab"] for r in sub],
            [r["test_acc_selected"] for r in sub],
            yerr=[r["test_acc_selected_std"] for r in sub],
            label=m,
            color=colors[m],
            marker="o",
        )
        for rho, ls in ((0.5, "-"), (HEADS_MISALIGNED, "--")):
            sub = sorted(
                (
                    r
                    for r in rows
                    if r["experiment"] == "heads" and r["method"] == m and r["rho_unlab"] == rho
                ),
                key=lambda r: r["heads"],
            )
            axes[2].errorbar(
                [r["heads"] for r in sub],
                [r["test_acc_selected"] for r in sub],
                yerr=[r["test_acc_selected_std"] for r in sub],
                label=f"{m} rho_unlab={rho}",
                color=colors[m],
                ls=ls,
                marker="o",
            )
    erm = next(r for r in main if r["method"] == "erm")["test_acc_selected"]
    axes[1].axhline(erm, color="gray", ls=":", label="ERM")
    axes[1].set_xlabel("P(spurious cue agrees with label) in the unlabelled data")
    axes[1].set_title("sensitivity to the unlabelled data")
    axes[1].legend()
    axes[2].set_xlabel("heads H")
    axes[2].set_title("number of heads")
    axes[2].legend(fontsize=7)
    kinds = ("scratch", "random_frozen", "pretrained")
    width = 0.27
    for i, m in enumerate(("erm", "divdis", "dbat")):
        sub = {r["backbone"]: r for r in rows if r["experiment"] == "backbone" and r["method"] == m}
        axes[3].bar(
            [k + (i - 1) * width for k in range(len(kinds))],
            [sub[k]["test_acc_selected"] for k in kinds],
            width,
            yerr=[sub[k]["test_acc_selected_std"] for k in kinds],
            label=m,
            color=colors[m],
        )
    axes[3].set_xticks(range(len(kinds)), kinds)
    axes[3].set_title("backbone")
    axes[3].legend()
    for ax in axes:
        ax.set_ylim(0.4, 1.02)
        ax.set_ylabel("test accuracy (rho = 0.5)")
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as f:
        tmp = Path(f.name)
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


HEADS_MISALIGNED = 0.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ood_diversify.json"))
    a = p.parse_args(argv)
    head = commit()  # the code that runs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    mix = torch.linalg.qr(torch.randn(RAW_DIM, RAW_DIM, generator=torch.Generator().manual_seed(123)))[0]
    seeds = list(range(a.seeds))
    rows: list[dict] = []
    t0 = time.perf_counter()

    def cell(
        experiment: str, method: str, heads: int, rho: float, kind: str = "scratch", n_seeds=None
    ) -> None:
        runs = [
            run_one(
                method=method, heads=heads, rho_unlab=rho, seed=s, mix=mix, backbone_kind=kind, steps=a.steps
            )
            for s in (seeds if n_seeds is None else seeds[:n_seeds])
        ]
        row = summarise(method, runs, experiment=experiment, heads=heads, rho_unlab=rho, backbone=kind)
        rows.append(row)
        log.info(
            "%-10s %-6s H=%d rho_unlab=%.2f %-13s test %.3f±%.3f (best head %.3f) id %.3f  [%.0fs]",
            experiment, method, heads, rho, kind, row["test_acc_selected"], row["test_acc_selected_std"],
            row["test_acc_best_head"], row["id_acc_selected"], time.perf_counter() - t0,
        )  # fmt: skip

    for m, h in (("erm", 1), ("divdis", 2), ("dbat", 2)):
        cell("main", m, h, 0.5)
    for m in ("divdis", "dbat"):
        for rho in (1.0, 0.75, 0.5, 0.25, 0.0):
            cell("unlabelled", m, 2, rho)
    n_small = min(3, a.seeds)
    for m in ("divdis", "dbat"):
        for rho in (0.5, HEADS_MISALIGNED):
            for h in (2, 4, 8):
                cell("heads", m, h, rho, n_seeds=n_small)
    for kind in ("scratch", "random_frozen", "pretrained"):
        for m, h in (("erm", 1), ("divdis", 2), ("dbat", 2)):
            cell("backbone", m, h, 0.5, kind, n_seeds=n_small)

    meta = {
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": head,
        "seeds": a.seeds,
        "seeds_heads_and_backbone": n_small,
        "steps": a.steps,
        "weights": WEIGHTS,
        "task": "core=±U(0.1,1) always agrees; spur=±U(1,2) agrees w.p. rho (train 1.0, test 0.5); "
        "8 noise dims; rotated; 1000 train / 1000 unlabelled / 32 labelled target rows for head selection / "
        "4000 test",
        "selection": "moe_core.diversify.select_head on 32 labelled rows of the test distribution",
        "scaled": "full-batch Adam lr 3e-3; heads/backbone experiments use min(3, seeds) seeds",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(a.out)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, suffix=".json", delete=False) as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(f.name, out)
    plot(rows, out.with_suffix(".png"))
    log.info("wrote %s and %s", out, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
