"""Census-Income (KDD) multi-task benchmark: moekit Shared-Bottom / MMoE / PLE / HoME vs torch-rechub
MMoE / PLE vs scikit-learn HistGradientBoostingClassifier, on the pinned "Census-Income test-file split"
(70/15/15).

Every neural model is trained by the same Lightning task (same data, features, optimiser, early stopping on
mean validation AUC, test with the best checkpoint); torch-rechub's networks are plugged in through
``build_network``. Numbers are not comparable with the published MMoE/PLE tables (those train on the
199,523-row train file).

Usage: ``python benchmarks/recsys_census.py [--seeds 0 1 2] [--models home mmoe ...] [--max-epochs N]``
Writes ``benchmarks/results/recsys_census.json`` (rows appended as runs finish) and ``recsys_census.png``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn

from apps.recsys.data import CENSUS_CATEGORICAL, CensusDataModule
from apps.recsys.model import MultiTaskOutput
from apps.recsys.task import MultiTaskRecTask

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "apps" / "recsys" / "configs"
COLOURS = {"moekit": "C0", "torch-rechub": "C1", "sklearn": "C2"}
MOEKIT = ("shared_bottom", "mmoe", "ple", "home")
RECHUB = ("rechub_mmoe", "rechub_ple")


class TrainThroughput(Callback):
    """Wall time of training batches only (forward, backward, optimiser step), excluding validation."""

    def __init__(self) -> None:
        self.seconds, self.samples, self._t = 0.0, 0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seconds += time.perf_counter() - self._t
        self.samples += len(batch["labels"])


class RechubNet(nn.Module):
    """torch-rechub MMOE/PLE on the same embedded features; its sigmoid outputs turned back into logits."""

    def __init__(
        self, *, kind: str, cardinalities, num_numeric: int, num_tasks: int, hp, backbone: dict
    ) -> None:
        super().__init__()
        from torch_rechub.basic.features import DenseFeature, SparseFeature
        from torch_rechub.models.multi_task import MMOE, PLE

        self.features = [
            SparseFeature(f"c{j}", vocab_size=c, embed_dim=hp.embed_dim) for j, c in enumerate(cardinalities)
        ]
        self.features += [DenseFeature(f"n{j}") for j in range(num_numeric)]
        types = ["classification"] * num_tasks
        expert = {"dims": list(backbone["expert_hidden"])}
        towers = [{"dims": list(hp.tower_hidden)} for _ in range(num_tasks)]
        if kind == "rechub_mmoe":
            self.net = MMOE(
                self.features, types, n_expert=backbone["num_experts"], expert_params=expert,
                tower_params_list=towers,
            )
        else:
            self.net = PLE(
                self.features, types, n_level=backbone["num_levels"],
                n_expert_specific=backbone["num_specific"], n_expert_shared=backbone["num_shared"],
                expert_params=expert, tower_params_list=towers,
            )  # fmt: skip

    def forward(self, cat: torch.Tensor, num: torch.Tensor) -> MultiTaskOutput:
        x = {f"c{j}": cat[:, j] for j in range(cat.shape[1])}
        x.update({f"n{j}": num[:, j] for j in range(num.shape[1])})
        p = self.net(x).float().clamp(1e-7, 1 - 1e-7)  # (B, M) probabilities from rechub's PredictionLayer
        return MultiTaskOutput(torch.logit(p))


class RechubTask(MultiTaskRecTask):
    """The same training task with a torch-rechub network."""

    def __init__(self, *, rechub_kind: str = "rechub_mmoe", **kw) -> None:
        self._kind = rechub_kind
        super().__init__(**kw)

    def build_network(self) -> nn.Module:
        hp = self.hparams
        return RechubNet(
            kind=self._kind, cardinalities=hp.cardinalities, num_numeric=hp.num_numeric,
            num_tasks=len(hp.task_names), hp=hp, backbone=self.backbone_factory.keywords,
        )  # fmt: skip


def build_task(name: str, margs: dict, **facts) -> MultiTaskRecTask:
    """The task of a shipped YAML's model init_args (the backbone given by class_path, as in the CLI)."""
    from jsonargparse import ArgumentParser

    cls = RechubTask if name in RECHUB else MultiTaskRecTask
    extra = {"rechub_kind": name} if name in RECHUB else {}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "model")
    return parser.instantiate(parser.parse_object({"model": {**margs, **extra, **facts}})).model


def model_args(name: str) -> tuple[dict, dict, dict]:
    """(model init_args, data init_args, trainer options) from the shipped YAML of ``name``."""
    base = name.replace("rechub_", "")
    cfg = yaml.safe_load((CONFIGS / f"census_{base}.yaml").read_text())
    trainer = {k: cfg["trainer"][k] for k in ("max_epochs",) if k in cfg["trainer"]}
    patience = 3
    for cb in cfg["trainer"].get("callbacks", []):
        if cb["class_path"].endswith("EarlyStopping"):
            patience = cb["init_args"].get("patience", patience)
    trainer["patience"] = patience
    return dict(cfg["model"]["init_args"]), dict(cfg["data"].get("init_args") or {}), trainer


