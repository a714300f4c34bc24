"""One ``moekit tune`` worker process for the sweep tests, and a callback that interrupts a trial.

Usage: python tune_worker.py CONFIG STORAGE_URL STUDY N_TRIALS OUT_DIR [SEED|none [GRACE_PERIOD_S]]
Runs :func:`pipelines.tune.run_study` on the toy app (in the app table through ``MOEKIT_APPS`` and this
folder on ``PYTHONPATH``, as the tests' ``conftest.py`` sets them) with one-epoch trials.
"""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import Callback


class InterruptAtFirstBatch(Callback):
    """Raises ``KeyboardInterrupt`` (Ctrl+C) at the first training batch of a trial."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:  # noqa: ANN001
        raise KeyboardInterrupt


def main() -> None:
    from pipelines.tune import run_study

    config, storage, study, n_trials, out = sys.argv[1:6]
    seed = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] != "none" else None
    heartbeat = {"heartbeat_interval": 1, "grace_period": int(sys.argv[7])} if len(sys.argv) > 7 else {}
    run_study(
        **heartbeat,
        app="toy",
        configs=[config],
        n_trials=int(n_trials),
        storage=storage,
        study_name=study,
        out_dir=out,
        overrides={"trainer.max_epochs": 1},
        seed=seed,
    )


if __name__ == "__main__":
    main()
