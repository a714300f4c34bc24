"""KuaiRand-Pure multi-task benchmark (issue 15): moekit Shared-Bottom / MMoE / PLE / HoME and HoME ablations
vs torch-rechub 0.9.0 MMoE / PLE (same features) vs LightGBM per task, on SOURCE.txt's date split.

HoME: Wang et al., arXiv 2408.05430. Data: KuaiRand (Gao et al., arXiv 2208.08696), see
``apps/recsys/kuairand.py``. Every network (moekit and torch-rechub) is trained by the same plain loop here
(Adam, fixed epochs, per-task mean BCE summed, the epoch with the best validation mean GAUC -- the headline
metric -- tested), on the same tensors. torch-rechub cannot pool a sequence by target attention: it gets the
watch history mean-pooled (its ``SequenceFeature(pooling="mean")`` sharing the video-id table); the moekit
models pool it with DIN attention as their configs say, and the speed comparison also runs moekit with mean
pooling.

Usage: ``python benchmarks/recsys_kuairand.py [--seeds 0 1 2] [--epochs 3] [--models home mmoe ...]``
Writes ``benchmarks/results/recsys_kuairand.json`` (rewritten after every run) and ``recsys_kuairand.png``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from apps.recsys.kuairand import KuaiRandDataModule
from apps.recsys.model import HoMEBackbone, MultiTaskNet, MultiTaskOutput
from apps.recsys.task import gauc, with_task_categories
from moe_core.multigate import PLE, MMoE, SharedBottom

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "apps" / "recsys" / "configs"
BACKBONES = {
    "moe_core.multigate.MMoE": MMoE,
    "moe_core.multigate.PLE": PLE,
    "moe_core.multigate.SharedBottom": SharedBottom,
    "apps.recsys.model.HoMEBackbone": HoMEBackbone,
}
ABLATIONS = {  # HoME with one mechanism removed
    "home_no_norm_swish": {"expert_norm": "none", "activation": "relu"},
    "home_no_mask": {"hierarchy_mask": False},
    "home_no_feature_gate": {"feature_gate_rank": None},
    "home_no_self_gate": {"self_gate": False},
    "home_bn_every_layer": {"expert_norm_layers": "all"},  # moekit's earlier reading of the expert norm
    # the other open reading of the self-gate: task experts only through the self-gate residual
    "home_self_gate_only_specific": {"self_gate_only_specific": True},
}
MOEKIT = ("shared_bottom", "mmoe", "ple", "home", *ABLATIONS)
RECHUB = ("rechub_mmoe", "rechub_ple")
SPARSE_INTERACTION = ("is_like", "is_follow", "is_comment", "is_forward", "is_profile_enter")


def config(name: str) -> dict:
    base = "home" if name.startswith("home") else name.replace("rechub_", "")
    return yaml.safe_load((CONFIGS / f"kuairand_{base}.yaml").read_text())["model"]["init_args"]


def moekit_net(name: str, dm: KuaiRandDataModule, *, seq_pooling: str | None = None) -> nn.Module:
    margs = config(name)
    bb = margs["backbone"]
    kw = dict(bb.get("init_args") or {})
    kw.update(ABLATIONS.get(name, {}))
    factory = with_task_categories(partial(BACKBONES[bb["class_path"]], **kw), dm.task_categories)
    return MultiTaskNet(
        cardinalities=dm.cardinalities, num_numeric=dm.num_numeric, num_tasks=len(dm.task_names),
        backbone=factory, embed_dim=margs["embed_dim"], embed_dims=margs.get("embed_dims"),
        feature_names=dm.feature_names, sequence_targets=dm.sequence_targets,
        seq_pooling=seq_pooling or margs.get("seq_pooling", "din"), tower_hidden=margs["tower_hidden"],
    )  # fmt: skip


class RechubNet(nn.Module):
    """torch-rechub MMOE/PLE on the same inputs: the same categorical columns and widths, the numeric columns,
    the watch history mean-pooled through the video-id table; its sigmoid outputs turned back into logits."""

    def __init__(self, kind: str, dm: KuaiRandDataModule) -> None:
        super().__init__()
        from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
        from torch_rechub.models.multi_task import MMOE, PLE

        margs = config(kind)
        bb = margs["backbone"]["init_args"]
        widths = margs.get("embed_dims") or {}
        if len({widths.get(n, margs["embed_dim"]) for n in dm.feature_names}) > 1:
            raise ValueError(
                "torch-rechub's MMOE/PLE concatenate equal-width embeddings only: drop embed_dims"
            )
        names, cards = dm.feature_names, dm.cardinalities
        self.target = dm.sequence_targets[0] if dm.sequence_targets else None
        self.pad = cards[self.target] if self.target is not None else None  # an extra row: padding
        feats = [
            SparseFeature(
                f"c{j}",
                vocab_size=c + (1 if j == self.target else 0),
                embed_dim=widths.get(n, margs["embed_dim"]),
            )
            for j, (n, c) in enumerate(zip(names, cards, strict=True))
        ]
        feats += [DenseFeature(f"n{j}") for j in range(dm.num_numeric)]
        if self.target is not None:
            feats.append(
                SequenceFeature(
                    "hist", vocab_size=self.pad + 1, pooling="mean",
                    embed_dim=widths.get(names[self.target], margs["embed_dim"]),
                    shared_with=f"c{self.target}", padding_idx=self.pad,
                )
            )  # fmt: skip
        types = ["classification"] * len(dm.task_names)
        expert = {"dims": list(bb["expert_hidden"])}
        towers = [{"dims": list(margs["tower_hidden"])} for _ in types]
        if kind == "rechub_mmoe":
            self.net = MMOE(
                feats, types, n_expert=bb["num_experts"], expert_params=expert, tower_params_list=towers
            )
        else:
            self.net = PLE(
                feats, types, n_level=bb["num_levels"], n_expert_specific=bb["num_specific"],
                n_expert_shared=bb["num_shared"], expert_params=expert, tower_params_list=towers,
            )  # fmt: skip

    def forward(self, cat, num, seq=None, seq_mask=None) -> MultiTaskOutput:  # noqa: ANN001
        x = {f"c{j}": cat[:, j] for j in range(cat.shape[1])}
        x.update({f"n{j}": num[:, j] for j in range(num.shape[1])})
        if self.target is not None:
            x["hist"] = torch.where(seq_mask[:, 0], seq[:, 0], torch.full_like(seq[:, 0], self.pad))
        p = self.net(x).float().clamp(1e-7, 1 - 1e-7)  # (B, M) probabilities from rechub's PredictionLayer
        return MultiTaskOutput(torch.logit(p))


def build(name: str, dm: KuaiRandDataModule) -> nn.Module:
    return RechubNet(name, dm) if name in RECHUB else moekit_net(name, dm)


@torch.no_grad()
def predict(net: nn.Module, split: dict, bs: int = 8192) -> np.ndarray:
    net.eval()
    out = []
    for i in range(0, len(split["cat"]), bs):
        sl = {k: v[i : i + bs] for k, v in split.items()}
        out.append(torch.sigmoid(net(sl["cat"], sl["num"], sl.get("seq"), sl.get("seq_mask")).logits.float()))
    return torch.cat(out).numpy()


def metrics(probs: np.ndarray, split: dict, tasks: list[str], *, with_gauc: bool = True) -> dict:
    """Per-task AUC, GAUC (optional: one sklearn call per user), logloss, positives; means over the tasks
    whose split has both classes."""
    y = split["labels"].numpy()
    groups = split["group"]
    per, aucs, gaucs = {}, [], []
    for k, t in enumerate(tasks):
        pos = int(y[:, k].sum())
        row = {"positives": pos, "logloss": float(log_loss(y[:, k], np.clip(probs[:, k], 1e-7, 1 - 1e-7)))}
        if 0 < pos < len(y):
            row["auc"] = float(roc_auc_score(y[:, k], probs[:, k]))
            aucs.append(row["auc"])
            if not with_gauc:
                continue
            g, kept, share = gauc(torch.from_numpy(probs[:, k]), torch.from_numpy(y[:, k]), groups)
            row.update(gauc=float(g), gauc_users=int(kept), gauc_row_share=float(share))
            if kept:
                gaucs.append(row["gauc"])
        per[t] = row
    return {
        "per_task": per, "auc_mean": float(np.mean(aucs)),
        "gauc_mean": float(np.mean(gaucs)) if gaucs else float("nan"),
    }  # fmt: skip


def fit_run(
    name: str,
    seed: int,
    dm: KuaiRandDataModule,
    epochs: int,
    lr: float,
    bs: int,
    *,
    keep_states: bool = False,
) -> tuple[nn.Module, dict]:
    """Train ``name`` for ``epochs`` with the plain loop; return the network at its best-validation epoch
    (mean GAUC) and the run's record (no test metric: the selection reads this alone). The record also names
    the best epoch by validation mean AUC; with ``keep_states`` it holds both epochs' weights under
    ``_states`` (``{"gauc_mean": ..., "auc_mean": ...}``)."""
    torch.manual_seed(seed)
    net = build(name, dm)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    tr = dm.splits["train"]
    n = len(tr["cat"])
    g = torch.Generator().manual_seed(seed)
    best, best_state, secs, seen, best_epoch, history = -1.0, None, 0.0, 0, 0, []
    best_auc, best_auc_epoch, states = -1.0, 0, {}
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=g)
        t0 = time.perf_counter()
        loss_sum = 0.0
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            b = {k: v[idx] for k, v in tr.items()}
            out = net(b["cat"], b["num"], b.get("seq"), b.get("seq_mask"))
            loss = (
                F.binary_cross_entropy_with_logits(out.logits.float(), b["labels"], reduction="none")
                .mean(0)
                .sum()
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
        secs += time.perf_counter() - t0
        val = metrics(predict(net, dm.splits["val"]), dm.splits["val"], dm.task_names)
        val_loss = float(np.mean([val["per_task"][t]["logloss"] for t in dm.task_names]))
        history.append({
            "epoch": epoch, "val_auc_mean": val["auc_mean"], "val_gauc_mean": val["gauc_mean"],
            "val_logloss_mean": val_loss, "train_loss_mean_per_task": loss_sum / n / len(dm.task_names),
        })  # fmt: skip
        print(f"  {name} lr {lr:g} seed {seed} epoch {epoch}: val auc_mean {val['auc_mean']:.4f} gauc_mean "
              f"{val['gauc_mean']:.4f} logloss {val_loss:.4f}", flush=True)  # fmt: skip
        if val["gauc_mean"] > best:  # model selection on the headline metric, for every model alike
            best, best_state, best_epoch = val["gauc_mean"], copy.deepcopy(net.state_dict()), epoch
        if val["auc_mean"] > best_auc:  # the secondary rule (see select_and_test)
            best_auc, best_auc_epoch = val["auc_mean"], epoch
            states["auc_mean"] = copy.deepcopy(net.state_dict())
    states["gauc_mean"] = best_state
    net.load_state_dict(best_state)
    row = {
        "model": name, "impl": "torch-rechub" if name in RECHUB else "moekit", "seed": seed, "lr": lr,
        "epochs": epochs, "best_val_gauc_mean": best, "best_epoch": best_epoch, "best_val_auc_mean": best_auc,
        "best_epoch_by_val_auc_mean": best_auc_epoch, "val_history": history,
        "train_samples_per_s": seen / secs, "params": sum(p.numel() for p in net.parameters()),
    }  # fmt: skip
    if keep_states:
        row["_states"] = states  # popped by select_and_test, never written
    return net, row


def test_row(net: nn.Module, row: dict, dm: KuaiRandDataModule, *, diagnose: bool = False) -> dict:
    """``row`` completed with the test metrics of ``net`` (and the expert diagnostics when asked)."""
    test = metrics(predict(net, dm.splits["test"]), dm.splits["test"], dm.task_names)
    row = {**row, **{f"test_{k}": v for k, v in test.items()}}
    if diagnose:
        row["diagnostics"] = diagnostics(net, dm)
    return row


def train_run(name: str, seed: int, dm: KuaiRandDataModule, epochs: int, lr: float, bs: int) -> dict:
    net, row = fit_run(name, seed, dm, epochs, lr, bs)
    return test_row(net, row, dm, diagnose=seed == 0 and name in ("mmoe", "home"))


def parse_select(spec: str) -> list[float]:
    """``"lr=1e-3,2e-3"`` -> the candidate learning rates (the only selectable setting)."""
    key, _, values = spec.partition("=")
    if key.strip() != "lr" or not values:
        raise ValueError(f"--select takes lr=<comma-separated values>, got {spec!r}")
    try:
        lrs = [float(x) for x in values.split(",")]
    except ValueError as e:
        raise ValueError(f"--select: every lr must be a number, got {values!r}") from e
    if not lrs or any(v <= 0 for v in lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"--select: learning rates must be positive and distinct, got {lrs}")
    return lrs


RULES = {"gauc_mean": "_tuned", "auc_mean": "_tuned_aucsel"}  # validation metric -> row suffix


def choose(cands: list[dict]) -> dict:
    """A model's selection record: its candidates and, per rule, the lr with the best validation score."""
    rec: dict = {"candidates": cands}
    for rule in RULES:
        chosen = max(cands, key=lambda c, r=rule: c[f"val_{r}"])
        rec[f"chosen_lr_by_val_{rule}"], rec[f"chosen_val_{rule}"] = chosen["lr"], chosen[f"val_{rule}"]
    return rec