def run_neural(name: str, seed: int, dm: CensusDataModule, max_epochs: int | None, workdir: Path) -> dict:
    margs, _, topt = model_args(name)
    L.seed_everything(seed, verbose=False)
    task = build_task(name, margs)
    thr = TrainThroughput()
    ck = ModelCheckpoint(
        dirpath=workdir / f"{name}_s{seed}", monitor="val/auc_mean", mode="max", save_top_k=1
    )
    es = EarlyStopping(monitor="val/auc_mean", mode="max", patience=topt["patience"])
    trainer = L.Trainer(
        max_epochs=max_epochs or topt["max_epochs"], logger=False, callbacks=[thr, ck, es],
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(task, dm)
    fit_s = time.perf_counter() - t0
    res = trainer.test(task, dm, ckpt_path="best", verbose=False)[0]
    return {
        "model": name, "impl": "torch-rechub" if name in RECHUB else "moekit", "seed": seed,
        "test_auc_income": res["test/auc_income"], "test_auc_never_married": res["test/auc_never_married"],
        "test_logloss_income": res["test/logloss_income"],
        "test_logloss_never_married": res["test/logloss_never_married"],
        "best_val_auc_mean": float(ck.best_model_score), "epochs": trainer.current_epoch,
        "train_samples_per_s": thr.samples / thr.seconds, "fit_s": fit_s,
        "params": sum(p.numel() for p in task.net.parameters()),
    }  # fmt: skip


def run_hgb(dm: CensusDataModule, seed: int) -> list[dict]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import log_loss, roc_auc_score

    n_cat = len(CENSUS_CATEGORICAL)  # original categoricals (numeric-as-category copies are left out)

    def mat(s):
        return np.concatenate([dm.splits[s]["cat"][:, :n_cat].numpy(), dm.splits[s]["num"].numpy()], 1)

    xtr, xte = mat("train"), mat("test")
    row = {"model": "hgb", "impl": "sklearn", "seed": seed, "params": None}
    secs = 0.0
    for k, t in enumerate(dm.task_names):
        clf = HistGradientBoostingClassifier(
            categorical_features=list(range(n_cat)), max_iter=500, learning_rate=0.1, early_stopping=True,
            random_state=seed,
        )  # fmt: skip
        t0 = time.perf_counter()
        clf.fit(xtr, dm.splits["train"]["labels"][:, k].numpy())
        secs += time.perf_counter() - t0
        p = clf.predict_proba(xte)[:, 1]
        y = dm.splits["test"]["labels"][:, k].numpy()
        row[f"test_auc_{t}"] = roc_auc_score(y, p)
        row[f"test_logloss_{t}"] = log_loss(y, np.clip(p, 1e-7, 1 - 1e-7))
    row["train_samples_per_s"] = len(xtr) * 2 / secs  # both tasks' fits (early-stopped boosting)
    row["fit_s"] = secs
    return [row]


def interleaved_speed(dm: CensusDataModule, *, blocks: int = 6, steps: int = 3) -> list[dict]:
    """Train-step throughput of the networks alone (forward, backward, Adam), interleaved in one process on
    the same census batch, so that load from other jobs hits every model alike (median over blocks)."""
    import statistics

    batch = next(iter(dm.train_dataloader()))
    cat, num, y = batch["cat"], batch["num"], batch["labels"]
    nets = {}
    for name in ("mmoe", "ple", "rechub_mmoe", "rechub_ple"):
        margs = model_args(name)[0]
        facts = dict(cardinalities=dm.cardinalities, num_numeric=dm.num_numeric, task_names=dm.task_names)
        task = build_task(name, margs, **facts)
        nets[name] = task.net
    opts = {k: torch.optim.Adam(n.parameters()) for k, n in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    for rep in range(blocks + 1):
        for k, net in nets.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                out = net(cat, num)
                loss = nn.functional.binary_cross_entropy_with_logits(out.logits, y)
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
            if rep:  # the first block is warm-up
                times[k].append((time.perf_counter() - t0) / steps)
    return [
        {
            "model": k,
            "train_samples_per_s_median": len(y) / statistics.median(v),
            "batch": len(y),
            "blocks": blocks,
        }
        for k, v in times.items()
    ]


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        s = {"model": name, "impl": rs[0]["impl"], "n": len(rs), "params": rs[0]["params"]}
        for key in ("test_auc_income", "test_auc_never_married", "test_logloss_income",
                    "test_logloss_never_married", "train_samples_per_s"):  # fmt: skip
            v = np.array([r[key] for r in rs], dtype=float)
            s[key] = float(v.mean())
            s[key + "_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        s["test_auc_mean"] = (s["test_auc_income"] + s["test_auc_never_married"]) / 2
        out.append(s)
    return out


def table(summary: list[dict]) -> str:
    base = next((s for s in summary if s["model"] == "mmoe"), summary[0])
    lines = [
        "| model | impl | income AUC | never_married AUC | mean AUC | logloss inc / nm | train samples/s "
        "| x MMoE speed | params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['impl']} | {s['test_auc_income']:.4f} ± {s['test_auc_income_std']:.4f} "
            f"| {s['test_auc_never_married']:.4f} ± {s['test_auc_never_married_std']:.4f} "
            f"| {s['test_auc_mean']:.4f} "
            f"| {s['test_logloss_income']:.4f} / {s['test_logloss_never_married']:.4f} "
            f"| {s['train_samples_per_s']:,.0f} ± {s['train_samples_per_s_std']:,.0f} "
            f"| {s['train_samples_per_s'] / base['train_samples_per_s']:.2f} "
            f"| {s['params'] if s['params'] is not None else '-'} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = [s["model"] for s in summary]
    x = np.arange(len(names))
    for ax, key, title in ((axes[0], "test_auc_income", "test AUC income"),
                           (axes[1], "test_auc_never_married", "test AUC never_married"),
                           (axes[2], "train_samples_per_s", "train samples/s")):  # fmt: skip
        ax.bar(x, [s[key] for s in summary], yerr=[s[key + "_std"] for s in summary], capsize=3,
               color=[COLOURS[s["impl"]] for s in summary])  # fmt: skip
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_title(title)
        if key.startswith("test_auc"):
            lo = min(s[key] - s[key + "_std"] for s in summary)
            ax.set_ylim(lo - 0.002, max(s[key] + s[key + "_std"] for s in summary) + 0.001)
    fig.suptitle(
        "Census-Income test-file split (70/15/15), mean ± std over seeds; blue moekit, orange torch-rechub"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def meta() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = None
    return {
        "machine": f"{platform.node()} {platform.machine()} torch_threads={torch.get_num_threads()}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "commit": commit,
        "torch": torch.__version__, "data": "Census-Income (KDD) test-file split 70/15/15 seed 42",
        "note": "shared CPU (samples/s noisy); not comparable with published MMoE/PLE numbers",
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=[*MOEKIT, *RECHUB, "hgb"])
    ap.add_argument("--max-epochs", type=int, default=None, help="override the YAML max_epochs")
    ap.add_argument("--out", default=str(RESULTS / "recsys_census.json"))
    ap.add_argument("--summarise-only", action="store_true", help="re-make table and plot from --out")
    ap.add_argument("--speed", action="store_true", help="also measure interleaved network throughput")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = ROOT / ".cache" / "bench_recsys"
    dm = CensusDataModule(**model_args("mmoe")[1])
    if not args.summarise_only:
        dm.setup("fit")
    rows: list[dict] = []
    failures: list[dict] = []
    m = meta()
    if args.summarise_only:
        rows = json.loads(out.read_text())["rows"]
        args.seeds = []
    for seed in args.seeds:
        for name in args.models:
            if name == "hgb":
                if seed == args.seeds[0]:
                    rows += run_hgb(dm, seed)
            else:
                try:
                    rows.append(run_neural(name, seed, dm, args.max_epochs, workdir))
                except Exception as e:  # keep the other models' results; the failure is reported
                    print(f"{name} seed {seed} FAILED: {type(e).__name__}: {e}", flush=True)
                    failures.append({"model": name, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                    continue
            r = rows[-1]
            print(f"{name} seed {seed}: income {r['test_auc_income']:.4f} "
                  f"nm {r['test_auc_never_married']:.4f} "
                  f"{r['train_samples_per_s']:,.0f} samples/s", flush=True)  # fmt: skip
            doc = {"meta": m, "rows": rows, "failures": failures, "summary": summarise(rows)}
            out.write_text(json.dumps(doc, indent=1))
    summary = summarise(rows)
    doc = json.loads(out.read_text()) if args.summarise_only else {"meta": m, "failures": failures}
    doc.update(rows=rows, summary=summary)
    if args.speed:
        if not dm.splits:
            dm.setup("fit")
        doc["interleaved_speed"] = interleaved_speed(dm)
        doc["interleaved_speed_meta"] = meta()
        for r in doc["interleaved_speed"]:
            print(f"interleaved {r['model']}: {r['train_samples_per_s_median']:,.0f} samples/s")
    out.write_text(json.dumps(doc, indent=1))
    plot(summary, out.with_suffix(".png"))
    print(table(summary))


if __name__ == "__main__":
    main()
