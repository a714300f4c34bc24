"""Alpha158 feature-engine speed on the whole CSI 300 panel vs the per-ticker reference, one run (issue 16).

Reads ``shared/datasets/csi300_qlib`` (751 instruments x 3,966 days; ``--market sp500`` for the shipped S&P
500 panel instead), times the vectorised engine ``apps.finance.features.alpha158`` on the whole panel
``--repeats`` times, and times the slow per-ticker reference ``alpha158_reference`` on ``--ref-tickers``
tickers, extrapolated linearly to the panel (it is per-ticker by construction); the subset's outputs are
compared with the engine's. Target: the whole panel in under 60 s.

    python benchmarks/finance_features_speed.py [--repeats 3] [--ref-tickers 3]

Writes ``benchmarks/results/finance_features_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from apps.finance.features import FIELDS, alpha158, alpha158_reference  # noqa: E402

RES = ROOT / "benchmarks" / "results"


def load(market: str) -> dict:
    if market == "csi300":
        from apps.datadir import data_dir
        from apps.finance.sources import read_qlib

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            md = read_qlib(data_dir() / "csi300_qlib", market="csi300", benchmark="SH000300")
        return {f: md.wide[f] for f in FIELDS}
    from apps.finance.data import SP500DataModule

    dm = SP500DataModule(features="alpha158", step_len=1, cache=False)
    dm.setup("fit")
    return dm.panel.wide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--market", choices=["csi300", "sp500"], default="csi300")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-tickers", type=int, default=3)
    a = ap.parse_args()
    wide = load(a.market)
    days, n = wide["close"].shape
    fast = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        feats = alpha158(wide)
        fast.append(time.perf_counter() - t0)
        print(f"vectorised: {fast[-1]:.1f} s", flush=True)
    sub = {k: v.iloc[:, : a.ref_tickers] for k, v in wide.items()}
    t0 = time.perf_counter()
    ref = alpha158_reference(sub)
    slow_sub = time.perf_counter() - t0
    slow = slow_sub / a.ref_tickers * n
    maxdiff = 0.0
    for k in ref:
        r, f = ref[k].to_numpy(), feats[k].iloc[:, : a.ref_tickers].to_numpy(np.float64)
        ok = np.isfinite(r) & np.isfinite(f)
        if ok.any():
            maxdiff = max(maxdiff, float(np.max(np.abs(f[ok] - r[ok]) / (1 + np.abs(r[ok])))))
    med = statistics.median(fast)
    print(
        f"Alpha158 on {n} tickers x {days} days ({len(feats)} features): vectorised median {med:.1f} s "
        f"{[round(x, 1) for x in fast]}; reference {slow:.0f} s (extrapolated from {a.ref_tickers} tickers, "
        f"{slow_sub:.1f} s); ratio x{slow / med:.0f}; max rel diff {maxdiff:.1e}; load {os.getloadavg()}"
    )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    RES.mkdir(parents=True, exist_ok=True)
    out = {
        "meta": {
            "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared)",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit.stdout.strip(),
            "load_avg_after": os.getloadavg(),
            "market": a.market,
            "target_s": 60,
        },
        "rows": [
            {
                "what": "alpha158_engine",
                "tickers": n,
                "days": days,
                "features": len(feats),
                "vectorised_s": fast,
                "vectorised_median_s": med,
                "reference_s_extrapolated": slow,
                "reference_tickers_timed": a.ref_tickers,
                "reference_s_subset": slow_sub,
                "speedup": slow / med,
                "max_rel_diff_on_subset": maxdiff,
                "under_60s": med < 60,
            }
        ],
    }
    tmp = RES / ".finance_features_speed.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, RES / "finance_features_speed.json")


if __name__ == "__main__":
    main()