def select_and_test(
    models: list[str],
    lrs: list[float],
    *,
    select_seeds: list[int],
    test_seeds: list[int],
    epochs: int,
    bs: int,
    dm: KuaiRandDataModule,
    on_update,  # noqa: ANN001 (callback(selection, rows))
) -> tuple[dict, list[dict]]:
    """Equal-budget selection on validation, then the chosen setting on the test seeds.

    Every model trains every candidate lr for ``epochs`` epochs on each of ``select_seeds``. Rule
    ``gauc_mean`` (the headline): a run keeps its best-validation epoch by mean GAUC (the existing rule), a
    candidate scores the mean of its runs' best validation mean GAUC, the best candidate is chosen, and its
    test rows are ``<model>_tuned``. Rule ``auc_mean`` (declared before any test number was seen, because the
    validation mean GAUC averages three tasks with ~15-50 scored users each): the same with the validation
    mean AUC (every row scored), rows ``<model>_tuned_aucsel``. Both rules read the same training runs. No
    test metric is computed before the choice; only the chosen settings' networks are ever tested. A test
    seed that was also a selection seed reuses that run (same seed and setting: the same network); the
    others train once per chosen lr.
    """
    selection: dict = {}
    kept: dict[tuple[str, float, int], dict] = {}
    for name in models:
        cands = []
        for lr in lrs:
            runs = []
            for seed in select_seeds:
                t0 = time.perf_counter()
                _, row = fit_run(name, seed, dm, epochs, lr, bs, keep_states=True)
                row["wall_s"] = time.perf_counter() - t0
                kept[(name, lr, seed)] = row
                runs.append({
                    k: row[k] for k in ("seed", "best_val_gauc_mean", "best_epoch", "best_val_auc_mean",
                                        "best_epoch_by_val_auc_mean", "val_history")
                })  # fmt: skip
            cand = {"lr": lr, "runs": runs}
            for rule in RULES:
                cand[f"val_{rule}"] = float(np.mean([r[f"best_val_{rule}"] for r in runs]))
            cands.append(cand)
            print(f"select {name} lr {lr:g}: mean best valid gauc_mean {cand['val_gauc_mean']:.4f}, "
                  f"auc_mean {cand['val_auc_mean']:.4f}", flush=True)  # fmt: skip
        selection[name] = choose(cands)
        chosen_lrs = {selection[name][f"chosen_lr_by_val_{rule}"] for rule in RULES}
        for key in [k for k in kept if k[0] == name and k[1] not in chosen_lrs]:
            del kept[key]  # only the chosen settings' networks are ever tested
        on_update(selection, [])
    rows: list[dict] = []
    for seed in test_seeds:  # seed-major: a run cut short still has whole comparisons
        for name in models:
            for rule, suffix in RULES.items():
                lr = selection[name][f"chosen_lr_by_val_{rule}"]
                if (name, lr, seed) not in kept:
                    t0 = time.perf_counter()
                    _, run = fit_run(name, seed, dm, epochs, lr, bs, keep_states=True)
                    run["wall_s"] = time.perf_counter() - t0
                    kept[(name, lr, seed)] = run
                run = {k: v for k, v in kept[(name, lr, seed)].items() if k != "_states"}
                net = build(name, dm)
                net.load_state_dict(kept[(name, lr, seed)]["_states"][rule])
                run.update(model=f"{name}{suffix}", selection_rule=f"val_{rule}")
                if rule == "auc_mean":  # this row's epoch
                    run["best_epoch"] = run["best_epoch_by_val_auc_mean"]
                row = test_row(net, run, dm)
                rows.append(row)
                msg = f"auc_mean {row['test_auc_mean']:.4f} gauc_mean {row['test_gauc_mean']:.4f}"
                print(
                    f"{name}{suffix} (lr {lr:g}, epoch {row['best_epoch']}) seed {seed}: test {msg}",
                    flush=True,
                )
            on_update(selection, rows)
        for key in [k for k in kept if k[2] == seed]:
            del kept[key]
    return selection, rows


