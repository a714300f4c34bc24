"""Alpha158/Alpha360: vectorised engine vs the slow per-ticker reference, invariants and no look-ahead."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from apps.finance.features import ALPHA158_NAMES, alpha158, alpha158_reference, alpha360, cached_features


def rand_panel(T: int = 80, N: int = 4, seed: int = 0, nan_frac: float = 0.05) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    idx = pd.bdate_range("2020-01-01", periods=T)
    c = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, (T, N)), 0))
    o = c * np.exp(rng.normal(0, 0.01, (T, N)))
    h = np.maximum(o, c) * np.exp(np.abs(rng.normal(0, 0.01, (T, N))))
    lo = np.minimum(o, c) * np.exp(-np.abs(rng.normal(0, 0.01, (T, N))))
    v = rng.lognormal(10, 0.5, (T, N))
    w = {"open": o, "high": h, "low": lo, "close": c, "volume": v}
    for k in w:
        w[k] = np.where(rng.random((T, N)) < nan_frac, np.nan, w[k])
    w["close"][: T - 12, 0] = np.nan  # a short history (late listing): 12 days
    for k in w:
        w[k][: T - 12, 0] = np.nan
    w["close"][:, 1] = np.round(w["close"][:, 1])  # ties for Rank / IdxMax
    w["volume"][7, 2] = 0.0  # zero volume
    cols = [f"S{i}" for i in range(N)]
    return {k: pd.DataFrame(a, index=idx, columns=cols) for k, a in w.items()}


@pytest.fixture(scope="module")
def pair():
    w = rand_panel(seed=0)
    w2 = rand_panel(T=70, N=3, seed=1, nan_frac=0.12)
    w2["vwap"] = (w2["high"] + w2["low"]) / 2
    return [(alpha158(w), alpha158_reference(w)), (alpha158(w2), alpha158_reference(w2))]


def test_names_and_order():
    assert len(ALPHA158_NAMES) == 158 and ALPHA158_NAMES[:4] == ("KMID", "KLEN", "KMID2", "KUP")
    assert ALPHA158_NAMES[12] == "VWAP0" and ALPHA158_NAMES[13] == "ROC5" and ALPHA158_NAMES[-1] == "VSUMD60"
    assert list(alpha158(rand_panel(T=30))) == [n for n in ALPHA158_NAMES if n != "VWAP0"]


@pytest.mark.parametrize("name", ALPHA158_NAMES)
def test_feature_equals_reference(pair, name):
    for fast, ref in pair:
        if name not in fast:  # VWAP0 only in the panel that has vwap
            assert name == "VWAP0"
            continue
        a, b = fast[name].to_numpy(), ref[name].to_numpy()
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8, equal_nan=True, err_msg=name)
        assert np.isfinite(a).sum() >= 10, f"{name} (almost) all NaN: the comparison would be vacuous"


def test_constant_series_invariants():
    idx = pd.bdate_range("2020-01-01", periods=70)
    one = pd.DataFrame(np.full((70, 2), 10.0), index=idx)
    w = {"open": one, "high": one, "low": one, "close": one, "volume": one * 1000}
    f = alpha158(w)
    for d in (5, 60):
        np.testing.assert_allclose(f[f"MA{d}"].to_numpy(), 1.0)
        np.testing.assert_allclose(f[f"ROC{d}"].to_numpy()[d:], 1.0)
        np.testing.assert_allclose(f[f"STD{d}"].to_numpy()[1:], 0.0)
        np.testing.assert_allclose(f[f"BETA{d}"].to_numpy()[1:], 0.0)
        np.testing.assert_allclose(f[f"CNTP{d}"].to_numpy(), 0.0)
        np.testing.assert_allclose(f[f"CNTN{d}"].to_numpy(), 0.0)
        assert np.isnan(f[f"RSQR{d}"].to_numpy()).all() and np.isnan(f[f"CORR{d}"].to_numpy()).all()


def test_price_scale_invariance():
    w = rand_panel(seed=3, nan_frac=0.0)
    w2 = {k: (v * 7.0 if k != "volume" else v) for k, v in w.items()}
    f, g = alpha158(w), alpha158(w2)
    for n in f:  # the 1e-12 guards make KMID2-type features differ at ~1e-12 relative
        np.testing.assert_allclose(
            f[n].to_numpy(), g[n].to_numpy(), rtol=1e-6, atol=1e-9, equal_nan=True, err_msg=n
        )


def test_no_look_ahead():
    w = rand_panel(seed=4)
    t = 50
    w2 = {k: v.copy() for k, v in w.items()}
    rng = np.random.default_rng(9)
    for k in w2:
        w2[k].iloc[t + 1 :] *= rng.uniform(0.5, 2.0, size=w2[k].iloc[t + 1 :].shape)
    f, g = alpha158(w), alpha158(w2)
    changed_later = False
    for n in f:
        np.testing.assert_array_equal(f[n].to_numpy()[: t + 1], g[n].to_numpy()[: t + 1], err_msg=n)
        changed_later |= not np.allclose(f[n].to_numpy()[t + 1 :], g[n].to_numpy()[t + 1 :], equal_nan=True)
    assert changed_later  # the perturbation was real
    a, b = alpha360(w), alpha360(w2)
    for n in a:
        np.testing.assert_array_equal(a[n].to_numpy()[: t + 1], b[n].to_numpy()[: t + 1], err_msg=n)


def test_alpha360_columns():
    w = rand_panel(T=70, seed=5, nan_frac=0.0)
    a = alpha360(w)
    assert len(a) == 300 and list(a)[:2] == ["CLOSE59", "CLOSE58"] and list(a)[-1] == "VOLUME0"
    c, v = w["close"].to_numpy(), w["volume"].to_numpy()
    np.testing.assert_allclose(a["CLOSE59"].to_numpy()[65], c[6] / c[65])
    np.testing.assert_allclose(a["HIGH3"].to_numpy()[40], w["high"].to_numpy()[37] / c[40])
    np.testing.assert_allclose(a["VOLUME1"].to_numpy()[40], v[39] / (v[40] + 1e-12))
    np.testing.assert_allclose(a["CLOSE0"].to_numpy()[:, 1:], 1.0)


def test_cache_roundtrip_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    w = rand_panel(T=40, N=3, seed=6)
    x1, n1 = cached_features(w)
    files = list((tmp_path / "finance").glob("*.npy"))
    assert len(files) == 1 and files[0].stat().st_size >= x1.nbytes  # float32 array on disk
    assert np.load(files[0]).dtype == np.float32
    assert not list((tmp_path / "finance").glob(".*tmp"))  # atomic writes leave no temporary
    x2, n2 = cached_features(w)
    np.testing.assert_array_equal(np.nan_to_num(x1, nan=-9), np.nan_to_num(x2, nan=-9))
    assert n1 == n2 and x1.shape == (40, 3, 157)
    w["close"].iloc[5, 1] *= 1.01
    cached_features(w)
    assert len(list((tmp_path / "finance").glob("*.npy"))) == 2  # changed input -> new key
    with pytest.raises(ValueError, match="kind"):
        cached_features(w, kind="alpha999")
    with pytest.raises(ValueError, match="missing fields"):
        alpha158({"close": w["close"]})
