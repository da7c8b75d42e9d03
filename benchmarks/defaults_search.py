"""How the training command's per-data-set defaults were chosen: a small grid on validation data.

    python -m benchmarks.defaults_search [--quick] [--only digits spirals ...]

For each built-in data set, a validation split (20%, stratified for classes) is carved from
the *training* split of ``data.load(name, seed=s)`` for split seeds s = 0, 1, 2; the test split
is never looked at. Every grid point (learning rate and momentum, L2, activation) trains once
per split with training seed 0 for the grid's largest epoch count, and the validation metric
(accuracy, or R^2 for regression) is read after each of the listed epoch counts from the
per-epoch history, so the epoch count costs no extra runs. The winner is the highest mean
validation metric over the splits, ties going to fewer epochs; the command's defaults
(``handbackprop.train_command.DATASET_DEFAULTS``) are these winners, and
``benchmarks.accuracy`` then measures them on the test splits.

With momentum mu the step is lr / (1 - mu) in the long run, so the grid pairs small learning
rates with mu = 0.9 and larger ones with plain SGD. Batch 32 throughout.

``--quick`` (the smoke test's mode): one split, the first grid point, 2 epochs.
"""

import argparse
import itertools

import jax
import numpy as np

import handbackprop as hbp
from benchmarks import common

HIDDEN, BATCH, SPLITS = (128, 128), 32, (0, 1, 2)
CLASSIFY = ((0.05, 0.0), (0.1, 0.0), (0.2, 0.0), (0.005, 0.9), (0.01, 0.9), (0.02, 0.9))
GRIDS = {  # name: ((lr, momentum) pairs, l2 values, activations, epoch counts read)
    "digits": ((*CLASSIFY, (0.3, 0.0), (0.5, 0.0)), (0.0, 1e-4, 3e-4, 1e-3, 3e-3), ("relu",),
               (25, 50, 100, 150, 200)),
    "breast_cancer": (CLASSIFY, (0.0, 1e-3, 1e-2), ("relu",), (10, 25, 50, 100)),
    "spirals": (CLASSIFY, (0.0, 1e-4), ("relu", "tanh"), (100, 200, 400)),
    "diabetes": (((0.003, 0.0), (0.01, 0.0), (0.03, 0.0), (0.001, 0.9), (0.003, 0.9)),
                 (0.0, 1e-2, 1e-1, 3e-1, 1.0), ("relu",), (10, 25, 50, 100)),
}


def validation_split(name: str, seed: int):
    """``(train, validation)`` as ``(x, y)`` pairs, both from ``load(name, seed=seed)``'s
    training split (the first 80% of a seeded, per-class permutation)."""
    ds = hbp.data.load(name, seed=seed)
    rng = np.random.default_rng(seed)
    y = ds.y_train
    groups = [np.flatnonzero(y == c) for c in np.unique(y)] if ds.task == "classification" \
        else [np.arange(len(y))]
    val = np.sort(np.concatenate([rng.permutation(g)[: round(0.2 * len(g))] for g in groups]))
    keep = np.setdiff1d(np.arange(len(y)), val)
    x = ds.x_train.astype(np.float32)
    return ds, (x[keep], y[keep]), (x[val], y[val])


def _curve(ds, train, val, lr, momentum, l2, activation, epochs):
    loss = ds.default_loss
    net = hbp.MLP((ds.num_features, *HIDDEN, ds.num_outputs(loss)), activation=activation,
                  loss=loss, l2=l2)
    _, history = hbp.fit(net, hbp.sgd(lr, momentum), train, epochs=epochs, batch_size=BATCH,
                         key=jax.random.key(0), test_data=val)
    return np.asarray(history[f"test_{hbp.train.metric_name(net)}"])


def search(name: str, quick: bool = False) -> list:
    """Every grid point's mean validation metric for ``name``, best first."""
    pairs, l2s, activations, counts = GRIDS[name]
    splits = SPLITS[:1] if quick else SPLITS
    grid = list(itertools.product(pairs, l2s, activations))[:1] if quick else \
        list(itertools.product(pairs, l2s, activations))
    counts = (2,) if quick else counts
    data = [validation_split(name, s) for s in splits]
    rows = []
    for (lr, momentum), l2, activation in grid:
        curves = np.stack([_curve(ds, tr, va, lr, momentum, l2, activation, max(counts))
                           for ds, tr, va in data])
        for epochs in counts:
            scores = curves[:, epochs - 1]
            rows.append({"dataset": name, "lr": lr, "momentum": momentum, "l2": l2,
                         "activation": activation, "epochs": epochs,
                         "validation": float(scores.mean()), "per_split": scores.tolist()})
    rows.sort(key=lambda r: (-r["validation"], r["epochs"]))
    return rows


def run(quick: bool = False, results_dir=None, only=None) -> dict:
    tables, best = {}, {}
    all_rows = []
    for name in only or GRIDS:
        rows = search(name, quick)
        all_rows += rows
        best[name] = {k: rows[0][k] for k in ("lr", "momentum", "l2", "activation", "epochs")}
        tables[name] = common.markdown_table(rows[:10], [
            ("lr", "learning rate", "{:g}"), ("momentum", "momentum", "{:g}"),
            ("l2", "L2", "{:g}"), ("activation", "activation", "{}"), ("epochs", "epochs", "{}"),
            ("validation", "mean validation metric", "{:.4f}")])
        print(f"{name}: {len(rows)} grid points x {len(rows[0]['per_split'])} splits; best 10:")
        print(tables[name])
    result = {"quick": quick, "timed": False, "batch_size": BATCH, "hidden": list(HIDDEN),
              "splits": list(SPLITS), "grids": {k: [list(map(list, v[0])), *map(list, v[1:])]
                                                for k, v in GRIDS.items()},
              "best": best, "rows": all_rows, "tables": tables}
    print(f"saved {common.save('defaults_search', result, results_dir)}")
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", nargs="+", choices=list(GRIDS))
    p.add_argument("--results", default=None)
    a = p.parse_args()
    run(a.quick, a.results, a.only)
