"""LightningModule for multi-task CTR-style training (per-task BCE; fixed or uncertainty weighting).

Uncertainty weighting: Kendall, Gal & Cipolla, arXiv 1705.07115, classification form
``exp(−s_k)·L_k + 0.5·s_k`` with ``s_k = log σ_k²`` (excluded from weight decay).

Logged names (stable; the demo and the pipelines rely on them): ``train/loss``, ``train/loss_<task>``,
``val/auc_<task>``, ``val/logloss_<task>``, ``val/auc_mean`` (the early-stopping/checkpoint monitor),
``test/auc_<task>``, ``test/logloss_<task>``, ``test/auc_mean``, ``*/gauc_<task>`` when the data have a group
column, and, per validation epoch, routing statistics named ``routing/val/<gate>/<statistic>`` like every
app's: ``weight_e<i>`` (mean combine weight per candidate expert; ``<gate>`` is the task name for the task
gates), ``weight_<group>`` (a task gate's mass per expert group, HoME), ``entropy`` (mean gate entropy,
``moe_core.stats.routing_stats``), and ``routing/val/<expert group>/zero_frac_e<i>`` (fraction of exactly-zero
expert activations: HoME's "expert collapse" symptom).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import CatMetric, MeanMetric
from torchmetrics.classification import BinaryAUROC

from apps.recsys.model import BackboneFactory, MultiTaskNet, MultiTaskOutput
from moe_core.stats import routing_stats
from moe_core.types import RouterOutput

log = logging.getLogger(__name__)

# arguments of the task before the backbone was injected -> where they live now (clear errors for old configs)
MOVED_TO_BACKBONE = (
    "expert_hidden", "expert_dropout", "num_experts", "num_levels", "num_shared", "num_specific",
    "categories", "home_levels", "num_per_category", "num_per_task", "meta_num_shared",
    "meta_num_per_category", "expert_norm", "activation", "hierarchy_mask", "feature_gate_rank", "self_gate",
    "norm",
)  # fmt: skip
RENAMED_IN_BACKBONE = {"home_levels": "levels", "expert_dropout": "dropout"}
BACKBONE_CLASSES = {
    "shared_bottom": "moe_core.multigate.SharedBottom",
    "mmoe": "moe_core.multigate.MMoE",
    "ple": "moe_core.multigate.PLE",
    "home": "apps.recsys.model.HoMEBackbone",
}


def old_backbone_error(name: str) -> str:
    """The message for the removed ``backbone: <name>`` string form."""
    cls = BACKBONE_CLASSES.get(name, "moe_core.multigate.MMoE")
    return (
        f"backbone: {name!r} is the old form: the backbone is now injected by class_path, e.g. "
        f"`backbone: {{class_path: {cls}, init_args: {{expert_hidden: [128, 64], ...}}}}` (the network "
        f"arguments that sat beside it, {', '.join(MOVED_TO_BACKBONE[:3])}, ..., go into its init_args; "
        f"home_levels -> levels, expert_dropout -> dropout); see apps/recsys/configs/*.yaml"
    )


def moved_argument_error(keys: Sequence[str]) -> str:
    """The message for task arguments that moved into the backbone's init_args."""
    old = ", ".join(f"model.init_args.{k}" for k in keys)
    new = ", ".join(f"model.init_args.backbone.init_args.{RENAMED_IN_BACKBONE.get(k, k)}" for k in keys)
    return (
        f"{old} moved into the injected backbone: write {new}, with backbone given as "
        f"{{class_path: ..., init_args: {{...}}}} (see apps/recsys/configs/*.yaml)"
    )


def gate_routing(weights: torch.Tensor) -> RouterOutput:
    """A dense multi-gate decision as a :class:`~moe_core.types.RouterOutput`: every candidate expert is a
    slot carrying its gate weight; candidates masked out of the gate (weight 0) are unused slots.

    Args:
        weights: ``(B, E)`` one task gate's combine weights.

    Returns:
        RouterOutput with ``indices (B, E) = arange(E)`` and ``mask = weights > 0``.
    """
    w = weights.detach().float()  # (B, E)
    n, e = w.shape
    return RouterOutput(
        logits=w.clamp_min(torch.finfo(w.dtype).tiny).log(),
        probs=w,
        weights=w,
        indices=torch.arange(e, device=w.device).expand(n, e),  # (B, E)
        mask=w > 0,
    )


