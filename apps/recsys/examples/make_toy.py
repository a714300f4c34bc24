"""Writes the toy CSVs of the generic-loader worked example (docs/recsys.md): synthetic rows, not real data.

Run from the repository root: ``python apps/recsys/examples/make_toy.py`` (deterministic, seed 0).
Columns: ``user_id``, ``item_id``, ``category`` (sparse), ``price``, ``age`` (dense), ``hist_items``
(sequence: ``|``-separated item ids the user clicked before, oldest first), ``ts`` (event time), and the
labels ``click`` and ``like``. ``click`` is more likely when the item's category matches the categories in
the history, and for cheap items; ``like`` needs a click.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent


def make(n: int, rng: np.random.Generator, t0: int) -> pd.DataFrame:
    n_items, n_users = 60, 40
    item_cat = np.arange(n_items) % 5  # item i is in category i % 5
    users = rng.integers(0, n_users, n)
    fav = users % 5  # each user prefers one category
    items = rng.integers(0, n_items, n)
    hist = []
    for u in fav:
        k = rng.integers(0, 6)
        pool = np.flatnonzero(item_cat == u)
        hist.append("|".join(map(str, rng.choice(pool, k)))) if k else hist.append("")
    price = np.round(rng.lognormal(3, 0.6, n), 2)
    age = rng.integers(18, 70, n)
    match = (item_cat[items] == fav).astype(float)
    logit = -1.5 + 3.0 * match - 0.02 * (price - 20) + 0.01 * (age - 40)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    like = (click & (rng.random(n) < 0.25 + 0.4 * match)).astype(int)
    return pd.DataFrame({
        "user_id": [f"u{u}" for u in users], "item_id": items, "category": [f"c{c}" for c in item_cat[items]],
        "price": price, "age": age, "hist_items": hist, "ts": t0 + np.arange(n) * 60, "click": click,
        "like": like,
    })  # fmt: skip


def main() -> None:
    rng = np.random.default_rng(0)
    train = make(3000, rng, 1_700_000_000)
    test = make(300, rng, 1_700_100_000)
    train.to_csv(HERE / "toy_train.csv", index=False)
    test.to_csv(HERE / "toy_test.csv", index=False)
    test.drop(columns=["click", "like"]).head(50).to_csv(HERE / "toy_unlabelled.csv", index=False)


if __name__ == "__main__":
    main()