def diagnostics(net: MultiTaskNet, dm: KuaiRandDataModule, rows: int = 8192) -> dict:
    """HoME's evidence of expert collapse/degradation on test rows: per expert the share of exactly-zero
    activations (ReLU dead units; Swish is never exactly 0) and each task gate's mean weight per expert."""
    net.eval()
    s = {k: v[:rows] for k, v in dm.splits["test"].items()}
    out = net(s["cat"], s["num"], s.get("seq"), s.get("seq_mask"))
    zero = {grp: (e == 0).float().mean((0, 2)).tolist() for grp, e in out.expert_outputs.items()}  # (E,)
    gates = {}
    for k, t in enumerate(dm.task_names):
        gates[t] = out.gates[f"task{k}"].float().mean(0).tolist()  # (E_candidates,)
    return {"zero_activation_share": zero, "task_gate_mean_weight": gates}


def run_lightgbm(dm: KuaiRandDataModule, seed: int) -> dict:
    import lightgbm as lgb

    def mat(s: str) -> np.ndarray:
        x = [dm.splits[s]["cat"].numpy().astype(np.float64), dm.splits[s]["num"].numpy()]
        if "seq_mask" in dm.splits[s]:  # the history length (the model's seq features are ids)
            x.append(dm.splits[s]["seq_mask"].sum(-1).numpy().astype(np.float64))
        return np.concatenate(x, axis=1)

    xtr, xva, xte = mat("train"), mat("val"), mat("test")
    n_cat = dm.splits["train"]["cat"].shape[1]
    probs = np.zeros((len(xte), len(dm.task_names)))
    secs = 0.0
    for k, _ in enumerate(dm.task_names):
        clf = lgb.LGBMClassifier(
            n_estimators=300, learning_rate=0.05, num_leaves=63, random_state=seed, verbose=-1, n_jobs=1,
            subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
        )  # fmt: skip
        t0 = time.perf_counter()
        clf.fit(
            xtr, dm.splits["train"]["labels"][:, k].numpy(), categorical_feature=list(range(n_cat)),
            eval_set=[(xva, dm.splits["val"]["labels"][:, k].numpy())],
            callbacks=[lgb.early_stopping(30, verbose=False)],
        )  # fmt: skip
        secs += time.perf_counter() - t0
        probs[:, k] = clf.predict_proba(xte)[:, 1]
    test = metrics(probs.astype(np.float32), dm.splits["test"], dm.task_names)
    return {
        "model": "lightgbm", "impl": "lightgbm", "seed": seed, "params": None,
        "train_samples_per_s": len(xtr) * len(dm.task_names) / secs,
        **{f"test_{k}": v for k, v in test.items()},
    }  # fmt: skip