LOGLOSS_EPS = 1e-7


def gauc(preds: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> tuple[float, int, float]:
    """Impression-weighted group AUC (DIN, arXiv 1706.06978) over groups having both label classes.

    ``GAUC = Σ_u n_u AUC_u / Σ_u n_u`` with ``n_u`` the rows of group u; single-class groups are skipped.

    Returns:
        (gauc, groups kept, share of rows in kept groups); gauc is NaN when no group has both classes.
    """
    from sklearn.metrics import roc_auc_score

    g = groups.cpu().numpy()
    p = preds.double().cpu().numpy()
    y = labels.cpu().numpy()
    order = g.argsort(kind="stable")
    g, p, y = g[order], p[order], y[order]
    bounds = (g[1:] != g[:-1]).nonzero()[0] + 1
    num, den, kept = 0.0, 0, 0
    for yy, pp in zip(_split(y, bounds), _split(p, bounds)):
        if 0 < yy.sum() < len(yy):
            num += len(yy) * roc_auc_score(yy, pp)
            den += len(yy)
            kept += 1
    return (num / den if den else float("nan")), kept, den / max(len(y), 1)


def _split(a, bounds):
    import numpy as np

    return np.split(a, bounds)


class MultiTaskRecTask(L.LightningModule):
    """Trains a :class:`~apps.recsys.model.MultiTaskNet` on multi-task binary labels.

    The network is built in ``setup()`` from the datamodule's fitted preprocessor (categorical
    cardinalities, numeric count, task names) unless they are given; they are then stored in the
    hyper-parameters, so ``load_from_checkpoint`` rebuilds the same network. The fitted preprocessor's state
    is stored in the checkpoint under ``"preprocessor"``. A task built in Python with a
    ``functools.partial`` backbone keeps the partial in its hyper-parameters, which
    ``torch.load(weights_only=True)`` refuses (a pickled callable could run code): restore such a checkpoint
    with ``load_state_dict`` into a task built the same way. Under ``moekit`` the hyper-parameters hold the
    backbone's config instead, and every checkpoint is read weights-only.

    Args:
        backbone: the multi-gate backbone, injected: ``{class_path: moe_core.multigate.MMoE, init_args:
            {num_experts: 8, expert_hidden: [128, 64]}}`` (also ``SharedBottom``, ``PLE``,
            ``apps.recsys.model.HoMEBackbone``); built as ``backbone(dim=D, num_tasks=M)`` with D the
            embedding width and M the data's task count.
        embed_dim: categorical embedding width.
        tower_hidden: per-task tower widths.
        tower_dropout: dropout inside the towers.
        lr: Adam learning rate.
        weight_decay: Adam L2 on network weights (not on the uncertainty log-variances).
        weighting: ``"fixed"`` (``task_weights``) or ``"uncertainty"`` (Kendall et al.).
        task_weights: fixed weights per task (default all 1).
        cardinalities, num_numeric, task_names: data facts; filled from the datamodule when None.
        gate_stats: log the routing statistics (``routing/...``) at each validation epoch end.
    """

    def __init__(
        self,
        *,
        backbone: BackboneFactory,
        embed_dim: int = 8,
        tower_hidden: Sequence[int] = (32,),
        tower_dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        weighting: Literal["fixed", "uncertainty"] = "fixed",
        task_weights: list[float] | None = None,
        cardinalities: list[int] | None = None,
        num_numeric: int | None = None,
        task_names: list[str] | None = None,
        gate_stats: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            raise ValueError(old_backbone_error(backbone))
        if not callable(backbone):
            raise TypeError(f"backbone must build a module as backbone(dim=D, num_tasks=M), got {backbone!r}")
        if weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"weighting must be 'fixed' or 'uncertainty', got {weighting!r}")
        self.save_hyperparameters()
        # the callable itself: under LightningCLI the hparams hold its config, not the built partial
        self.backbone_factory = backbone
        self.net: nn.Module | None = None
        self.log_vars: nn.Parameter | None = None
        self._preprocessor_state: dict | None = None
        if cardinalities is not None and num_numeric is not None and task_names is not None:
            self._build()

    # ------------------------------------------------------------------ construction
    def build_network(self) -> nn.Module:
        """The network for the stored hyper-parameters (override to plug in another network)."""
        hp = self.hparams
        return MultiTaskNet(
            cardinalities=hp.cardinalities, num_numeric=hp.num_numeric, num_tasks=len(hp.task_names),
            backbone=self.backbone_factory, embed_dim=hp.embed_dim, tower_hidden=hp.tower_hidden,
            tower_dropout=hp.tower_dropout,
        )  # fmt: skip

    def _build(self) -> None:
        hp = self.hparams
        m = len(hp.task_names)
        if hp.task_weights is not None and len(hp.task_weights) != m:
            raise ValueError(f"task_weights has {len(hp.task_weights)} entries for {m} tasks {hp.task_names}")
        self.net = self.build_network()
        if hp.weighting == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(m))
        self.register_buffer("fixed_weights", torch.tensor(hp.task_weights or [1.0] * m), persistent=False)
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            for t in hp.task_names:
                self.metrics[f"{stage}_auc_{t}"] = BinaryAUROC(thresholds=None)
                self.metrics[f"{stage}_logloss_{t}"] = MeanMetric()
            self.metrics[f"{stage}_preds"] = CatMetric()
            self.metrics[f"{stage}_labels"] = CatMetric()
            self.metrics[f"{stage}_groups"] = CatMetric()
        self._gate_sums: dict[str, torch.Tensor] = {}
        self._gate_rows = 0

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or getattr(dm, "preprocessor", None) is None:
            if self.net is None:
                raise RuntimeError(
                    "MultiTaskRecTask: give cardinalities/num_numeric/task_names or train with a datamodule "
                    "that "
                    "has a fitted preprocessor"
                )
            return
        facts = {
            "cardinalities": dm.cardinalities,
            "num_numeric": dm.num_numeric,
            "task_names": dm.task_names,
        }
        if self.net is None:
            self.hparams.update(facts)
            self._build()
        else:
            for k, v in facts.items():
                if list(self.hparams[k]) != list(v) if isinstance(v, list) else self.hparams[k] != v:
                    raise ValueError(f"model {k}={self.hparams[k]} does not match the data's {k}={v}")
        self._preprocessor_state = dm.preprocessor.state_dict()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._preprocessor_state is not None:
            checkpoint["preprocessor"] = self._preprocessor_state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._preprocessor_state = checkpoint.get("preprocessor")

    @property
    def task_names(self) -> list[str]:
        return list(self.hparams.task_names)

    # ------------------------------------------------------------------ forward / loss
    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> MultiTaskOutput:
        return self.net(cat, num)

    def _check_batch(self, batch: dict) -> None:
        if "labels" in batch and batch["labels"].shape[-1] != len(self.task_names):
            raise ValueError(
                f"batch has {batch['labels'].shape[-1]} label columns, model has tasks {self.task_names}"
            )

    def task_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(M,)`` mean BCE-with-logits per task."""
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").mean(0)

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        if self.log_vars is not None:
            return (torch.exp(-self.log_vars) * losses + 0.5 * self.log_vars).sum()
        return (self.fixed_weights * losses).sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._check_batch(batch)
        out = self(batch["cat"], batch["num"])
        losses = self.task_losses(out.logits, batch["labels"])
        loss = self.combine(losses)
        bs = len(batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, t in enumerate(self.task_names):
            self.log(f"train/loss_{t}", losses[k], batch_size=bs)
            if self.log_vars is not None:
                self.log(f"train/log_var_{t}", self.log_vars[k], batch_size=bs)
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        self._check_batch(batch)
        out = self(batch["cat"], batch["num"])
        probs = torch.sigmoid(out.logits.float())  # (B, M)
        y = batch["labels"]
        for k, t in enumerate(self.task_names):
            self.metrics[f"{stage}_auc_{t}"].update(probs[:, k], y[:, k].long())
            p = probs[:, k].double().clamp(LOGLOSS_EPS, 1 - LOGLOSS_EPS)
            self.metrics[f"{stage}_logloss_{t}"].update(
                F.binary_cross_entropy(p, y[:, k].double(), reduction="none")
            )
        if "group" in batch:
            self.metrics[f"{stage}_preds"].update(probs)
            self.metrics[f"{stage}_labels"].update(y)
            self.metrics[f"{stage}_groups"].update(batch["group"].float())
        if stage == "val" and self.hparams.gate_stats:
            self._accumulate_gate_stats(out)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _epoch_end(self, stage: str) -> None:
        aucs = []
        for t in self.task_names:
            auc = self.metrics[f"{stage}_auc_{t}"].compute()
            aucs.append(auc)
            self.log(f"{stage}/auc_{t}", auc)
            self.log(f"{stage}/logloss_{t}", self.metrics[f"{stage}_logloss_{t}"].compute())
            self.metrics[f"{stage}_auc_{t}"].reset()
            self.metrics[f"{stage}_logloss_{t}"].reset()
        self.log(f"{stage}/auc_mean", torch.stack(aucs).mean(), prog_bar=True)
        if self.metrics[f"{stage}_preds"].update_called:
            preds = self.metrics[f"{stage}_preds"].compute()
            labels = self.metrics[f"{stage}_labels"].compute()
            groups = self.metrics[f"{stage}_groups"].compute()
            for k, t in enumerate(self.task_names):
                g, kept, share = gauc(preds[:, k], labels[:, k], groups.long())
                self.log(f"{stage}/gauc_{t}", g)
                self.log(f"{stage}/gauc_groups_{t}", float(kept))
                self.log(f"{stage}/gauc_row_share_{t}", share)
        for s in ("preds", "labels", "groups"):
            self.metrics[f"{stage}_{s}"].reset()

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")
        if self.hparams.gate_stats and self._gate_rows:
            for name, val in self._gate_stats().items():
                self.log(name, val)
        self._gate_sums, self._gate_rows = {}, 0

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per-task probabilities ``{task: (B,)}`` (``moekit recsys predict`` writes them as columns); reads
        only ``cat`` and ``num``, so unlabelled rows work."""
        probs = torch.sigmoid(self(batch["cat"], batch["num"]).logits.float())
        return {t: probs[:, k] for k, t in enumerate(self.task_names)}

    # ------------------------------------------------------------------ routing statistics
    @torch.no_grad()
    def _accumulate_gate_stats(self, out: MultiTaskOutput) -> None:
        b = out.logits.shape[0]
        for name, w in out.gates.items():
            routing = gate_routing(w)
            self._add(f"w:{name}", routing.dense_weights().sum(0))  # (E,)
            self._add(f"h:{name}", routing_stats(routing)["entropy"] * b)
        for name, e in out.expert_outputs.items():
            self._add(f"z:{name}", (e == 0).float().mean(-1).sum(0))  # (E_group,)
        self._gate_rows += b

    def _add(self, key: str, value: torch.Tensor) -> None:
        self._gate_sums[key] = self._gate_sums.get(key, 0) + value

    def _gate_stats(self) -> dict[str, float]:
        """Epoch means: weight per (gate, candidate expert) and per expert group, gate entropy, and the
        zero-activation fraction per expert."""
        stats: dict[str, float] = {}
        names = self.task_names
        backbone = getattr(self.net, "backbone", None)
        groups = backbone.expert_groups() if hasattr(backbone, "expert_groups") else None
        for key, s in self._gate_sums.items():
            mean = (s / self._gate_rows).tolist()
            kind, name = key.split(":", 1)
            label = names[int(name[4:])] if name.startswith("task") and name[4:].isdigit() else name
            if kind == "h":
                stats[f"routing/val/{label}/entropy"] = mean
            elif kind == "w":
                for i, v in enumerate(mean):
                    stats[f"routing/val/{label}/weight_e{i}"] = v
                if groups and name.startswith("task"):
                    start = 0
                    for gname, n in groups:
                        stats[f"routing/val/{label}/weight_{gname}"] = float(sum(mean[start : start + n]))
                        start += n
            else:
                for i, v in enumerate(mean):
                    stats[f"routing/val/{name}/zero_frac_e{i}"] = v
        return stats

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay = [p for n, p in self.named_parameters() if n != "log_vars"]
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay}]
        if self.log_vars is not None:
            groups.append({"params": [self.log_vars], "weight_decay": 0.0})
        return torch.optim.Adam(groups, lr=self.hparams.lr)
