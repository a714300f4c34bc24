"""One Optuna worker process: joins a study on shared RDB storage and runs ``n_trials`` trials.

Usage: python moekit_optuna_worker.py STORAGE_URL STUDY_NAME N_TRIALS WORKER_ID OUT_JSON
Writes the (trial number, x, y, value) it ran to OUT_JSON so the test can check none was lost or duplicated.
"""

from __future__ import annotations

import json
import sys
import time

import optuna


def main() -> None:
    url, name, n_trials, worker, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=url)
    done = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -5.0, 5.0)
        y = trial.suggest_int("y", 0, 10)
        trial.set_user_attr("worker", worker)
        time.sleep(0.05)  # overlap the two workers
        value = (x - 1.0) ** 2 + (y - 3) ** 2
        done.append({"number": trial.number, "x": x, "y": y, "value": value})
        return value

    study.optimize(objective, n_trials=n_trials)
    with open(out, "w") as f:
        json.dump(done, f)


if __name__ == "__main__":
    main()
