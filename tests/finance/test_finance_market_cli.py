"""``moekit finance fit``, ``test``, ``predict``, ``backtest`` and ``lightgbm`` on a user's own daily-bar
folder in another layout than the shipped data (issue 16), configured exactly as docs/finance.md ("Bring your
own market") shows: one CSV per ticker, ``YYYYMMDD`` integer dates, columns ``ts_code, trade_date, open, high,
low, close, pre_close, vol, amount`` (Tushare's names; volume in lots of 100, amount in thousands of CNY), the
index as one more file. Runs on synthetic bars written by the test (no data set needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.cli import main

DOCS_CONFIG = """\
seed_everything: 0
model:
  class_path: apps.finance.task.FinanceTask
  init_args:
    model:
      class_path: apps.finance.model.MIGA
      init_args: {{num_features: 158, step_len: 1, hidden_dim: 16, num_groups: 2, experts_per_group: 2,
                  top_k: 2, expert_dim: 4, attention_heads: 2}}
    loss: ic
    predictions_path: {preds}
data:
  class_path: apps.finance.data.MarketDataModule
  init_args:
    path: {folder}
    source: bars
    benchmark: "000300.SH"
    columns: {{ticker: ts_code, date: trade_date, volume: vol, volume_unit: 100, amount: amount,
               amount_unit: 1000, prev_close: pre_close}}
    period: [2019-01-01, 2020-06-30]
    train: [2019-01-01, 2019-10-31]
    valid: [2019-11-01, 2019-12-31]
    test: [2020-01-01, 2020-06-30]
    rules: cn
trainer:
  max_epochs: 1
  enable_progress_bar: false
"""


def write_tushare_folder(root: Path, n: int = 12, seed: int = 0) -> pd.DatetimeIndex:
    """Per-ticker CSVs in Tushare's daily layout, a split in one stock, the index as ``000300.SH.csv``."""
    rng = np.random.default_rng(seed)
    days = pd.bdate_range("2018-11-01", "2020-07-31")  # beyond the configured period on both sides
    root.mkdir(parents=True)
    common = rng.normal(0, 0.01, len(days))
    for i in range(n + 1):
        code = "000300.SH" if i == n else f"{600000 + i}.SH"
        r = common + (0 if i == n else rng.normal(0, 0.02, len(days)))
        c = 10 * np.exp(np.cumsum(r))
        pre = np.r_[c[0], c[:-1]]
        if i == 0:  # a 2-for-1 split on day 200: raw prices halve, pre_close is the ex-split reference
            c[200:] /= 2
            pre = np.r_[c[0], c[:-1]]
            pre[200] = c[199] / 2
        vol = rng.integers(1_000, 10_000, len(days)).astype(float)
        pd.DataFrame(
            {
                "ts_code": code,
                "trade_date": days.strftime("%Y%m%d").astype(int),
                "open": pre * (1 + r / 2),
                "high": np.maximum(pre, c) * 1.01,
                "low": np.minimum(pre, c) * 0.99,
                "close": c,
                "pre_close": pre,
                "vol": vol,
                "amount": vol * 100 * c / 1000,
            }
        ).iloc[::-1].to_csv(root / f"{code}.csv", index=False)  # newest first, as Tushare returns it
    return days


@pytest.mark.slow
def test_user_folder_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    write_tushare_folder(tmp_path / "bars")
    cfg = tmp_path / "mine.yaml"
    preds = tmp_path / "preds.parquet"
    cfg.write_text(DOCS_CONFIG.format(folder=tmp_path / "bars", preds=preds))
    main(["finance", "fit", "--config", str(cfg), f"--run_dir={tmp_path / 'fit'}"])
    got = pd.read_parquet(preds)
    assert set(got["segment"]) == {"valid", "test"}
    assert got["date"].min() >= pd.Timestamp("2019-11-01") and got["date"].max() == pd.Timestamp("2020-06-30")
    assert not got["ticker"].eq("000300.SH").any() and got["ticker"].nunique() == 12
    assert np.isfinite(got["score"]).all()
    last = f"--ckpt_path={tmp_path / 'fit' / 'last.ckpt'}"  # the fit's checkpoint, as a user scores it
    main(["finance", "test", "--config", str(cfg), f"--run_dir={tmp_path / 'test'}", last])
    capsys.readouterr()
    main(["finance", "backtest", "--config", str(cfg), "--predictions", str(preds), "--topk", "4",
          "--n_drop", "1", "--out", str(tmp_path / "bt")])  # fmt: skip
    out = capsys.readouterr().out
    assert "RankIC" in out and "min_cost 5.0" in out and "N=238" in out  # the cn preset from the config
    summary = (tmp_path / "bt" / "summary.json").read_text()
    assert all(f'"{k}"' in summary for k in ("annualized_return", "information_ratio", "max_drawdown"))
    # predict: the last two test days have no label (no future close) and are scored all the same
    main(["finance", "predict", "--config", str(cfg), f"--run_dir={tmp_path / 'pred'}", last])
    out = capsys.readouterr().out
    path = tmp_path / "pred" / "predictions.parquet"
    assert f"predictions: {path}" in out
    p = pd.read_parquet(path)
    assert p["date"].max() == pd.Timestamp("2020-06-30") and (p["date"] == p["date"].max()).sum() == 12
    main(["finance", "lightgbm", "--config", str(cfg), "--out", str(tmp_path / "lgb.parquet"),
          "--num_boost_round", "20", "--topk", "4", "--n_drop", "1"])  # fmt: skip
    assert f"predictions: {tmp_path / 'lgb.parquet'}" in capsys.readouterr().out
    assert len(pd.read_parquet(tmp_path / "lgb.parquet")) == len(got)


def test_docs_config_is_the_documented_one() -> None:
    """The config above is the one docs/finance.md shows (the docs cannot drift from the tested config)."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "finance.md").read_text()
    data_section = "data:\n" + DOCS_CONFIG.split("data:\n", 1)[1].split("trainer:", 1)[0]
    for line in data_section.splitlines():
        line = line.replace("{{", "{").replace("}}", "}")
        if "{folder}" in line:
            continue
        assert line in docs, line
