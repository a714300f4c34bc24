"""Diversifying MIGA's experts on the unlabelled test period (DivDis arXiv 2202.03418, D-BAT arXiv 2202.04414;
"Unraveling the Key Components of OOD Generalization via Diversification", arXiv 2312.16313).

The finance app's test period is a distribution shift whose features (never its labels) exist at prediction
time. This module offers the diversification of ``moe_core.diversify`` as an option on MIGA's experts:

* :class:`DiversifiedMIGA` is MIGA that also returns each expert's score ``y (N, E)`` (the per-expert
  read-out ``y_e = v_e^T z'_e`` that MIGA sums with its router weights) and scores with one selected
  hypothesis (``selected_head``: ``-1`` = MIGA's router-weighted mixture, ``e`` = expert e alone; a buffer,
  so a checkpoint carries the selection).
* :class:`DiversifiedTask` trains ``task(mixture) + w_heads * mean_e task(y_e) + w_balance * balance
  + w_div * diversification(y on an unlabelled target day)``. Each expert score is one hypothesis; the score
  heads are read as "above the day's mean" binary predictions (``moe_core.diversify.scores_to_binary_probs``)
  for DivDis' mutual information (+ marginal KL) or D-BAT's agreement loss. After each validation epoch it
  selects the hypothesis (mixture or one expert) with the best validation RankIC
  (``moe_core.diversify.select_head_by_metric``; the paper's selection by a labelled validation set).
* :class:`DiversifiedMarketDataModule` pairs every labelled train day with a day of the target period whose
  batch carries features only (``u_x``, ``u_tickers``, ``u_day``); the target days are read from a dataset
  built with all-NaN label arrays, so no target label can reach training.

Our reading [D]: DivDis diversifies heads that each fit the labelled data; MIGA's experts only fit it through
the mixture, so ``w_heads`` adds each expert's own task loss. The target set is the whole test period
(transductive, as DivDis); a deployable walk-forward variant would use only the days before each prediction.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from apps.finance.data import DayDataset, MarketDataModule
from apps.finance.metrics import daily_ic, ic_summary
from apps.finance.model import MIGA, ModelOutput
from apps.finance.task import FinanceTask, sq_balance, switch_balance
from moe_core.diversify import (
    Method,
    diversification_loss,
    mutual_information_loss,
    scores_to_binary_probs,
    select_head_by_metric,
)
from moe_core.types import RouterOutput

log = logging.getLogger(__name__)

Selection = Literal["mixture", "valid_rankic"]
Unlabelled = Literal["test", "valid"]


class DiversifiedMIGA(MIGA):
    """MIGA (same arguments and weights) that exposes each expert's score and can score with one of them.

    ``forward_heads`` repeats ``MIGA.forward`` step by step (MIGA returns only the mixture) and also returns
    the per-expert scores; ``tests/finance/test_finance_diversified.py`` checks that its mixture equals
    ``MIGA.forward`` on the same weights, so a change of MIGA's forward fails there.
    """

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - MIGA's keyword arguments
        super().__init__(**kwargs)
        self.register_buffer("selected_head", torch.tensor(-1, dtype=torch.long))

    def forward_heads(self, x: torch.Tensor) -> tuple[ModelOutput, torch.Tensor]:
        """x ``(N, T, F)`` -> (mixture output as ``MIGA.forward``, expert scores ``(N, E)``)."""
        if x.dim() != 3 or x.shape[-1] != self.num_features or x.shape[1] != self.step_len:
            raise ValueError(
                f"x must have shape (N, T={self.step_len}, F={self.num_features}), got {tuple(x.shape)}"
            )
        h = self.encoder(x)  # (N, H)
        r_in = h
        if self.market_context == "cross_section":
            r_in = h + self.context(x[:, -1].mean(0))  # (N, H) + (H,)
        routing = self.router(r_in)
        dense_w = routing.dense_weights().to(h.dtype)  # (N, E)
        z = self.group_attention(self.experts(h), dense_w)  # (N, E, De)
        y = (z * self.readout).sum(-1) + self.readout_bias  # (N, E)
        return ModelOutput(score=(dense_w * y).sum(-1), routing=routing), y

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """Score ``(N,)`` of the selected hypothesis (the mixture while ``selected_head == -1``)."""
        out, y = self.forward_heads(x)
        sel = int(self.selected_head)
        if sel < 0:
            return out
        return ModelOutput(score=y[:, sel], routing=out.routing)

    def select(self, head: int) -> None:
        """Score with expert ``head`` from now on (``-1``: the mixture)."""
        if not -1 <= head < self.num_experts:
            raise ValueError(f"head must be in [-1, {self.num_experts - 1}], got {head}")
        self.selected_head.fill_(head)


def candidate_names(num_experts: int) -> list[str]:
    """Hypotheses in selection order: ``mixture`` (head -1) then ``e0 .. e{E-1}``."""
    return ["mixture", *(f"e{e}" for e in range(num_experts))]


def head_frame(model: DiversifiedMIGA, batch: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One day's scores of every hypothesis: ``day, ticker_id, label, mixture, e0 .. e{E-1}``."""
    out, y = model.forward_heads(batch["x"])
    f = {
        "day": np.full(batch["tickers"].numel(), int(batch["day"])),
        "ticker_id": batch["tickers"].cpu().numpy(),
        "label": batch["y_raw"].cpu().numpy(),
        "mixture": out.score.detach().float().cpu().numpy(),
    }
    for e, col in enumerate(y.detach().float().cpu().numpy().T):
        f[f"e{e}"] = col
    return pd.DataFrame(f)


