"""Alpha158 parity with qlib itself (issue 16): ``shared/oracles/qlib_alpha158`` holds pyqlib 0.9.7's own
Alpha158 for 8 CSI 300 stocks and its inputs; moekit's engine gets the same inputs (from 2010, compared from
2015-01-05, as qlib computes over the whole history).

Required: per feature, at least 99 % of the cells agree to 1e-3 relative (``np.isclose(rtol=1e-3,
atol=1e-6)``: the absolute floor is for values that are 0 up to float32 rounding, e.g. KMID on a flat day) or
are NaN on both sides, and NaN agrees exactly outside the near-constant windows (a constant close over the
feature's window, or a zero-volume day in it).

Remaining differences, all inside those windows (measured: 147 of 157 features agree on every cell; the
others: RSQR30 99.1 %, WVMA10 99.5 %, WVMA20 99.6 %, WVMA5 99.8 %, CORR5, CORR10, CORD5, CORD10, VSTD60,
WVMA60 >= 99.9 %):

* ``RSQRn`` on a constant close window (suspensions with carried-forward prices): R^2 = 0/0 is undefined.
  moekit returns NaN (it tests constancy exactly, max == min); qlib's float sums leave residues and return
  NaN on some windows (SZ000858, 2015-09) and 0.0 on others (SZ000002, 2016-02). moekit is right: the
  regression of a constant has no R^2; qlib's 0.0 is rounding noise. Both become the same after Fillna only
  if the normalised median is 0, so this is a real (small) difference.
* ``WVMAn``, ``CORRn``, ``CORDn``, ``VSTD60``: windows with zero volume (suspended days): qlib computes in
  float32 with running sums, moekit in float64 (its engine matches the float64 per-ticker reference
  ``alpha158_reference`` in test_finance_features.py); std/mean of series that are mostly 0 are
  ill-conditioned, so qlib's float32 cancellation error dominates there: moekit's values are the more
  accurate ones. Outside such windows the two agree on every cell.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.datadir import data_dir
from apps.finance.features import FIELDS, WINDOWS, alpha158

ORACLE = "../oracles/qlib_alpha158"


def _window(name: str) -> int:
    digits = "".join(ch for ch in name if ch.isdigit())
    w = int(digits) if digits else 1
    return w if w in WINDOWS else 1


@pytest.mark.needs_data(f"{ORACLE}/inputs.parquet", f"{ORACLE}/alpha158_qlib.parquet")
def test_alpha158_agrees_with_qlib():
    root = data_dir() / ORACLE
    inp = pd.read_parquet(root / "inputs.parquet")  # (instrument, datetime) x OHLCV + factor
    ref = pd.read_parquet(root / "alpha158_qlib.parquet")  # (datetime, instrument) x 158
    wide = {f: inp[f].unstack("instrument").astype(np.float64) for f in FIELDS}
    feats = alpha158(wide)
    assert "VWAP0" not in feats and len(feats) == 157 and ref["VWAP0"].isna().all()  # the data has no vwap
    assert list(feats) == [c for c in ref.columns if c != "VWAP0"]
    close, vol = wide["close"], wide["volume"]
    worst = {}
    for name, df in feats.items():
        d = _window(name)
        const = (close.rolling(d, min_periods=1).max() - close.rolling(d, min_periods=1).min()) == 0
        const &= d > 1  # a one-day "window" is not a constant window
        zero_v = (vol == 0).astype(float).rolling(d + 1, min_periods=1).max() > 0
        near = (const | zero_v).stack(future_stack=True).reindex(ref.index).to_numpy()
        ours = df.stack(future_stack=True).reindex(ref.index).to_numpy(np.float64)
        q = ref[name].to_numpy(np.float64)
        both_nan = np.isnan(ours) & np.isnan(q)
        agree = both_nan | np.isclose(ours, q, rtol=1e-3, atol=1e-6)
        worst[name] = agree.mean()
        assert agree.mean() >= 0.99, (name, agree.mean())
        nan_diff = np.isnan(ours) != np.isnan(q)
        assert not (nan_diff & ~near).any(), (name, int((nan_diff & ~near).sum()))
        assert near.mean() < 0.10, (name, near.mean())  # the exemption covers few cells (<= 7 % at 60 days)
    assert sum(v == 1.0 for v in worst.values()) >= 130, sorted(worst.items(), key=lambda kv: kv[1])[:30]
