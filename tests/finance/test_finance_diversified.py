"""Diversification of MIGA's experts on the unlabelled test period (apps/finance/diversified.py; DivDis arXiv
2202.03418, D-BAT arXiv 2202.04414).

Oracles: ``MIGA.forward`` on the same weights (the per-expert path must rebuild MIGA's score); closed forms of
the two losses on hard identical / independent experts (DivDis: MI + KL(marginal || uniform) = ln 2 for
identical heads, -> 0 for independent ones; D-BAT: -log(eps) on rows where two heads agree, 0 where they
disagree); bit-identical training with the test labels replaced by noise (no target label reaches training)
while changing the test features does change it (the unlabelled path is live); on a CSI 300 subset the
diversified experts agree less on the test days than plain MIGA's.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from apps.finance.diversified import (
    DiversifiedMarketDataModule,
    DiversifiedMIGA,
    DiversifiedTask,
    UnlabelledDays,
    candidate_names,
)
from apps.finance.model import MIGA
from apps.finance.task import FinanceTask, switch_balance
from moe_core.diversify import mutual_information_loss, scores_to_binary_probs

CONFIG = Path(__file__).resolve().parents[2] / "apps" / "finance" / "configs" / "csi300_miga_divdis.yaml"
TINY = dict(
    num_features=6, step_len=2, hidden_dim=8, num_groups=2, experts_per_group=2, top_k=2, expert_dim=4
)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"expert_type": "mlp", "market_context": "cross_section", "attention_scope": "selected", "top_k": 1},
    ],
)
def test_forward_heads_rebuild_miga_score(kw: dict) -> None:
    torch.manual_seed(0)
    model = DiversifiedMIGA(**{**TINY, **kw}).eval()
    with torch.no_grad():  # MIGA.forward's context projection starts at zero: make it count
        if hasattr(model, "context"):
            model.context.weight.normal_()
    x = torch.randn(30, 2, 6)
    out, y = model.forward_heads(x)
    ref = MIGA.forward(model, x)  # the parent's forward on the same weights
    torch.testing.assert_close(out.score, ref.score)
    torch.testing.assert_close(out.score, (ref.routing.dense_weights() * y).sum(-1))
    torch.testing.assert_close(model(x).score, ref.score)  # selected_head = -1: the mixture
    model.select(2)
    torch.testing.assert_close(model(x).score, y[:, 2])
    assert int(model.state_dict()["selected_head"]) == 2  # a checkpoint carries the selection
    with pytest.raises(ValueError, match="head must be in"):
        model.select(4)


def test_without_diversification_the_loss_is_finance_task_loss() -> None:
    torch.manual_seed(0)
    model = DiversifiedMIGA(**TINY)
    task = DiversifiedTask(model=model, w_div=0.0, w_heads=0.0, loss="ic", w_balance=0.05)
    x, y = torch.randn(40, 2, 6), torch.randn(40)
    torch.manual_seed(1)
    loss, terms, _ = task.training_loss({"x": x, "y": y})
    plain = FinanceTask(model=model, loss="ic", w_balance=0.05)
    torch.manual_seed(1)
    out = MIGA.forward(model, x)
    torch.testing.assert_close(loss, plain.task_loss(out.score, y) + 0.05 * switch_balance(out.routing))
    assert set(terms) == {"task", "balance"}
    with pytest.raises(ValueError, match="DiversifiedMarketDataModule"):
        DiversifiedTask(model=model, w_div=0.1).training_loss({"x": x, "y": y})
    with pytest.raises(TypeError, match="DiversifiedMIGA"):
        DiversifiedTask(model=MIGA(**TINY))


def _hard_heads_model(identical: bool, e: int = 4) -> DiversifiedMIGA:
    """Linear MIGA whose expert e reads input feature e alone (independent heads on iid features), or whose
    experts all equal expert 0 (identical heads); no inner attention."""
    m = DiversifiedMIGA(num_features=e, step_len=1, hidden_dim=e, num_groups=1, experts_per_group=e, top_k=1,
                        expert_dim=1, inner_attention=False)  # fmt: skip
    with torch.no_grad():
        lin = m.encoder.net[0]
        lin.weight.copy_(torch.eye(e))
        lin.bias.zero_()
        m.w.zero_()
        m.b.zero_()
        m.readout.fill_(1.0)
        m.readout_bias.zero_()
        for k in range(e):
            m.w[k, 0 if identical else k, 0] = 1.0  # y_k = leaky_relu(x_k) (or x_0 for all)
    return m


@pytest.mark.parametrize("identical", [True, False])
def test_loss_closed_forms_on_identical_and_independent_experts(identical: bool) -> None:
    torch.manual_seed(0)
    u_x = torch.randn(20_000, 1, 4)  # one unlabelled day, iid features
    model = _hard_heads_model(identical)
    divdis = DiversifiedTask(model=model, method="divdis", temperature=1e-6, w_heads=0.0)
    dbat = DiversifiedTask(model=model, method="dbat", temperature=1e-6, w_heads=0.0)
    _, y = model.forward_heads(u_x[:, :, :])
    up = (y > y.mean(0)).float()  # hard readings (N, E)
    if identical:
        # MI = H(q) and KL(marginal || uniform) = ln 2 - H(q): the DivDis term is ln 2 whatever q is
        assert float(divdis.diversity(u_x).detach()) == pytest.approx(math.log(2), abs=1e-3)
        assert float(dbat.diversity(u_x).detach()) == pytest.approx(
            -math.log(1e-7), rel=1e-3
        )  # every row agrees
    else:
        # MI -> 0; the marginal KL of each head is ln 2 - H(q_h) (leaky ReLU: q_h, the share above the mean,
        # is ~0.35, not 0.5)
        q = up.mean(0)  # (E,)
        kl = math.log(2) + (q * q.log() + (1 - q) * (1 - q).log())  # (E,)
        assert float(divdis.diversity(u_x).detach()) == pytest.approx(float(kl.mean()), abs=2e-3)
        assert float(kl.mean()) > 0.02  # the marginal term is not negligible here: the check has teeth
        agree = torch.stack([(up[:, i] == up[:, j]).float().mean() for j in range(1, 4) for i in range(j)])
        assert float(dbat.diversity(u_x).detach()) == pytest.approx(
            float(agree.mean()) * -math.log(1e-7), rel=1e-3
        )
        assert 0.45 < float(agree.mean()) < 0.55


def write_bars(root: Path, n: int = 16, seed: int = 0) -> None:
    """One CSV of daily bars per ticker in the default column names, 2018-11..2020-07 business days."""
    rng = np.random.default_rng(seed)
    days = pd.bdate_range("2018-11-01", "2020-07-31")
    root.mkdir(parents=True)
    common = rng.normal(0, 0.01, len(days))
    for i in range(n):
        r = common + rng.normal(0, 0.02, len(days))
        c = 10 * np.exp(np.cumsum(r))
        pre = np.r_[c[0], c[:-1]]
        pd.DataFrame({
            "date": days.strftime("%Y-%m-%d"), "ticker": f"T{i:02d}", "open": pre * (1 + r / 2),
            "high": np.maximum(pre, c) * 1.01, "low": np.minimum(pre, c) * 0.99, "close": c,
            "volume": rng.integers(1_000, 10_000, len(days)).astype(float),
        }).to_csv(root / f"T{i:02d}.csv", index=False)  # fmt: skip


def _bars_dm(folder: Path) -> DiversifiedMarketDataModule:
    dm = DiversifiedMarketDataModule(path=str(folder), source="bars", period=("2019-01-01", "2020-06-30"),
                                     train=("2019-01-01", "2019-10-31"), valid=("2019-11-01", "2019-12-31"),
                                     test=("2020-01-01", "2020-06-30"), rules="cn", step_len=2)  # fmt: skip
    dm.setup()
    return dm


def _fit(dm: DiversifiedMarketDataModule) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    model = DiversifiedMIGA(num_features=dm.num_features, step_len=2, hidden_dim=8, num_groups=2,
                            experts_per_group=2, top_k=2, expert_dim=4)  # fmt: skip
    task = DiversifiedTask(model=model, w_div=1.0, temperature=0.25, lr=3e-3)
    L.Trainer(max_epochs=1, limit_val_batches=10, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              deterministic=True).fit(task, datamodule=dm)  # fmt: skip
    assert int(model.selected_head) == int(task.trainer.callback_metrics["val/selected_head"])
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_no_target_label_reaches_training(tmp_path: Path) -> None:
    write_bars(tmp_path / "bars")
    dm = _bars_dm(tmp_path / "bars")
    test_days = dm.split.test
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"x", "y", "y_raw", "tickers", "day", "u_x", "u_tickers", "u_day"}
    assert int(batch["u_day"]) in set(test_days.tolist()) and int(batch["day"]) in set(
        dm.split.train.tolist()
    )
    unl = dm.unlabelled_days()
    assert isinstance(unl, UnlabelledDays) and np.isnan(unl.days.y).all() and np.isnan(unl.days.y_raw).all()
    assert np.isfinite(dm.y_raw[test_days[:-3]]).any()  # the test labels exist; training must not see them
    base = _fit(dm)
    rng = np.random.default_rng(1)
    dm.y[test_days] = rng.normal(size=dm.y[test_days].shape).astype(dm.y.dtype)  # test labels -> noise
    dm.y_raw[test_days] = rng.normal(size=dm.y_raw[test_days].shape).astype(dm.y_raw.dtype)
    for k, v in _fit(dm).items():
        torch.testing.assert_close(v, base[k], rtol=0, atol=0, msg=k)
    dm.x[test_days] += 0.5  # control: the test features do reach training (the unlabelled path is live)
    moved = _fit(dm)
    assert any(not torch.equal(moved[k], base[k]) for k in base if k != "selected_head")


def test_config_instantiates_diversified_parts() -> None:
    cfg = yaml.safe_load(CONFIG.read_text())
    m = cfg["model"]["init_args"]
    assert m["model"]["class_path"].endswith("DiversifiedMIGA") and m["w_div"] > 0
    assert cfg["data"]["class_path"].endswith("DiversifiedMarketDataModule")
    assert cfg["data"]["init_args"]["unlabelled"] == "test"
    ref = yaml.safe_load(CONFIG.with_name("csi300_miga.yaml").read_text())
    assert m["model"]["init_args"] == ref["model"]["init_args"]["model"]["init_args"]  # the same MIGA
    assert {k: v for k, v in cfg["data"]["init_args"].items() if not k.startswith("unlabelled")} == ref[
        "data"
    ]["init_args"]


@pytest.mark.slow
@pytest.mark.needs_data("csi300_qlib/calendars/day.txt", "csi300_qlib/instruments/csi300.txt")
def test_csi300_subset_diversified_experts_agree_less_on_test_days() -> None:
    data = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]
    data.update(max_instruments=80, period=("2015-01-01", "2019-12-31"), train=("2015-01-01", "2017-12-31"),
                valid=("2018-01-01", "2018-06-30"), test=("2018-07-01", "2019-12-31"))  # fmt: skip
    dm = DiversifiedMarketDataModule(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    dm.setup()
    margs = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["model"]["init_args"]
    unl = dm.unlabelled_days()
    mi, rank = {}, {}
    for w_div in (0.0, 1.0):
        L.seed_everything(0, verbose=False)
        model = DiversifiedMIGA(**margs)
        task = DiversifiedTask(model=model, w_div=w_div, temperature=0.25, lr=2e-3)
        L.Trainer(max_epochs=1, limit_train_batches=250, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  ).fit(task, datamodule=dm)  # fmt: skip
        names = candidate_names(model.num_experts)
        rank[w_div] = [float(task.trainer.callback_metrics[f"val/RankIC_{n}"]) for n in names]
        assert int(model.selected_head) == int(np.argmax(rank[w_div])) - 1  # the best valid hypothesis
        model.eval()
        with torch.no_grad():
            per_day = [
                mutual_information_loss(
                    scores_to_binary_probs(model.forward_heads(unl[i]["u_x"])[1], temperature=0.25)
                )
                for i in range(0, len(unl), 5)
            ]
        mi[w_div] = float(torch.stack(per_day).mean())
    print(f"test-day head MI: plain {mi[0.0]:.4f}, diversified {mi[1.0]:.4f}; valid RankIC {rank}")
    assert mi[1.0] < 0.5 * mi[0.0], mi


@pytest.mark.slow
def test_cli_fit_with_the_shipped_config_scores_with_the_selected_hypothesis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    write_bars(tmp_path / "bars")
    preds = tmp_path / "preds.parquet"
    main(["finance", "fit", "--config", str(CONFIG), f"--run_dir={tmp_path / 'fit'}",
          "--data.init_args.source=bars", f"--data.init_args.path={tmp_path / 'bars'}",
          "--data.init_args.market=null", "--data.init_args.benchmark=equal_weight",
          "--data.init_args.cache=false", "--data.init_args.period=[2019-01-01, 2020-06-30]",
          "--data.init_args.train=[2019-01-01, 2019-10-31]",
          "--data.init_args.valid=[2019-11-01, 2019-12-31]",
          "--data.init_args.test=[2020-01-01, 2020-06-30]", "--trainer.max_epochs=2",
          "--trainer.enable_progress_bar=false", f"--model.init_args.predictions_path={preds}"])  # fmt: skip
    got = pd.read_parquet(preds)
    assert set(got["segment"]) == {"valid", "test"} and np.isfinite(got["score"]).all()
    (ckpt,) = [p for p in (tmp_path / "fit").rglob("*.ckpt") if p.name != "last.ckpt"]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    margs = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["model"]["init_args"]
    model = DiversifiedMIGA(**margs).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    head = int(model.selected_head)
    day = got[got["segment"] == "test"]["day"].iloc[0]
    rows = got[got["day"] == day]
    dm = _bars_dm(tmp_path / "bars")  # the same panel, split and train-fitted normalisation
    x = torch.from_numpy(dm.x[day, rows["ticker_id"].to_numpy()])[:, None]  # (N, 1, F)
    with torch.no_grad():
        out, y = model.forward_heads(x)
    want = out.score if head < 0 else y[:, head]
    np.testing.assert_allclose(rows["score"].to_numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