def candidate_rank_ic(frame: pd.DataFrame, names: list[str]) -> dict[str, dict[str, float]]:
    """``ic_summary`` (IC, ICIR, RankIC, RankICIR) of each hypothesis column of a :func:`head_frame` table."""
    f = frame.rename(columns={"day": "date"})
    return {n: ic_summary(daily_ic(f, score=n)) for n in names}


class DiversifiedTask(FinanceTask):
    """:class:`~apps.finance.task.FinanceTask` with diversification of MIGA's experts on unlabelled days.

    Args:
        model: a :class:`DiversifiedMIGA`.
        w_div: weight of the diversification term (0 = off).
        method: ``divdis`` (pairwise mutual information + ``reg_weight`` x marginal KL) or ``dbat``.
        temperature: softness of the score -> "above the day's mean" reading.
        reg_weight: DivDis marginal-KL weight.
        w_heads: weight of the mean over experts of each expert's own task loss (DivDis: every head fits the
            labelled data).
        selection: ``mixture`` (keep MIGA's router-weighted score) or ``valid_rankic`` (after each
            validation epoch, score with the hypothesis, mixture or one expert, of best validation RankIC).
        **kwargs: :class:`FinanceTask`'s arguments (loss, balance_loss, w_balance, lr, ...).

    Logs ``train/div_loss``, ``train/heads_loss``, ``val/RankIC_<hypothesis>``, ``val/selected_head`` and
    ``val/head_mi`` (mean pairwise MI of the experts' binary reading on the validation days); ``val/IC`` etc.
    are the selected hypothesis' (what the checkpoint monitor sees).
    """

    def __init__(
        self,
        *,
        model: DiversifiedMIGA,
        w_div: float = 0.1,
        method: Method = "divdis",
        temperature: float = 1.0,
        reg_weight: float = 1.0,
        w_heads: float = 1.0,
        selection: Selection = "valid_rankic",
        **kwargs,  # noqa: ANN003 - FinanceTask's keyword arguments
    ) -> None:
        super().__init__(model=model, **kwargs)
        if not isinstance(model, DiversifiedMIGA):
            raise TypeError(
                f"DiversifiedTask needs model class_path apps.finance.diversified.DiversifiedMIGA, "
                f"got {type(model).__name__}"
            )
        if method not in get_args(Method):
            raise ValueError(f"method must be one of {get_args(Method)}, got {method!r}")
        if selection not in get_args(Selection):
            raise ValueError(f"selection must be one of {get_args(Selection)}, got {selection!r}")
        if w_div < 0 or w_heads < 0 or temperature <= 0:
            raise ValueError(f"need w_div >= 0, w_heads >= 0, temperature > 0; got {w_div}, {w_heads}, "
                             f"{temperature}")  # fmt: skip
        self.w_div, self.method, self.temperature = w_div, method, temperature
        self.reg_weight, self.w_heads, self.selection = reg_weight, w_heads, selection
        self._heads: list[pd.DataFrame] = []
        self._mi: list[float] = []

    def diversity(self, u_x: torch.Tensor) -> torch.Tensor:
        """Diversification loss of the experts' scores on one unlabelled day ``u_x (N, T, F)``."""
        _, y = self.model.forward_heads(u_x)  # (N, E)
        probs = scores_to_binary_probs(y, temperature=self.temperature)  # (N, E, 2)
        return diversification_loss(probs, method=self.method, reg_weight=self.reg_weight)

    def training_loss(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], RouterOutput | None]:
        """Total loss of one paired batch, its terms (``task``, ``heads``, ``balance``, ``div``) and the
        train day's routing.

        Args:
            batch: a train day (``x (N, T, F)``, ``y (N,)``) and, when ``w_div > 0``, an unlabelled target
                day ``u_x (N', T, F)`` (:class:`DiversifiedMarketDataModule`).
        """
        out, y = self.model.forward_heads(batch["x"])  # (N,), (N, E)
        terms = {"task": self.task_loss(out.score, batch["y"])}
        loss = terms["task"]
        if self.w_heads:
            terms["heads"] = torch.stack(
                [self.task_loss(y[:, e], batch["y"]) for e in range(y.shape[1])]
            ).mean()
            loss = loss + self.w_heads * terms["heads"]
        if out.routing is not None and self.balance_kind != "none":
            bal = switch_balance(out.routing) if self.balance_kind == "switch" else sq_balance(out.routing)
            terms["balance"] = bal
            loss = loss + self.w_balance * bal
        if self.w_div:
            if "u_x" not in batch:
                raise ValueError(
                    "w_div > 0 needs unlabelled target days in the batch (key 'u_x'): use data class_path "
                    "apps.finance.diversified.DiversifiedMarketDataModule"
                )
            terms["div"] = self.diversity(batch["u_x"])
            loss = loss + self.w_div * terms["div"]
        return loss, terms, out.routing

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, terms, routing = self.training_loss(batch)
        for k, v in terms.items():
            self.log(f"train/{k}_loss", v, batch_size=1, on_epoch=True, on_step=False)
        if routing is not None:
            self.log_routing(routing)
        self.log("train/loss", loss, batch_size=1, on_epoch=True, on_step=False, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        f = head_frame(self.model, batch)
        self._heads.append(f)
        y = torch.tensor(f[candidate_names(self.model.num_experts)[1:]].to_numpy())  # (N, E)
        if len(f) >= 2:
            probs = scores_to_binary_probs(y, temperature=self.temperature)  # (N, E, 2)
            self._mi.append(float(mutual_information_loss(probs)))

    def on_validation_epoch_end(self) -> None:
        if not self._heads:
            return
        frame, mi = pd.concat(self._heads, ignore_index=True), self._mi
        self._heads, self._mi = [], []
        names = candidate_names(self.model.num_experts)
        summ = candidate_rank_ic(frame, names)
        rank = torch.tensor([summ[n]["RankIC"] for n in names], dtype=torch.float64)
        head = select_head_by_metric(rank) - 1 if self.selection == "valid_rankic" else -1
        self.model.select(head)
        for n in names:
            self.log(f"val/RankIC_{n}", float(np.nan_to_num(summ[n]["RankIC"])))
        for k, v in summ[names[head + 1]].items():
            self.log(f"val/{k}", float(np.nan_to_num(v)), prog_bar=k in ("IC", "RankIC"))
        self.log("val/selected_head", float(head))
        self.log("val/head_mi", float(np.mean(mi)) if mi else 0.0)


class UnlabelledDays(Dataset):
    """Features-only days of the target period: item ``u_x (N, T, F)``, ``u_tickers (N,)``, ``u_day ()``.

    Built on a :class:`~apps.finance.data.DayDataset` whose label arrays are all NaN: the only arrays it holds
    are the features and the universe mask, so no label of these days can leave it.

    Args:
        x: ``(days, tickers, F)`` network inputs. present: ``(days, tickers)`` universe mask.
        days: target day indices. step_len: T.
    """

    def __init__(self, *, x: np.ndarray, present: np.ndarray, days: np.ndarray, step_len: int = 1) -> None:
        nan = np.full(present.shape, np.nan, np.float32)  # (days, tickers): no label exists here
        self.days = DayDataset(x=x, y=nan, y_raw=nan, present=present, days=days, step_len=step_len)
        if len(self.days) == 0:
            raise ValueError(f"no unlabelled day with >= 2 stocks among {len(days)} target days")

    def __len__(self) -> int:
        return len(self.days)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        b = self.days[i]
        return {"u_x": b["x"], "u_tickers": b["tickers"], "u_day": b["day"]}


class PairedDays(Dataset):
    """Each labelled day with one unlabelled target day drawn uniformly by an own RNG (seeded).

    Args:
        labelled: the train days. unlabelled: :class:`UnlabelledDays`. seed: the pairing RNG's seed.
    """

    def __init__(self, labelled: Dataset, unlabelled: UnlabelledDays, *, seed: int = 0) -> None:
        self.labelled, self.unlabelled = labelled, unlabelled
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.labelled[i], **self.unlabelled[int(self.rng.integers(len(self.unlabelled)))]}


