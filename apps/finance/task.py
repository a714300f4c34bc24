"""LightningModule for daily cross-sectional stock prediction (MIGA arXiv 2410.02241 and baselines).

``loss = task + w_balance * balance``; task loss is MSE on the normalised label, the negative daily IC
(Pearson), or a pairwise ranking loss. Validation logs daily IC / RankIC on the raw label; router models
log the routing statistics of ``moe_core.stats`` as ``routing/train/router/<statistic>`` (training-epoch
means). With ``predictions_path`` the model's scores for the valid and test days are written to Parquet at the
end of ``fit`` (and by ``test``), ready for ``moekit finance backtest --predictions ...``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import nn

from apps.finance.metrics import daily_ic, ic_summary, pearson_torch
from moe_core.losses import switch_balance_loss
from moe_core.stats import routing_stats
from moe_core.types import RouterOutput

log = logging.getLogger(__name__)


def switch_balance(routing: RouterOutput) -> torch.Tensor:
    """Switch-Transformer balance ``E · Σ_e f_e · P_e`` (1 at uniform); ``moe_core.losses``' function."""
    return switch_balance_loss(routing)


def sq_balance(routing: RouterOutput) -> torch.Tensor:
    """``E · Σ_e P̄_e²`` with P̄ the day-mean router probabilities (1 at uniform) — docs/finance.md §12."""
    p = routing.probs[:, : routing.num_experts].mean(0)
    return routing.num_experts * (p * p).sum()


def pairwise_rank_loss(pred: torch.Tensor, y: torch.Tensor, max_pairs: int = 20000) -> torch.Tensor:
    """Mean ``softplus(-(p_i - p_j))`` over pairs with ``y_i > y_j`` (RankNet-style; random pair subset)."""
    n = pred.numel()
    i = torch.randint(0, n, (max_pairs,), device=pred.device)
    j = torch.randint(0, n, (max_pairs,), device=pred.device)
    sign = torch.sign(y[i] - y[j])
    keep = sign != 0
    if not keep.any():
        return pred.sum() * 0
    return nn.functional.softplus(-sign[keep] * (pred[i] - pred[j])[keep]).mean()


