"""MIGA (arXiv 2410.02241) with and without diversification of its experts on the unlabelled test period
(DivDis arXiv 2202.03418, D-BAT arXiv 2202.04414, as studied in arXiv 2312.16313), CSI 300.

Protocol: ``benchmarks/finance_csi300.py``'s (qlib protocol A on ``shared/datasets/csi300_qlib``: Alpha158
without VWAP, RobustZScoreNorm fitted on the train universe + Fillna, CSZScore learn label, IC loss, switch
balance 0.01, lr 5e-4, gradient value clip 3, train 2010-2017 / valid 2018-2019 / test
2020-01-01..2026-05-08), MIGA-linear as there; the same seeds give every variant the same initial weights and
the same order of train days. Variants (``apps.finance.diversified.DiversifiedTask``):

* ``MIGA``: plain (``w_heads = w_div = 0``; the loss of ``finance_csi300.py``'s MIGA).
* ``MIGA+heads``: each expert's score also fits the label (``w_heads``), no diversification: the control
  that separates DivDis' "every head fits the data" from the diversification itself.
* ``MIGA+DivDis`` / ``MIGA+D-BAT``: ``w_heads`` + ``w_div`` x diversification of the experts' scores on one
  unlabelled test day per train day (features only; the test labels are read only for the final scoring).

Each run keeps its states per epoch; two selection rules are scored on the test period: ``mixture`` (epoch of
best valid RankIC of MIGA's router-weighted score) and ``valid_rankic`` (the (epoch, hypothesis) of best valid
RankIC among the mixture and the E single experts: the paper's selection by a labelled validation set). The
``oracle`` column (best single hypothesis on the test labels) is a diagnostic of what diversification made
available, not a method. ``test_head_mi``: mean pairwise mutual information of the experts' "above the day's
mean" readings on the test days (features only).

Run (background, nice'd on the shared machine)::

    nice -n 10 .venv/bin/python benchmarks/finance_csi300_divdis.py --seeds 3 --epochs 4 --max_instruments 300

Writes ``benchmarks/results/finance_csi300_divdis.json`` (``meta``, ``rows`` per run and rule, ``summary``),
rewritten after every run; runs go seed by seed through all variants, so a cut run keeps whole comparisons.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from apps.finance.data import DayDataset, MarketDataModule, PanelTransform  # noqa: E402
from apps.finance.diversified import (  # noqa: E402
    DiversifiedMIGA,
    DiversifiedTask,
    UnlabelledDays,
    candidate_names,
    candidate_rank_ic,
    head_frame,
)
from moe_core.diversify import mutual_information_loss, scores_to_binary_probs  # noqa: E402

RES = ROOT / "benchmarks" / "results"
warnings.filterwarnings("ignore")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
log = logging.getLogger("finance_csi300_divdis")

MIGA_ARGS = dict(step_len=1, encoder="linear", hidden_dim=64, num_groups=2, experts_per_group=4, top_k=2,
                 expert_dim=8, attention_heads=2)  # fmt: skip  # finance_csi300.py's MIGA
TASK_ARGS = dict(loss="ic", balance_loss="switch", w_balance=0.01, lr=5e-4)


def variant(name: str, w_div: float, w_heads: float) -> dict:
    """Settings of a variant name; ``NAME@w`` overrides ``w_div`` (e.g. ``MIGA+DivDis@1``)."""
    base, _, w = name.partition("@")
    w_div = float(w) if w else w_div
    specs = {
        "MIGA": {"w_heads": 0.0, "w_div": 0.0},
        "MIGA+heads": {"w_heads": w_heads, "w_div": 0.0},
        "MIGA+DivDis": {"w_heads": w_heads, "w_div": w_div, "method": "divdis"},
        "MIGA+D-BAT": {"w_heads": w_heads, "w_div": w_div, "method": "dbat"},
    }
    if base not in specs:
        raise ValueError(f"unknown variant {name!r}; known: {sorted(specs)} (optionally @w_div)")
    return specs[base]


@torch.no_grad()
def heads_table(model: DiversifiedMIGA, ds: DayDataset) -> pd.DataFrame:
    """Every hypothesis' scores on every day of ``ds`` (``head_frame`` rows)."""
    model.eval()
    return pd.concat([head_frame(model, ds[i]) for i in range(len(ds))], ignore_index=True)


@torch.no_grad()
def head_mi(model: DiversifiedMIGA, ds: UnlabelledDays, temperature: float, max_days: int = 200) -> float:
    """Mean over (evenly spaced) unlabelled days of the experts' pairwise MI (binary reading)."""
    model.eval()
    idx = np.linspace(0, len(ds) - 1, min(max_days, len(ds))).astype(int)
    mi = []
    for i in idx:
        _, y = model.forward_heads(ds[int(i)]["u_x"])  # (N, E)
        mi.append(float(mutual_information_loss(scores_to_binary_probs(y, temperature=temperature))))
    return float(np.mean(mi))


