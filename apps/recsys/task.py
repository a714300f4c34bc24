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

import copy
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import CatMetric, MeanMetric, SumMetric
from torchmetrics.classification import BinaryAUROC

from apps.recsys.model import BackboneFactory, HoMEBackbone, MultiTaskNet, MultiTaskOutput
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


def with_task_categories(factory: BackboneFactory, categories: list[list[int]] | None) -> BackboneFactory:
    """The backbone factory with the data's task groups as HoME's ``categories`` (when the backbone is
    :class:`~apps.recsys.model.HoMEBackbone` and its config leaves ``categories`` unset)."""
    if categories is None:
        return factory
    kw = getattr(factory, "keywords", None) or {}
    parts = (getattr(factory, "func", factory), *getattr(factory, "args", ()))
    cls = next((a for a in parts if isinstance(a, type)), None)
    if cls is None or not issubclass(cls, HoMEBackbone):
        return factory
    given = kw.get("categories")
    if given is not None:
        if [list(c) for c in given] != [list(c) for c in categories]:
            raise ValueError(
                f"backbone categories {given} differ from the data's task groups {categories}: set one "
                "of them"
            )
        return factory
    return functools.partial(factory, categories=categories)


def positive_weights(hp: Mapping) -> torch.Tensor:
    """``(M,)`` BCE ``pos_weight`` of ``pos_weighting``: 1, ``neg/pos`` or ``sqrt(neg/pos)`` of the train
    split's positive rates, capped at ``pos_weight_max``."""
    m = len(hp["task_names"])
    mode = hp.get("pos_weighting", "none")
    if mode == "none":
        return torch.ones(m)
    rates = hp.get("pos_rates")
    if rates is None or len(rates) != m:
        raise ValueError(f"pos_weighting={mode!r} needs the train positive rate of each of the {m} tasks")
    r = torch.tensor(rates, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    w = (1 - r) / r
    if mode == "sqrt_inverse":
        w = w.sqrt()
    return w.clamp(1.0, float(hp.get("pos_weight_max", 100.0))).float()


def gauc(preds: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> tuple[float, int, float]:
    """Impression-weighted group AUC (DIN, arXiv 1706.06978) over groups having both label classes.

    ``GAUC = Σ_u n_u AUC_u / Σ_u n_u`` with ``n_u`` the rows of group u; single-class groups are skipped.
    Every group's AUC at once from midranks (Mann-Whitney): ``AUC_u = (R⁺_u − P_u(P_u+1)/2) / (P_u N_u)``
    with ``R⁺_u`` the sum of the positives' ranks among the group's rows (ties share their mean rank, which
    counts a tied positive/negative pair as 1/2, as ``sklearn.metrics.roc_auc_score`` does). One sort of the
    rows instead of one sklearn call per group: KuaiRand's validation split (36.5k rows, 8 tasks) took 20 s
    with the per-group loop (the test's oracle), well under a second this way [M].

    Args:
        preds: ``(N,)`` scores.
        labels: ``(N,)`` 0/1 labels.
        groups: ``(N,)`` integer group ids (users).

    Returns:
        (gauc, groups kept, share of rows in kept groups); gauc is NaN when no group has both classes.
    """
    import numpy as np

    g = groups.cpu().numpy()
    p = preds.double().cpu().numpy()
    y = labels.cpu().numpy().astype(np.float64)
    n = len(y)
    if n == 0:
        return float("nan"), 0, 0.0
    order = np.lexsort((p, g))  # by group, then score
    g, p, y = g[order], p[order], y[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_run = new_group | np.r_[True, p[1:] != p[:-1]]  # a run: equal (group, score)
    run_id = np.cumsum(new_run) - 1
    run_start = np.flatnonzero(new_run)
    run_len = np.diff(np.r_[run_start, n])
    group_id = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    # 1-based midrank within the group: mean position of the row's run, minus the group's first position
    rank = (run_start + (run_len - 1) / 2.0)[run_id] - group_start[group_id] + 1.0
    size = np.diff(np.r_[group_start, n]).astype(np.float64)
    pos = np.bincount(group_id, weights=y)
    rank_pos = np.bincount(group_id, weights=rank * y)
    neg = size - pos
    keep = (pos > 0) & (neg > 0)
    if not keep.any():
        return float("nan"), 0, 0.0
    auc = (rank_pos[keep] - pos[keep] * (pos[keep] + 1) / 2) / (pos[keep] * neg[keep])
    den = size[keep].sum()
    return float((size[keep] * auc).sum() / den), int(keep.sum()), float(den / n)


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
        pos_weighting: positive re-weighting for sparse tasks: ``"none"``, ``"sqrt_inverse"`` (positives
            weighted by ``sqrt(neg/pos)`` of the train split) or ``"inverse"`` (``neg/pos``); capped at
            ``pos_weight_max``. Combines with ``weighting``.
        pos_weight_max: upper bound of a positive weight.
        embed_dims: per-feature embedding widths, e.g. ``{user_id: 32, tab: 4}`` (others: ``embed_dim``).
        seq_pooling: how sequence features are pooled: ``"din"`` (target attention) or ``"mean"``.
        cardinalities, num_numeric, task_names, feature_names, sequence_targets, task_categories,
            pos_rates: data facts; filled from the datamodule when None.
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
        pos_weighting: Literal["none", "sqrt_inverse", "inverse"] = "none",
        pos_weight_max: float = 100.0,
        embed_dims: dict[str, int] | None = None,
        seq_pooling: Literal["din", "mean"] = "din",
        cardinalities: list[int] | None = None,
        num_numeric: int | None = None,
        task_names: list[str] | None = None,
        feature_names: list[str] | None = None,
        sequence_targets: list[int] | None = None,
        task_categories: list[list[int]] | None = None,
        pos_rates: list[float] | None = None,
        gate_stats: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            raise ValueError(old_backbone_error(backbone))
        if not callable(backbone):
            raise TypeError(f"backbone must build a module as backbone(dim=D, num_tasks=M), got {backbone!r}")
        if weighting not in ("fixed", "uncertainty"):
            raise ValueError(f"weighting must be 'fixed' or 'uncertainty', got {weighting!r}")
        if pos_weighting not in ("none", "sqrt_inverse", "inverse"):
            raise ValueError(
                f"pos_weighting must be 'none', 'sqrt_inverse' or 'inverse', got {pos_weighting!r}"
            )
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
            backbone=with_task_categories(self.backbone_factory, hp.get("task_categories")),
            embed_dim=hp.embed_dim, tower_hidden=hp.tower_hidden, tower_dropout=hp.tower_dropout,
            embed_dims=hp.get("embed_dims"), feature_names=hp.get("feature_names"),
            sequence_targets=hp.get("sequence_targets") or (), seq_pooling=hp.get("seq_pooling", "din"),
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
        self.register_buffer("pos_weight", positive_weights(hp), persistent=False)  # (M,)
        self.metrics = nn.ModuleDict()
        for stage in ("val", "test"):
            for t in hp.task_names:
                self.metrics[f"{stage}_auc_{t}"] = BinaryAUROC(thresholds=None)
                self.metrics[f"{stage}_logloss_{t}"] = MeanMetric()
                self.metrics[f"{stage}_pos_{t}"] = SumMetric()
                self.metrics[f"{stage}_n_{t}"] = SumMetric()
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
        for name in ("feature_names", "sequence_targets", "task_categories"):
            if getattr(dm, name, None) is not None:
                facts[name] = getattr(dm, name)
        if self.hparams.pos_weighting != "none" and self.net is None:
            facts["pos_rates"] = dm.label_positive_rates()
        if self.net is None:
            self.hparams.update(facts)
            # the logged hyper-parameters (logged after setup) carry the facts too, so that a later
            # `test/predict --ckpt_path` (which reopens this MLflow run, and whose model is rebuilt with
            # them) logs the same values: MLflow refuses a changed parameter
            self._hparams_initial.update(copy.deepcopy(facts))
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
    def forward(
        self,
        cat: torch.Tensor,
        num: torch.Tensor,
        seq: torch.Tensor | None = None,
        seq_mask: torch.Tensor | None = None,
    ) -> MultiTaskOutput:
        return self.net(cat, num, seq, seq_mask)

    def _net_out(self, batch: dict) -> MultiTaskOutput:
        return self(batch["cat"], batch["num"], batch.get("seq"), batch.get("seq_mask"))

    def _check_batch(self, batch: dict) -> None:
        if "labels" in batch and batch["labels"].shape[-1] != len(self.task_names):
            raise ValueError(
                f"batch has {batch['labels'].shape[-1]} label columns, model has tasks {self.task_names}"
            )

    def task_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(M,)`` mean BCE-with-logits per task (positives weighted by ``pos_weight`` when configured)."""
        return F.binary_cross_entropy_with_logits(
            logits.float(), labels.float(), reduction="none", pos_weight=self.pos_weight
        ).mean(0)

    def combine(self, losses: torch.Tensor) -> torch.Tensor:
        if self.log_vars is not None:
            return (torch.exp(-self.log_vars) * losses + 0.5 * self.log_vars).sum()
        return (self.fixed_weights * losses).sum()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._check_batch(batch)
        out = self._net_out(batch)
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
        out = self._net_out(batch)
        probs = torch.sigmoid(out.logits.float())  # (B, M)
        y = batch["labels"]
        for k, t in enumerate(self.task_names):
            self.metrics[f"{stage}_auc_{t}"].update(probs[:, k], y[:, k].long())
            self.metrics[f"{stage}_pos_{t}"].update(y[:, k].sum())
            self.metrics[f"{stage}_n_{t}"].update(float(len(y)))
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
        """Per task AUC, logloss, positives, GAUC (+ users used); task means over the tasks whose split has
        both classes (a single-class task is left out of the means with a warning naming it)."""
        aucs, kept_tasks = {}, []
        for t in self.task_names:
            pos = float(self.metrics[f"{stage}_pos_{t}"].compute())
            n = int(self.metrics[f"{stage}_n_{t}"].compute())
            self.log(f"{stage}/positives_{t}", pos)
            self.log(f"{stage}/logloss_{t}", self.metrics[f"{stage}_logloss_{t}"].compute())
            if 0 < pos < n:
                auc = self.metrics[f"{stage}_auc_{t}"].compute()
                aucs[t] = auc
                kept_tasks.append(t)
                self.log(f"{stage}/auc_{t}", auc)
            else:
                log.warning(
                    "%s split: task %r has a single class (%d positives of %d rows): its AUC/GAUC are "
                    "undefined and it is left out of %s/auc_mean and %s/gauc_mean",
                    stage,
                    t,
                    int(pos),
                    n,
                    stage,
                    stage,
                )
            for name in ("auc", "logloss", "pos", "n"):
                self.metrics[f"{stage}_{name}_{t}"].reset()
        if aucs:
            self.log(f"{stage}/auc_mean", torch.stack(list(aucs.values())).mean(), prog_bar=True)
        else:
            self.log(f"{stage}/auc_mean", float("nan"), prog_bar=True)
        if self.metrics[f"{stage}_preds"].update_called:
            preds = self.metrics[f"{stage}_preds"].compute()
            labels = self.metrics[f"{stage}_labels"].compute()
            groups = self.metrics[f"{stage}_groups"].compute()
            gaucs = []
            for k, t in enumerate(self.task_names):
                if t not in kept_tasks:
                    continue
                g, kept, share = gauc(preds[:, k], labels[:, k], groups.long())
                self.log(f"{stage}/gauc_{t}", g)
                self.log(f"{stage}/gauc_groups_{t}", float(kept))
                self.log(f"{stage}/gauc_row_share_{t}", share)
                if kept:
                    gaucs.append(g)
            if gaucs:
                self.log(f"{stage}/gauc_mean", float(sum(gaucs) / len(gaucs)), prog_bar=True)
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
        only the inputs (``cat``, ``num``, ``seq``), so unlabelled rows work."""
        probs = torch.sigmoid(self._net_out(batch).logits.float())
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