class FinanceTask(L.LightningModule):
    """Train any model of :mod:`apps.finance.model` on daily batches.

    Args:
        model: the network (``MIGA``, ``MLP``, ``GRU``, ``ALSTM``, ``Transformer``), injected by class_path.
        loss: ``mse`` (on the CSRank/CSZScore label), ``ic`` (negative daily Pearson IC), ``rank`` (pairwise).
        balance_loss: ``none``, ``switch`` or ``sq`` (router models only).
        w_balance: weight of the balance term.
        lr, weight_decay: Adam settings.
        predictions_path: if set, write valid+test predictions here at the end of fit / test.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        loss: Literal["mse", "ic", "rank"] = "mse",
        balance_loss: Literal["none", "switch", "sq"] = "switch",
        w_balance: float = 0.01,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        predictions_path: str | None = None,
    ) -> None:
        super().__init__()
        if loss not in ("mse", "ic", "rank"):
            raise ValueError(f"loss must be one of mse, ic, rank; got {loss!r}")
        if balance_loss not in ("none", "switch", "sq"):
            raise ValueError(f"balance_loss must be one of none, switch, sq; got {balance_loss!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.loss_kind, self.balance_kind, self.w_balance = loss, balance_loss, w_balance
        self.lr, self.weight_decay, self.predictions_path = lr, weight_decay, predictions_path
        self._val: list[pd.DataFrame] = []
        self._test: list[pd.DataFrame] = []

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        nf = getattr(self.model, "num_features", None)
        if dm is not None and hasattr(dm, "num_features") and nf is not None and nf != dm.num_features:
            raise ValueError(
                f"model.num_features={nf} but the data has {dm.num_features} features "
                f"({dm.kind}); set model.init_args.num_features accordingly"
            )
        sl = getattr(self.model, "step_len", None)
        if dm is not None and sl is not None and hasattr(self.model, "router") and sl != dm.step_len:
            raise ValueError(f"model.step_len={sl} but data.step_len={dm.step_len}")

    def forward(self, x: torch.Tensor):  # noqa: ANN201 - ModelOutput
        return self.model(x)

    def task_loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "mse":
            return nn.functional.mse_loss(pred, y)
        if self.loss_kind == "ic":
            ic = pearson_torch(pred, y)
            return pred.sum() * 0 if ic is None else -ic  # skipped (zero, not NaN) for degenerate days
        return pairwise_rank_loss(pred, y)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.model(batch["x"])
        task = self.task_loss(out.score, batch["y"])
        loss = task
        self.log("train/task_loss", task, batch_size=1, on_epoch=True, on_step=False)
        if out.routing is not None and self.balance_kind != "none":
            bal = switch_balance(out.routing) if self.balance_kind == "switch" else sq_balance(out.routing)
            loss = loss + self.w_balance * bal
            self.log("train/balance_loss", bal, batch_size=1, on_epoch=True, on_step=False)
        if out.routing is not None:
            self.log_routing(out.routing)
        self.log("train/loss", loss, batch_size=1, on_epoch=True, on_step=False, prog_bar=True)
        return loss

    def log_routing(self, routing: RouterOutput) -> None:
        """Training-epoch means of every ``moe_core.stats.routing_stats`` statistic, as
        ``routing/train/router/<statistic>`` (the per-expert load as ``expert_load_e<i>``), the
        ``routing/<stage>/<name>/<statistic>`` names every app uses."""
        for key, value in routing_stats(routing).items():
            names = {key: value} if value.dim() == 0 else {f"{key}_e{e}": v for e, v in enumerate(value)}
            for name, v in names.items():
                self.log(f"routing/train/router/{name}", v, batch_size=1, on_epoch=True, on_step=False)

    def _frame(self, batch: dict[str, torch.Tensor]) -> pd.DataFrame:
        out = self.model(batch["x"])
        f = {
            "day": np.full(batch["tickers"].numel(), int(batch["day"])),
            "ticker_id": batch["tickers"].cpu().numpy(),
            "score": out.score.detach().float().cpu().numpy(),
            "label": batch["y_raw"].cpu().numpy(),
        }
        if out.routing is not None:
            w = out.routing.dense_weights().detach().float().cpu().numpy()  # (N, E)
            for e in range(w.shape[1]):
                f[f"w_e{e}"] = w[:, e]
        return pd.DataFrame(f)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._val.append(self._frame(batch))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        f = pd.concat(self._val).rename(columns={"day": "date"})
        self._val = []
        s = ic_summary(daily_ic(f))
        for k, v in s.items():
            self.log(f"val/{k}", float(np.nan_to_num(v)), prog_bar=k in ("IC", "RankIC"))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._test.append(self._frame(batch))

    def on_test_epoch_end(self) -> None:
        if not self._test:
            return
        f = pd.concat(self._test)
        self._test = []
        s = ic_summary(daily_ic(f.rename(columns={"day": "date"})))
        for k, v in s.items():
            self.log(f"test/{k}", float(np.nan_to_num(v)))

    @torch.no_grad()
    def predict_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> pd.DataFrame:
        """Scores of one day's cross-section (``moekit finance predict``; no label needed): ``date, ticker,
        day, ticker_id, score``, the names from the data module's panel when it has one."""
        score = self.model(batch["x"]).score.detach().float().cpu().numpy()  # (N,)
        day = int(batch["day"])
        tickers = batch["tickers"].cpu().numpy()  # (N,)
        f = pd.DataFrame({"day": np.full(len(tickers), day), "ticker_id": tickers, "score": score})
        panel = getattr(getattr(self._trainer, "datamodule", None), "panel", None)  # None: not attached
        if panel is not None:
            f.insert(0, "date", panel.dates[day])
            f.insert(1, "ticker", np.asarray(panel.tickers)[tickers])
        return f

    @torch.no_grad()
    def predict_frame(self, loader) -> pd.DataFrame:  # noqa: ANN001 - DataLoader
        """Scores for every day of a loader as a long table (``day, ticker_id, score, label, w_e*``)."""
        was = self.training
        self.eval()
        rows = [self._frame({k: v.to(self.device) for k, v in b.items()}) for b in loader]
        self.train(was)
        return pd.concat(rows, ignore_index=True)

    def on_fit_end(self) -> None:
        if self.predictions_path and getattr(self.trainer, "datamodule", None) is not None:
            ckpt = getattr(self.trainer.checkpoint_callback, "best_model_path", "") if self.trainer else ""
            if ckpt:  # predict with the best validation checkpoint, not the last epoch
                # weights only: tensors and plain data (the trainer's own loads are weights-only too)
                state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
                self.load_state_dict(state)
                log.info("predictions from best checkpoint %s", ckpt)
            write_predictions(self, self.trainer.datamodule, self.predictions_path)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def write_predictions(task: FinanceTask, dm, path: str) -> pd.DataFrame:  # noqa: ANN001 - SP500DataModule
    """Write valid+test predictions with dates, tickers and segment names to Parquet; returns the table."""
    parts = []
    for seg, loader in (("valid", dm.val_dataloader()), ("test", dm.test_dataloader())):
        f = task.predict_frame(loader)
        f["segment"] = seg
        parts.append(f)
    f = pd.concat(parts, ignore_index=True)
    f.insert(0, "date", dm.panel.dates[f["day"].to_numpy()])
    f.insert(1, "ticker", np.asarray(dm.panel.tickers)[f["ticker_id"].to_numpy()])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    f.to_parquet(path)
    log.info("wrote %d predictions to %s", len(f), path)
    return f