def run(
    dm: MarketDataModule, x_nn: np.ndarray, spec: dict, seed: int, epochs: int, temperature: float
) -> dict:
    """Train one variant, score both selection rules on the test period."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)  # train-day order: identical across variants
    model = DiversifiedMIGA(num_features=x_nn.shape[-1], **MIGA_ARGS)
    task = DiversifiedTask(model=model, temperature=temperature, selection="mixture", **TASK_ARGS, **spec)
    opt = torch.optim.Adam(model.parameters(), lr=TASK_ARGS["lr"])
    kw = dict(x=x_nn, y=dm.y, y_raw=dm.y_raw, present=dm.present, step_len=1)
    tr = DayDataset(days=dm.split.train, drop_nan_label=True, **kw)
    va = DayDataset(days=dm.split.valid, **kw)
    te = DayDataset(days=dm.split.test, **kw)
    unl = UnlabelledDays(x=x_nn, present=dm.present, days=dm.split.test, step_len=1)
    urng = np.random.default_rng(10_000 + seed)  # unlabelled draws: their own RNG
    names = candidate_names(model.num_experts)
    states, val = [], []
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        for i in rng.permutation(len(tr)):
            b = tr[i]
            if spec["w_div"]:
                b = {**b, **unl[int(urng.integers(len(unl)))]}
            loss, _, _ = task.training_loss(b)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_value_(model.parameters(), 3.0)  # as finance_csi300.py
            opt.step()
        v = candidate_rank_ic(heads_table(model, va), names)
        val.append({n: v[n]["RankIC"] for n in names})
        states.append({k: t.detach().clone() for k, t in model.state_dict().items()})
        log.info("  epoch %d valid RankIC mixture %.4f best expert %.4f (%.0f s)", ep, val[-1]["mixture"],
                 max(val[-1][n] for n in names[1:]), time.perf_counter() - t0)  # fmt: skip
    fit_s = time.perf_counter() - t0
    ep_mix = int(np.nanargmax([v["mixture"] for v in val]))
    flat = [(v[n], e, n) for e, v in enumerate(val) for n in names if np.isfinite(v[n])]
    _, ep_sel, head_sel = max(flat)
    out = {"fit_s": fit_s, "valid_RankIC_by_epoch": val}
    test_cache: dict[int, dict] = {}
    for rule, ep, head in (("mixture", ep_mix, "mixture"), ("valid_rankic", ep_sel, head_sel)):
        if ep not in test_cache:
            model.load_state_dict(states[ep])
            test_cache[ep] = {
                "summary": candidate_rank_ic(heads_table(model, te), names),
                "test_head_mi": head_mi(model, unl, temperature),
            }
        s = test_cache[ep]["summary"]
        out[rule] = {
            "epoch": ep, "hypothesis": head, "valid_RankIC": val[ep][head], "IC": s[head]["IC"],
            "ICIR": s[head]["ICIR"], "RankIC": s[head]["RankIC"], "RankICIR": s[head]["RankICIR"],
            "oracle_RankIC": max(s[n]["RankIC"] for n in names),
            "mean_expert_RankIC": float(np.mean([s[n]["RankIC"] for n in names[1:]])),
            "test_head_mi": test_cache[ep]["test_head_mi"],
        }  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--variants", default="MIGA,MIGA+heads,MIGA+DivDis,MIGA+D-BAT")
    ap.add_argument("--w_div", type=float, default=0.1)
    ap.add_argument("--w_heads", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=0.25)
    ap.add_argument("--max_instruments", type=int, default=None, help="first n instruments by code")
    ap.add_argument("--out", default="finance_csi300_divdis")
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the JSON's rows and run only the (variant, seed) pairs it lacks",
    )
    a = ap.parse_args()
    torch.set_num_threads(1)  # shared 2-core machine
    RES.mkdir(parents=True, exist_ok=True)
    dm = MarketDataModule(
        path="csi300_qlib", source="qlib", market="csi300", benchmark="SH000300",
        train=("2010-01-01", "2017-12-31"), valid=("2018-01-01", "2019-12-31"),
        test=("2020-01-01", "2026-05-08"), rules="cn", features="alpha158", feature_norm="none", step_len=1,
        label_norm="cszscore", max_instruments=a.max_instruments, cache=True,
    )  # fmt: skip
    t0 = time.perf_counter()
    dm.setup()
    fit_days = np.zeros(len(dm.x), bool)
    fit_days[dm.split.train] = True
    # the networks' view of finance_csi300.py (Views.x_nn): RobustZScoreNorm on the train universe + Fillna
    x_nn = PanelTransform(kind="alpha158").fit(dm.x, fit_days, dm.present).normalise(dm.x)
    del dm.x
    days, tickers, nf = x_nn.shape
    setup_s = time.perf_counter() - t0
    log.info("setup %.0f s: %d days x %d instruments x %d features", setup_s, days, tickers, nf)
    names = a.variants.split(",")
    specs = {n: variant(n, a.w_div, a.w_heads) for n in names}
    rows: list[dict] = []
    earlier: dict = {}
    if a.append and (RES / f"{a.out}.json").is_file():
        earlier = json.loads((RES / f"{a.out}.json").read_text())
        rows = list(earlier["rows"])
        names = list(dict.fromkeys([r["variant"] for r in rows] + names))

    def finish() -> None:
        summary = []
        for name in names:
            for rule in ("mixture", "valid_rankic"):
                rs = [r for r in rows if r["variant"] == name and r["rule"] == rule]
                if not rs:
                    continue

                def m(k: str, rs: list[dict] = rs) -> float:
                    return float(np.nanmean([r[k] for r in rs]))

                def sd(k: str, rs: list[dict] = rs) -> float:
                    return float(np.std([r[k] for r in rs], ddof=1)) if len(rs) > 1 else 0.0

                summary.append({
                    "variant": name, "rule": rule, "n_seeds": len(rs), "IC": m("IC"), "IC_std": sd("IC"),
                    "RankIC": m("RankIC"), "RankIC_std": sd("RankIC"), "RankICIR": m("RankICIR"),
                    "valid_RankIC": m("valid_RankIC"), "oracle_RankIC": m("oracle_RankIC"),
                    "mean_expert_RankIC": m("mean_expert_RankIC"), "test_head_mi": m("test_head_mi"),
                    "fit_s": m("fit_s"),
                    "hypotheses": [r["hypothesis"] for r in rs],
                })  # fmt: skip
        # paired differences against MIGA (same seed, same rule)
        for s in summary:
            d = [
                r["RankIC"] - b["RankIC"]
                for r in rows
                if r["variant"] == s["variant"] and r["rule"] == s["rule"]
                for b in rows
                if b["variant"] == "MIGA" and b["rule"] == s["rule"] and b["seed"] == r["seed"]
            ]
            s["RankIC_minus_MIGA"] = float(np.mean(d)) if d else float("nan")
            s["RankIC_minus_MIGA_std"] = float(np.std(d, ddof=1)) if len(d) > 1 else 0.0
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()  # fmt: skip
        meta = {
            "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus (shared, loaded)",
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "commit": commit,
            "data": "shared/datasets/csi300_qlib, csi300 membership by day",
            "protocol": "benchmarks/finance_csi300.py's (qlib protocol A on this data) for MIGA-linear; "
            "unlabelled target = every test day's features (transductive), one drawn per train day",
            "scaled_down": f"{a.seeds} seeds; {a.epochs} epochs (finance_csi300.py: 8, qlib: up to 200); "
            f"instruments: {'all' if a.max_instruments is None else f'first {a.max_instruments} by code'} "
            f"({tickers} after reading); single CPU thread on a shared 2-core machine; no hyper-parameter "
            "search: w_div as each variant names it (NAME@w, default --w_div); one w_heads, one temperature",
            "settings": {
                "w_div": a.w_div,
                "w_heads": a.w_heads,
                "temperature": a.temperature,
                "miga": MIGA_ARGS,
                "task": TASK_ARGS,
            },  # fmt: skip
            "earlier_runs": [
                *earlier.get("meta", {}).get("earlier_runs", []),
                *(
                    [{k: earlier["meta"][k] for k in ("date", "commit", "settings", "scaled_down")}]
                    if earlier
                    else []
                ),
            ],
            "setup_s": setup_s,
            "shape": {"days": days, "instruments": tickers, "features": nf},
            "seeds": a.seeds,
        }
        out = {"meta": meta, "summary": summary, "rows": rows}
        tmp = RES / f".{a.out}.json.tmp"
        tmp.write_text(json.dumps(out, indent=1, default=float))
        os.replace(tmp, RES / f"{a.out}.json")
        print("| variant | rule | seeds | IC | RankIC (std) | RankIC - MIGA (std) | oracle | head MI |",
              flush=True)  # fmt: skip
        for s in summary:
            print(f"| {s['variant']} | {s['rule']} | {s['n_seeds']} | {s['IC']:.4f} | {s['RankIC']:.4f} "
                  f"({s['RankIC_std']:.4f}) | {s['RankIC_minus_MIGA']:+.4f} "
                  f"({s['RankIC_minus_MIGA_std']:.4f}) "
                  f"| {s['oracle_RankIC']:.4f} | {s['test_head_mi']:.3f} |", flush=True)  # fmt: skip

    for seed in range(a.seeds):
        for name in specs:
            if any(r["variant"] == name and r["seed"] == seed for r in rows):
                continue  # --append: measured already
            res = run(dm, x_nn, specs[name], seed, a.epochs, a.temperature)
            for rule in ("mixture", "valid_rankic"):
                rows.append({"variant": name, "seed": seed, "rule": rule, "fit_s": res["fit_s"], **res[rule],
                             "temperature": a.temperature, **specs[name],
                             "valid_RankIC_by_epoch": res["valid_RankIC_by_epoch"]})  # fmt: skip
            r = res["valid_rankic"]
            msg = "%s seed %d: test RankIC mixture %.4f | selected %s %.4f | oracle %.4f | MI %.3f | %.0f s"
            log.info(msg,
                     name, seed, res["mixture"]["RankIC"], r["hypothesis"], r["RankIC"], r["oracle_RankIC"],
                     r["test_head_mi"], res["fit_s"])  # fmt: skip
            finish()
    finish()  # also when --append found every pair measured (refreshes meta and summary)


if __name__ == "__main__":
    main()