def interleaved_speed(dm: KuaiRandDataModule, *, bs: int, blocks: int = 5, steps: int = 4) -> list[dict]:
    """Train-step throughput (forward, backward, Adam) of the networks alone on the same batch, interleaved in
    one process so that load from other jobs hits every model alike; median over blocks."""
    tr = dm.splits["train"]
    b = {k: v[:bs] for k, v in tr.items()}
    nets = {
        "mmoe (din)": moekit_net("mmoe", dm), "mmoe (mean)": moekit_net("mmoe", dm, seq_pooling="mean"),
        "ple (din)": moekit_net("ple", dm), "ple (mean)": moekit_net("ple", dm, seq_pooling="mean"),
        "rechub_mmoe (mean)": RechubNet("rechub_mmoe", dm), "rechub_ple (mean)": RechubNet("rechub_ple", dm),
    }  # fmt: skip
    opts = {k: torch.optim.Adam(n.parameters(), lr=1e-3) for k, n in nets.items()}
    rates: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(blocks):
        for k, net in nets.items():
            net.train()
            t0 = time.perf_counter()
            for _ in range(steps):
                out = net(b["cat"], b["num"], b.get("seq"), b.get("seq_mask"))
                loss = F.binary_cross_entropy_with_logits(out.logits.float(), b["labels"])
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                opts[k].step()
            rates[k].append(steps * bs / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return [{"model": k, "samples_per_s_median": v, "samples_per_s_blocks": rates[k]} for k, v in med.items()]


def merge_selections(selections: list[dict], rows: list[dict]) -> dict:
    """The candidates of several ``--select`` records (a later candidate of the same model and lr replaces an
    earlier one), the choice per rule made again over all of them, and a check that every ``_tuned`` row
    was trained with its model's chosen lr (a stale row would otherwise be averaged in silently)."""
    cands: dict[str, dict[float, dict]] = {}
    for sel in selections:
        for model, rec in sel.items():
            cands.setdefault(model, {}).update({c["lr"]: c for c in rec["candidates"]})
    out = {}
    for model, by_lr in cands.items():
        out[model] = choose([by_lr[lr] for lr in sorted(by_lr)])
    for r in rows:
        for rule, suffix in RULES.items():
            base = r["model"][: -len(suffix)] if r["model"].endswith(suffix) else None
            want = out[base][f"chosen_lr_by_val_{rule}"] if base in out else None
            if want is not None and r["lr"] != want:
                raise ValueError(
                    f"row {r['model']} seed {r['seed']} was trained with lr {r['lr']:g}, but the merged "
                    f"selection chooses lr {want:g} for {base} by val {rule}: merge the run of the chosen lr "
                    "after it"
                )
    return out


def summarise(rows: list[dict], tasks: list[str]) -> list[dict]:
    out = []
    for model, impl in dict.fromkeys((r["model"], r["impl"]) for r in rows):
        rs = [r for r in rows if r["model"] == model and r["impl"] == impl]
        g = [r["test_gauc_mean"] for r in rs]
        a = [r["test_auc_mean"] for r in rs]
        per = {}
        for t in tasks:
            au = [r["test_per_task"][t].get("auc", np.nan) for r in rs]
            ga = [r["test_per_task"][t].get("gauc", np.nan) for r in rs]
            per[t] = {
                "auc": float(np.mean(au)), "auc_std": float(np.std(au)), "gauc": float(np.mean(ga)),
                "gauc_std": float(np.std(ga)), "positives": rs[0]["test_per_task"][t]["positives"],
            }  # fmt: skip
        out.append({
            "model": model, "impl": impl, "n_seeds": len(rs), "gauc_mean": float(np.mean(g)),
            "gauc_mean_std": float(np.std(g)), "auc_mean": float(np.mean(a)),
            "auc_mean_std": float(np.std(a)),
            "train_samples_per_s": float(np.median([r["train_samples_per_s"] for r in rs])),
            "params": rs[0]["params"], "per_task": per,
        })  # fmt: skip
    return out


def paired(rows: list[dict], suffix: str = "") -> dict:
    """Per seed, HoME's test mean GAUC minus MMoE's and PLE's (rows ``home<suffix>`` etc.; a seed fixes the
    initialisation order and the data order of every model alike): the differences, their mean and std
    (population, like the summary's), over the seeds that every compared model has."""
    by = {(r["model"], r["seed"]): r["test_gauc_mean"] for r in rows if r["impl"] == "moekit"}
    out = {}
    for other in ("mmoe", "ple"):
        seeds = sorted(s for (m, s) in by if m == f"home{suffix}" and (f"{other}{suffix}", s) in by)
        if not seeds:
            continue
        d = [by[(f"home{suffix}", s)] - by[(f"{other}{suffix}", s)] for s in seeds]
        out[f"home{suffix}_minus_{other}{suffix}"] = {
            "seeds": seeds, "diffs": d, "mean": float(np.mean(d)), "std": float(np.std(d)),
            "wins": int(sum(x > 0 for x in d)),
        }  # fmt: skip
    return out


def targets(summary: list[dict], speed: list[dict], rows: list[dict] | None = None) -> dict:
    """The issue's targets read off the summary: HoME's mean-GAUC rank and margins over MMoE/PLE against the
    seed std (for the default rows and, when present, the ``_tuned`` rows), its per-task GAUC gain over the
    mean of MMoE and PLE by task kind, the per-seed paired differences (with ``rows``), and the speed
    ratios."""
    s = {(r["model"], r["impl"]): r for r in summary}
    out: dict = {}
    if rows is not None:
        out["paired_test_gauc_mean"] = {
            k: v for x in ("", *RULES.values()) for k, v in paired(rows, x).items()
        }
    for x in RULES.values():
        tuned = s.get((f"home{x}", "moekit"))
        for other in (f"mmoe{x}", f"ple{x}"):
            o = s.get((other, "moekit"))
            if tuned is not None and o is not None:
                std = max(tuned["gauc_mean_std"], o["gauc_mean_std"])
                out[f"home{x}_minus_{other}_gauc_mean"] = tuned["gauc_mean"] - o["gauc_mean"]
                out[f"home{x}_beats_{other}_by_more_than_std"] = tuned["gauc_mean"] - o["gauc_mean"] > std
    home = s.get(("home", "moekit"))
    if home is not None:
        main = [r for r in summary if r["model"] not in ABLATIONS]
        ranked = sorted(main, key=lambda r: -r["gauc_mean"])
        out["gauc_mean_ranking"] = [f"{r['model']} ({r['impl']})" for r in ranked]
        out["home_best_gauc_mean"] = ranked[0] is home
        for x in RULES.values():
            if (f"home{x}", "moekit") in s:
                out[f"home{x}_best_gauc_mean"] = ranked[0] is s[(f"home{x}", "moekit")]
        for other in ("mmoe", "ple"):
            o = s.get((other, "moekit"))
            if o is not None:
                std = max(home["gauc_mean_std"], o["gauc_mean_std"])
                out[f"home_minus_{other}_gauc_mean"] = home["gauc_mean"] - o["gauc_mean"]
                out[f"home_beats_{other}_by_more_than_std"] = home["gauc_mean"] - o["gauc_mean"] > std
        refs = [s[(m, "moekit")] for m in ("mmoe", "ple") if (m, "moekit") in s]
        if refs:
            gain = {
                t: home["per_task"][t]["gauc"] - float(np.mean([r["per_task"][t]["gauc"] for r in refs]))
                for t in home["per_task"]
            }
            dense = [t for t in gain if t not in SPARSE_INTERACTION]
            out["home_gauc_gain_vs_mean_of_mmoe_ple"] = gain
            out["home_gauc_gain_sparse_interaction_mean"] = float(
                np.mean([gain[t] for t in SPARSE_INTERACTION])
            )
            out["home_gauc_gain_other_tasks_mean"] = float(np.mean([gain[t] for t in dense]))
    out.update(speed_ratios(speed))
    return out


def speed_ratios(speed: list[dict]) -> dict:
    """moekit / torch-rechub samples/s with the same (mean) pooling: the ratio of the medians, and the median
    and quartiles of the per-block ratios (the two networks of a block run seconds apart, so a load spike
    from other jobs hits both; on a busy machine single blocks ranged 1.5k-23k samples/s)."""
    by = {r["model"]: r for r in speed}
    out = {}
    for m in ("mmoe", "ple"):
        a, b = by.get(f"{m} (mean)"), by.get(f"rechub_{m} (mean)")
        if a is None or b is None:
            continue
        per_block = np.array(a["samples_per_s_blocks"]) / np.array(b["samples_per_s_blocks"])
        out[f"{m}_speed_ratio_vs_rechub_same_pooling"] = a["samples_per_s_median"] / b["samples_per_s_median"]
        out[f"{m}_speed_ratio_per_block_median"] = float(np.median(per_block))
        out[f"{m}_speed_ratio_per_block_quartiles"] = [float(q) for q in np.quantile(per_block, [0.25, 0.75])]
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diag = {r["model"]: r["diagnostics"] for r in rows if "diagnostics" in r}
    if not diag:
        return
    fig, axes = plt.subplots(1, 1 + len(diag), figsize=(5 + 5 * len(diag), 4.2))
    ax = axes[0]
    x0 = 0
    for m, d in diag.items():
        vals = [v for grp in d["zero_activation_share"].values() for v in grp]
        labels = [f"{grp}{i}" for grp, v in d["zero_activation_share"].items() for i in range(len(v))]
        ax.bar(np.arange(x0, x0 + len(vals)), vals, label=m)
        for i, lab in enumerate(labels):
            ax.text(x0 + i, 0.01, lab, rotation=90, fontsize=6, ha="center", va="bottom")
        x0 += len(vals) + 1
    ax.set_ylabel("share of exactly-zero expert activations")
    ax.set_title("expert collapse (test rows; Swish is never exactly 0)", fontsize=9)
    ax.legend()
    for ax, (m, d) in zip(axes[1:], diag.items(), strict=True):
        w = np.array(list(d["task_gate_mean_weight"].values()))
        im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(w)), list(d["task_gate_mean_weight"]), fontsize=7)
        ax.set_xlabel("candidate expert (gate order)")
        ax.set_title(f"{m}: mean task-gate weight")
        fig.colorbar(im, ax=ax)
    fig.suptitle("KuaiRand-Pure: MMoE vs HoME expert diagnostics (seed 0)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument(
        "--models", nargs="+",
        default=["home", "mmoe", "ple", "shared_bottom", *RECHUB, "lightgbm", *ABLATIONS],
    )  # fmt: skip
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "recsys_kuairand.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the plot from the results JSON")
    ap.add_argument(
        "--speed-only", action="store_true",
        help="only re-measure the interleaved speed rows and merge them into the existing results JSON "
        "(quality rows, summary and meta untouched; the run is described under meta.speed)",
    )  # fmt: skip
    ap.add_argument(
        "--select", metavar="lr=V1,V2,...",
        help="equal-budget selection on validation for --models (mmoe ple home): every model trains every "
        "candidate lr for --max-epochs on each --select-seeds, the lr with the best mean validation "
        "mean GAUC (each run at its best-validation epoch) is chosen, then tested on --seeds as rows "
        "<model>_tuned",
    )  # fmt: skip
    ap.add_argument("--max-epochs", type=int, default=5, help="epochs of every --select run")
    ap.add_argument("--select-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--select-only", action="store_true",
        help="with --select: record the candidates' validation scores and the choice, test nothing",
    )  # fmt: skip
    ap.add_argument("--speed-blocks", type=int, default=5, help="interleaved blocks of the speed comparison")
    ap.add_argument(
        "--merge", nargs="+", metavar="JSON",
        help="only merge the rows of earlier runs (e.g. seeds 0-2 and 3-4, run one after the other) into "
        "--out: summary, targets and plot recomputed; meta from the first file, speed rows from the last",
    )  # fmt: skip
    args = ap.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        timed = [p for p in parts if p["speed"]] or parts  # a --select run measures no speed rows
        by_key: dict = {}  # a later run's row replaces an earlier one of the same model, impl and seed
        for p in parts:
            by_key.update({(r["model"], r["impl"], r["seed"]): r for r in p["rows"]})
        payload = {**parts[0], "rows": list(by_key.values()), "speed": timed[-1]["speed"]}
        tasks = list(payload["rows"][0]["test_per_task"])
        payload["meta"]["speed"] = {
            **timed[-1]["meta"].get("speed", {}), "commit": timed[-1]["meta"]["commit"],
            "date": timed[-1]["meta"]["date"], "from": "the last merged run with speed rows",
        }  # fmt: skip
        merged: list[dict] = []
        for p in parts:  # an already merged file contributes the runs it was merged from
            merged += p["meta"].get("merged_from") or [
                {"commit": p["meta"]["commit"], "date": p["meta"]["date"], "protocol": p["meta"]["protocol"]}
            ]
        payload["meta"]["merged_from"] = merged
        for p in parts[1:]:  # variants run separately keep their settings in the meta
            payload["meta"]["models"]["ablations"].update(p["meta"]["models"].get("ablations", {}))
        seeds = sorted({r["seed"] for r in payload["rows"]})
        base = payload["meta"]["protocol"].split(" [merged runs")[0]
        payload["meta"]["protocol"] = f"{base} [merged runs, seeds in all: {seeds}; see merged_from]"
        sel = [p for p in parts if p.get("selection")]  # the --select runs' validation records
        if sel:
            payload["selection"] = merge_selections([p["selection"] for p in sel], payload["rows"])
            payload["meta"]["selection_protocol"] = " | ".join(
                dict.fromkeys(p["meta"].get("selection_protocol", p["meta"]["protocol"]) for p in sel)
            )
        payload["summary"] = summarise(payload["rows"], tasks)
        payload["targets"] = targets(payload["summary"], payload["speed"], payload["rows"])
        write(Path(args.out), payload)
        plot(payload["rows"], Path(args.out).with_suffix(".png"))
        return
    if args.replot:
        plot(json.loads(Path(args.out).read_text())["rows"], Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    dm = KuaiRandDataModule(batch_size=args.batch_size)
    dm.setup("fit")
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    if args.speed_only:
        payload = json.loads(out.read_text())
        speed = interleaved_speed(dm, bs=args.batch_size, blocks=args.speed_blocks)
        payload["speed"] = speed
        payload.setdefault("targets", {}).update(speed_ratios(speed))
        payload["meta"]["speed"] = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch "
            f"{torch.__version__}, {args.threads} thread(s)",
            "protocol": f"--speed-only: train steps (forward, backward, Adam) on one batch of "
            f"{args.batch_size} training rows, {args.speed_blocks} interleaved blocks of 4 steps per model, "
            "median over blocks; "
            "the quality rows and their train_samples_per_s are from the commit in meta.commit",
        }  # fmt: skip
        write(out, payload)
        print(json.dumps([{k: r[k] for k in ("model", "samples_per_s_median")} for r in speed]))
        return
    if args.select:
        lrs = parse_select(args.select)
        test_seeds = [] if args.select_only else args.seeds
        bad = [m for m in args.models if m not in ("mmoe", "ple", "home", "shared_bottom")]
        if bad:
            ap.error(f"--select trains moekit's main models only, got {bad}")
        meta = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch "
            f"{torch.__version__}, {args.threads} thread(s)",
            "protocol": f"--select: equal budget per model: every lr in {lrs} x seeds {args.select_seeds} x "
            f"{args.max_epochs} epochs (Adam, batch {args.batch_size}); a run keeps its best-validation "
            "epoch (mean GAUC); the lr with the best mean of those validation scores is chosen (no test "
            f"metric before the choice) and tested on seeds {test_seeds} as <model>_tuned rows (a "
            "selection seed reuses its run); the same runs read by validation mean AUC (lr and epoch) give "
            "the <model>_tuned_aucsel rows",
            "models": {"ablations": {}},
        }  # fmt: skip
        payload = {"meta": meta, "summary": [], "rows": [], "speed": [], "selection": {}}

        def update(selection: dict, rows: list[dict]) -> None:
            payload["selection"], payload["rows"] = selection, rows
            if rows:
                payload["summary"] = summarise(rows, dm.task_names)
                payload["targets"] = targets(payload["summary"], [], rows)
            write(out, payload)

        select_and_test(
            args.models, lrs, select_seeds=args.select_seeds, test_seeds=test_seeds, epochs=args.max_epochs,
            bs=args.batch_size, dm=dm, on_update=update,
        )  # fmt: skip
        return
    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, torch "
        f"{torch.__version__}, {args.threads} thread(s)",
        "data": "KuaiRand-Pure 2022-04-25..05-06 (198,895 impressions); SOURCE.txt split by date: train "
        "04-25..05-02 (135,128), valid 05-03..05-04 (36,543), test 05-05..05-06 (27,224)",
        "protocol": f"{args.epochs} epochs (scaled down for a shared 2-core CPU), Adam lr {args.lr}, batch "
        f"{args.batch_size}, the epoch with the best validation mean GAUC tested (every model alike); seeds "
        f"{args.seeds}; "
        "GAUC = per-user AUC weighted by impressions, single-class users left out; means over the 8 tasks",
        "features": "38 categorical (context, user, video basic), 7 numeric, watch history (last 50 clicks "
        "before the row's time_ms): DIN-pooled in moekit, mean-pooled in torch-rechub",
        "models": {"home": config("home")["backbone"]["init_args"], "ablations": ABLATIONS},
    }  # fmt: skip
    rows: list[dict] = []
    payload = {"meta": meta, "summary": [], "rows": rows, "speed": []}
    if any(m in args.models for m in RECHUB):  # first: it must not be the part cut by a deadline
        payload["speed"] = interleaved_speed(dm, bs=args.batch_size, blocks=args.speed_blocks)
        meta["speed"] = {
            "protocol": f"train steps (forward, backward, Adam) on one batch of {args.batch_size} training "
            f"rows, {args.speed_blocks} interleaved blocks of 4 steps per model, median over blocks, same run"
        }
        write(out, payload)
        print(json.dumps([{k: r[k] for k in ("model", "samples_per_s_median")} for r in payload["speed"]]))
    main_models = [m for m in args.models if m not in ABLATIONS]
    ablations = [m for m in args.models if m in ABLATIONS]
    # every seed of the main models first, then the ablations (a run cut short still has whole comparisons)
    plan = [(s, m) for s in args.seeds for m in main_models] + [(s, m) for s in args.seeds for m in ablations]
    for seed, name in plan:
        t0 = time.perf_counter()
        r = run_lightgbm(dm, seed) if name == "lightgbm" else train_run(
            name, seed, dm, args.epochs, args.lr, args.batch_size
        )  # fmt: skip
        r["wall_s"] = time.perf_counter() - t0
        rows.append(r)
        print(f"{name} seed {seed}: test auc_mean {r['test_auc_mean']:.4f} gauc_mean "
              f"{r['test_gauc_mean']:.4f} ({r['wall_s']:.0f} s)", flush=True)  # fmt: skip
        payload["summary"] = summarise(rows, dm.task_names)
        payload["targets"] = targets(payload["summary"], payload["speed"], rows)
        write(out, payload)
        plot(rows, out.with_suffix(".png"))
    keys = ("model", "impl", "gauc_mean", "gauc_mean_std", "auc_mean", "train_samples_per_s")
    print(json.dumps([{k: s[k] for k in keys} for s in payload["summary"]], indent=1))


if __name__ == "__main__":
    main()
