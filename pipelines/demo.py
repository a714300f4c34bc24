"""``make demo``: train HoME on Census-Income, track it in the embedded MLflow store, register it, and print
the per-task AUC table plus the commands to open the MLflow UI and serve the model.

Steps: ``moekit recsys fit`` on ``apps/recsys/configs/census_home.yaml`` (MLflow run in ``mlflow/mlflow.db``,
artifacts in ``mlflow/artifacts``); ``test`` with the best checkpoint; registration of the best model as the
pyfunc ``moekit-census-home`` (raw census columns in, per-task probabilities out); a check that the registered
model, fed the raw test rows, reproduces the in-process test AUC.

Usage: ``python -m pipelines.demo [--config CFG] [--max-epochs N] [--name NAME]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from pipelines.tracking import REPO_ROOT, default_tracking_uri

DEFAULT_CONFIG = REPO_ROOT / "apps" / "recsys" / "configs" / "census_home.yaml"


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(rows[0]), sep, *(fmt(r) for r in rows[1:])])


def run_demo(
    *,
    config: str | Path = DEFAULT_CONFIG,
    name: str = "moekit-census-home",
    max_epochs: int | None = None,
    extra_args: Sequence[str] = (),
) -> dict:
    """Run the demo; returns the metrics, the registered version and the wall time."""
    import mlflow
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from pipelines.apps import get_app
    from pipelines.lightning_cli import MoekitCLI
    from pipelines.registry import register_trained

    t0 = time.perf_counter()
    # a folder of its own per demo run: a rerun neither mixes with nor overwrites the last one's checkpoints
    run_dir = Path.cwd() / "runs" / "demo" / time.strftime("%Y%m%d-%H%M%S")
    args = ["--config", str(config), "--tracking.run_name=demo-census-home", f"--run_dir={run_dir}"]
    args += list(extra_args)
    if max_epochs is not None:
        args.append(f"--trainer.max_epochs={max_epochs}")
    cli = MoekitCLI(app="recsys", args=args, run=False)
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    print(f"[demo] training HoME on Census-Income ({config})", flush=True)
    trainer.fit(model, datamodule=dm)
    t_fit = time.perf_counter() - t0
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    (test,) = trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=False)
    # validation metrics of the *best* checkpoint (the last epoch's may be worse)
    (val_best,) = trainer.validate(model, datamodule=dm, verbose=False, ckpt_path=best or None)
    val.update({k: float(v) for k, v in val_best.items()})

    print("[demo] registering the best model", flush=True)
    version = register_trained(app="recsys", model=model, datamodule=dm, trainer=trainer, name=name)
    uri = f"models:/{name}/{version}"

    # the registered pyfunc on the raw test rows must reproduce the in-process test AUC
    contract = get_app("recsys")
    raw_test = dm.load_frames()["test"][0]
    pyfunc = mlflow.pyfunc.load_model(uri)
    feats = contract.input_example(dm).columns.tolist()
    probs = pyfunc.predict(raw_test[feats])
    served_auc = {
        t: float(roc_auc_score(raw_test[t].to_numpy(), probs[t].to_numpy())) for t in model.task_names
    }

    rows = [("task", "val AUC", "test AUC", "test logloss", "registered model AUC")]
    for t in model.task_names:
        rows.append((t, f"{val.get(f'val/auc_{t}', float('nan')):.4f}", f"{test[f'test/auc_{t}']:.4f}",
                     f"{test[f'test/logloss_{t}']:.4f}", f"{served_auc[t]:.4f}"))  # fmt: skip
    rows.append(("mean", f"{val.get('val/auc_mean', float('nan')):.4f}", f"{test['test/auc_mean']:.4f}", "",
                 f"{np.mean(list(served_auc.values())):.4f}"))  # fmt: skip
    wall = time.perf_counter() - t0
    run_id = trainer.logger.run_id
    tracking = default_tracking_uri()
    print()
    print(f"HoME on Census-Income (KDD), test-file 70/15/15 split; epochs run: {trainer.current_epoch}")
    print(_table(rows))
    print()
    print(f"fit {t_fit:.0f} s, total {wall:.0f} s; MLflow run {run_id}; registered {uri}")
    print()
    print("Open the MLflow UI:")
    print(f"  .venv/bin/moekit ui            # = mlflow ui --backend-store-uri {tracking}")
    print("Serve the registered model (raw census columns in, per-task probabilities out):")
    print(f"  .venv/bin/moekit serve {uri} --port 5001")
    example = contract.input_example(dm).head(1)
    body = example.to_json(orient="split", index=False)
    print("  curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\")
    print(f"       -d '{{\"dataframe_split\": {body}}}'")
    return {"val": val, "test": test, "served_auc": served_auc, "version": version, "wall_s": wall,
            "run_id": run_id}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--name", default="moekit-census-home", help="registered model name")
    p.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs")
    a, extra = p.parse_known_args(argv)
    from pipelines.cli import configure_output

    configure_output()  # moekit's quiet output: warnings only, no third-party INFO chatter
    run_demo(config=a.config, name=a.name, max_epochs=a.max_epochs, extra_args=extra)


if __name__ == "__main__":
    main()
