"""Alpha158 feature-engine speed on the shipped S&P 500 panel vs the per-ticker reference, in one run.

Runs only the speed part of ``finance_sp500.py`` (no training), so it can be repeated cheaply:

    python benchmarks/finance_features_speed.py [--repeats 3]

Prints the median vectorised time over the repeats and the speed-up against the slow per-ticker reference
(timed on a subset of tickers and extrapolated linearly; the subset's outputs are compared with the engine's).
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
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finance_sp500 import feature_speed  # noqa: E402

from apps.finance.data import SP500DataModule  # noqa: E402

RES = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-tickers", type=int, default=5)
    a = ap.parse_args()
    dm = SP500DataModule(features="alpha158", step_len=1, label_norm="csrank")
    dm.setup("fit")
    runs = [feature_speed(dm, ref_tickers=a.ref_tickers) for _ in range(a.repeats)]
    fast = statistics.median(r["vectorised_s"] for r in runs)
    slow = statistics.median(r["reference_s_extrapolated"] for r in runs)
    r0 = runs[0]
    print(
        f"Alpha158 on {r0['tickers']} tickers x {r0['days']} days ({r0['features']} features): "
        f"vectorised median {fast:.1f}s over {a.repeats} runs {[round(r['vectorised_s'], 1) for r in runs]}; "
        f"reference {slow:.0f}s (extrapolated from {a.ref_tickers} tickers); ratio x{slow / fast:.0f}; "
        f"max rel diff {max(r['max_rel_diff_on_subset'] for r in runs):.1e}; load {os.getloadavg()}"
    )
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    RES.mkdir(parents=True, exist_ok=True)
    out = {
        "meta": {
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "commit": commit,
            "load_avg_after": os.getloadavg(),
            "target_s": 60,
        },
        "rows": runs + [{"what": "summary", "vectorised_median_s": fast, "reference_median_s": slow,
                         "speedup": slow / fast}],
    }
    (RES / "finance_features_speed.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
