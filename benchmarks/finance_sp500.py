"""Stock benchmark on the shipped S&P 500 panel (protocol C): MIGA vs MLP/GRU/ALSTM/Transformer/LightGBM.

Alpha158 (157 features, no VWAP), label close[t+2]/close[t+1]-1, train 2013-05..2015-12 / valid 2016 / test
2017-01..2018-02 (purged), 3 seeds each; every model's epoch is chosen by valid RankIC; metrics on the TEST
segment: IC, ICIR, RankIC, RankICIR on the raw label, TopK-Dropout(50, 5) excess return over ^GSPC with costs
(buy 5 bp, sell 15 bp, no minimum), sum accumulation, 252 days/year. The universe is survivorship-biased
(Feb-2018 constituents), so absolute returns are optimistic.

Also times the Alpha158 engine on all 505 tickers x 1,259 days against the slow per-ticker reference (the
reference is timed on a subset of tickers and extrapolated linearly — it is per-ticker by construction).

Run: ``python benchmarks/finance_sp500.py [--seeds 3] [--epochs 4] [--quick]``.
Writes ``benchmarks/results/finance_sp500.json`` and PNGs ``finance_sp500_*.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from apps.finance.backtest import topk_dropout_backtest  # noqa: E402
from apps.finance.data import SP500DataModule, daily_returns  # noqa: E402
from apps.finance.features import alpha158, alpha158_reference  # noqa: E402
from apps.finance.metrics import daily_ic, ic_summary  # noqa: E402
from apps.finance.model import ALSTM, GRU, MIGA, MLP, Transformer  # noqa: E402
from apps.finance.task import FinanceTask  # noqa: E402

RES = ROOT / "benchmarks" / "results"
warnings.filterwarnings("ignore")
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def feature_speed(dm: SP500DataModule, ref_tickers: int = 5) -> dict:
    wide = dm.panel.wide
    t0 = time.perf_counter()
    feats = alpha158(wide)
    fast = time.perf_counter() - t0
    sub = {k: v.iloc[:, :ref_tickers] for k, v in wide.items()}
    t0 = time.perf_counter()
    ref = alpha158_reference(sub)
    slow_sub = time.perf_counter() - t0
    n = wide["close"].shape[1]
    maxdiff = max(
        float(
            np.nanmax(
                np.abs(feats[k].iloc[:, :ref_tickers].to_numpy() - ref[k].to_numpy())
                / (1 + np.abs(ref[k].to_numpy()))
            )
        )
        if np.isfinite(ref[k].to_numpy()).any()
        else 0.0
        for k in ref
    )
    slow = slow_sub / ref_tickers * n
    return {
        "what": "alpha158_engine",
        "tickers": n,
        "days": wide["close"].shape[0],
        "features": len(feats),
        "vectorised_s": fast,
        "reference_s_extrapolated": slow,
        "reference_tickers_timed": ref_tickers,
        "reference_s_subset": slow_sub,
        "speedup": slow / fast,
        "max_rel_diff_on_subset": maxdiff,
        "torch_threads": torch.get_num_threads(),
    }


def nn_models(nf: int, T: int) -> dict:
    return {
        "MIGA": (
            lambda: MIGA(
                num_features=nf,
                step_len=T,
                encoder="linear",
                hidden_dim=64,
                num_groups=2,
                experts_per_group=4,
                top_k=2,
                expert_dim=8,
                attention_heads=2,
            ),
            {"loss": "ic", "balance_loss": "switch", "w_balance": 0.01, "lr": 5e-4},
        ),
        "MLP": (lambda: MLP(num_features=nf, hidden_dim=64, num_layers=2), {"loss": "mse", "lr": 5e-4}),
        "GRU": (lambda: GRU(num_features=nf, hidden_dim=64), {"loss": "mse", "lr": 5e-4}),
        "ALSTM": (lambda: ALSTM(num_features=nf, hidden_dim=64), {"loss": "mse", "lr": 5e-4}),
        "Transformer": (
            lambda: Transformer(num_features=nf, step_len=T, hidden_dim=64, num_heads=4),
            {"loss": "mse", "lr": 5e-4},
        ),
        # MIGA ablations (docs/finance.md §12 switches), run with --tag ablation
        "MIGA-mse": (
            lambda: MIGA(
                num_features=nf,
                step_len=T,
                encoder="linear",
                hidden_dim=64,
                num_groups=2,
                experts_per_group=4,
                top_k=2,
                expert_dim=8,
                attention_heads=2,
            ),
            {"loss": "mse", "balance_loss": "switch", "w_balance": 0.01, "lr": 5e-4},
        ),
        "MIGA-noattn": (
            lambda: MIGA(
                num_features=nf,
                step_len=T,
                encoder="linear",
                hidden_dim=64,
                num_groups=2,
                experts_per_group=4,
                top_k=2,
                expert_dim=8,
                inner_attention=False,
            ),
            {"loss": "ic", "balance_loss": "switch", "w_balance": 0.01, "lr": 5e-4},
        ),
        "MIGA-nobal": (
            lambda: MIGA(
                num_features=nf,
                step_len=T,
                encoder="linear",
                hidden_dim=64,
                num_groups=2,
                experts_per_group=4,
                top_k=2,
                expert_dim=8,
                attention_heads=2,
            ),
            {"loss": "ic", "balance_loss": "none", "lr": 5e-4},
        ),
        "MIGA-G1M1": (
            lambda: MIGA(
                num_features=nf,
                step_len=T,
                encoder="linear",
                hidden_dim=64,
                num_groups=1,
                experts_per_group=1,
                top_k=1,
                expert_dim=8,
                inner_attention=False,
            ),
            {"loss": "ic", "balance_loss": "none", "lr": 5e-4},
        ),
        "MIGA-conv-T5": (
            lambda: MIGA(
                num_features=nf,
                step_len=T,
                encoder="conv1d",
                hidden_dim=32,
                num_groups=2,
                experts_per_group=4,
                top_k=2,
                expert_dim=8,
                attention_heads=2,
            ),
            {"loss": "ic", "balance_loss": "switch", "w_balance": 0.01, "lr": 5e-4},
        ),
    }


def evaluate(
    preds: pd.DataFrame, dm: SP500DataModule, rets: pd.DataFrame, bench: pd.Series, days: np.ndarray
):
    """IC table and backtest of a long prediction table (``day, ticker_id, score, label``) on ``days``."""
    p = preds[preds["day"].isin(days)].copy()
    p["date"] = dm.panel.dates[p["day"].to_numpy()]
    p["ticker"] = np.asarray(dm.panel.tickers)[p["ticker_id"].to_numpy()]
    ic = daily_ic(p)
    s = ic_summary(ic)
    scores = p.pivot(index="date", columns="ticker", values="score")
    cal = dm.panel.dates[days.min() : days.max() + 1]
    bt = topk_dropout_backtest(
        scores,
        rets.loc[cal],
        bench.loc[cal],
        topk=50,
        n_drop=5,
        buy_cost=0.0005,
        sell_cost=0.0015,
        min_cost=0.0,
        mode="sum",
        days_per_year=252,
    )
    e = bt.summary["excess_return_with_cost"]
    e_c = bt.summary["excess_return_without_cost"]
    row = {
        **s,
        "AR": e["AR"],
        "IR": e["IR"],
        "MDD": e["MDD"],
        "AR_no_cost": e_c["AR"],
        "turnover": bt.summary["mean_turnover"],
    }
    return row, ic, bt.report, p


def run_nn(name, make, kw, dm, seed, epochs, tmp):  # noqa: ANN001
    L.seed_everything(seed, workers=True, verbose=False)
    task = FinanceTask(model=make(), **kw)
    ck = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp, filename=f"{name}-{seed}", monitor="val/RankIC", mode="max", save_top_k=1
    )
    tr = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ck],
        deterministic=False,
    )
    t0 = time.perf_counter()
    tr.fit(task, datamodule=dm)
    fit_s = time.perf_counter() - t0
    state = torch.load(ck.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
    task.load_state_dict(state)
    valid = task.predict_frame(dm.val_dataloader())
    test = task.predict_frame(dm.test_dataloader())
    best_epoch = int(torch.load(ck.best_model_path, map_location="cpu", weights_only=False)["epoch"])
    os.remove(ck.best_model_path)
    return valid, test, fit_s, best_epoch


def run_lgb(dm, seed):  # noqa: ANN001
    from apps.finance.gbdt import fit_lightgbm, predict_lightgbm

    t0 = time.perf_counter()
    b = fit_lightgbm(dm, seed=seed, num_threads=1)
    fit_s = time.perf_counter() - t0
    return (
        predict_lightgbm(b, dm, dm.split.valid),
        predict_lightgbm(b, dm, dm.split.test),
        fit_s,
        b.best_iteration,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--step_len", type=int, default=5)
    ap.add_argument("--models", default="MIGA,MLP,GRU,ALSTM,Transformer,LightGBM")
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 epoch (smoke)")
    ap.add_argument("--skip_speed", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result files (e.g. ablation)")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.epochs = 1, 1
    torch.set_num_threads(1)  # the 2 shared cores are oversubscribed: 2 threads ran ~20x slower here
    RES.mkdir(parents=True, exist_ok=True)
    dm = SP500DataModule(features="alpha158", step_len=a.step_len, label_norm="csrank")
    t0 = time.perf_counter()
    dm.setup("fit")
    print(f"data setup {time.perf_counter() - t0:.1f}s; validation report {dm.panel.report}", flush=True)
    rows = []
    if not a.skip_speed:
        sp = feature_speed(dm)
        print(
            f"Alpha158 engine: vectorised {sp['vectorised_s']:.1f}s for {sp['tickers']}x{sp['days']}; reference "  # noqa: E501
            f"{sp['reference_s_extrapolated']:.0f}s (extrapolated from {sp['reference_tickers_timed']} tickers); "  # noqa: E501
            f"speedup x{sp['speedup']:.0f}; max rel diff {sp['max_rel_diff_on_subset']:.2e}",
            flush=True,
        )
        rows.append(sp)
    close = dm.panel.wide["close"]
    rets = daily_returns(close, dm.panel.move_mask).where(close.notna())
    bench = dm.bench.pct_change().fillna(0.0)
    models = nn_models(dm.num_features, a.step_len)
    per_model: dict[str, list[dict]] = {}
    ic_plot, bt_plot = {}, {}
    usage = None

    def finish() -> None:
        """Summarise what has run so far and (re)write the JSON and plots."""
        keys = ("IC", "ICIR", "RankIC", "RankICIR", "AR", "IR", "MDD", "valid_RankIC")
        summary = []
        for name, rs in per_model.items():
            s = {"model": name, "seeds": len(rs), "summary": True}
            for k in keys:
                v = np.array([r[k] for r in rs], dtype=float)
                s[k + "_mean"], s[k + "_std"] = (
                    float(np.nanmean(v)),
                    float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0,
                )
            summary.append(s)
        base = max((s for s in summary if s["model"] != "MIGA"), key=lambda s: s["RankIC_mean"], default=None)
        print(
            "\nTEST segment 2017-01-03..2018-02-07 | TopK-Dropout(50,5), buy 5bp / sell 15bp, min cost 0, "
            "excess over ^GSPC, mode=sum, N=252 | mean ± std over seeds"
        )
        print("| model | IC | ICIR | RankIC | RankICIR | AR | IR | MDD | valid RankIC |")
        print("|---|---|---|---|---|---|---|---|---|")
        for s in summary:
            print(
                "| "
                + s["model"]
                + " | "
                + " | ".join(f"{s[k + '_mean']:.4f}±{s[k + '_std']:.4f}" for k in keys)
                + " |"
            )
        if base is not None and "MIGA" in per_model:
            mig = next(s for s in summary if s["model"] == "MIGA")
            print(
                f"MIGA mean RankIC / best baseline ({base['model']}) mean RankIC = "
                f"{mig['RankIC_mean']:.4f} / {base['RankIC_mean']:.4f} = {mig['RankIC_mean'] / base['RankIC_mean']:.2f}"  # noqa: E501
            )
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        meta = {
            "machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cpus (shared)",  # noqa: E501
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "commit": commit,
            "protocol": "C (docs/finance.md §0): S&P 500 panel, Alpha158 w/o VWAP (157), label close[t+2]/close[t+1]-1",  # noqa: E501
            "backtest": {
                "topk": 50,
                "n_drop": 5,
                "buy_cost": 0.0005,
                "sell_cost": 0.0015,
                "min_cost": 0.0,
                "mode": "sum",
                "days_per_year": 252,
                "benchmark": "^GSPC",
            },
            "epochs": a.epochs,
            "step_len": a.step_len,
            "seeds": a.seeds,
            "caveat": "survivorship-biased universe (Feb-2018 constituents); absurd one-day moves masked",
        }
        name = "finance_sp500_quick" if a.quick else "finance_sp500" + (f"_{a.tag}" if a.tag else "")
        (RES / f"{name}.json").write_text(
            json.dumps({"meta": meta, "rows": rows + summary}, indent=1, default=float)
        )
        from apps.finance.plots import plot_daily_ic, plot_excess, plot_expert_usage

        plot_excess(
            bt_plot, RES / f"{name}_excess.png", title="TopK-Dropout(50,5) excess over ^GSPC, test, seed 0"
        )
        plot_daily_ic(ic_plot, RES / f"{name}_daily_ic.png")
        if usage is not None:
            plot_expert_usage(usage, RES / f"{name}_expert_usage.png")
        print(f"wrote {RES / (name + '.json')}")

    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            for seed in range(a.seeds):
                if name == "LightGBM":
                    valid, test, fit_s, best = run_lgb(dm, seed)
                else:
                    make, kw = models[name]
                    valid, test, fit_s, best = run_nn(name, make, kw, dm, seed, a.epochs, tmp)
                vrow, _, _, _ = evaluate(valid, dm, rets, bench, dm.split.valid)
                row, ic, rep, p = evaluate(test, dm, rets, bench, dm.split.test)
                row = {
                    "model": name,
                    "seed": seed,
                    "segment": "test",
                    "fit_s": fit_s,
                    "best_epoch_or_iter": best,
                    "valid_RankIC": vrow["RankIC"],
                    "valid_IC": vrow["IC"],
                    **row,
                }
                rows.append(row)
                per_model.setdefault(name, []).append(row)
                print(
                    f"{name:12s} seed {seed}: test IC {row['IC']:.4f} RankIC {row['RankIC']:.4f} AR {row['AR']:.4f} "  # noqa: E501
                    f"IR {row['IR']:.2f} MDD {row['MDD']:.4f} | valid RankIC {row['valid_RankIC']:.4f} | "
                    f"fit {fit_s:.0f}s best {best}",
                    flush=True,
                )
                if seed == 0:
                    ic_plot[name], bt_plot[name] = ic, rep
                    if name == "MIGA":
                        usage = p
            finish()


if __name__ == "__main__":
    main()