class DiversifiedMarketDataModule(MarketDataModule):
    """:class:`~apps.finance.data.MarketDataModule` whose train batches also carry an unlabelled target day.

    Args:
        unlabelled: the target period whose features are used: ``test`` (the shift the model is scored on;
            transductive) or ``valid``.
        unlabelled_seed: seed of the pairing RNG.
        **kwargs: MarketDataModule's arguments.
    """

    def __init__(self, *, unlabelled: Unlabelled = "test", unlabelled_seed: int = 0, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        if unlabelled not in get_args(Unlabelled):
            raise ValueError(f"unlabelled must be one of {get_args(Unlabelled)}, got {unlabelled!r}")
        self.unlabelled, self.unlabelled_seed = unlabelled, unlabelled_seed

    def unlabelled_days(self) -> UnlabelledDays:
        """The target period's features (after :meth:`setup`)."""
        days = self.split.test if self.unlabelled == "test" else self.split.valid
        return UnlabelledDays(x=self.x, present=self.present, days=days, step_len=self.step_len)

    def train_dataloader(self) -> DataLoader:
        labelled = DayDataset(x=self.x, y=self.y, y_raw=self.y_raw, present=self.present,
                              days=self.split.train, step_len=self.step_len, drop_nan_label=True)  # fmt: skip
        paired = PairedDays(labelled, self.unlabelled_days(), seed=self.unlabelled_seed)
        return DataLoader(paired, batch_size=None, shuffle=True)
