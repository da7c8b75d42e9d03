"""Test accuracy of the default training run on the real data sets, over splits and seeds.

    python -m benchmarks.accuracy [--quick]

For each built-in real data set (digits, breast_cancer, diabetes), the command's defaults
for that set (``handbackprop.train_command.defaults``: sizes d0-128-128-dL, the set's default
loss, and the learning rate, momentum, L2, batch size and epochs chosen on validation data by
``benchmarks/defaults_search.py``), float32. handbackprop (:func:`handbackprop.fit`) and
scikit-learn's ``MLPClassifier`` / ``MLPRegressor`` with the same set-up (the same SGD
settings, ``alpha = l2 * batch`` since scikit-learn divides its penalty by the batch size,
early stopping off) are each trained on 5 split seeds x 3 training seeds, every split the same
for both. The metric is test accuracy (R^2 for diabetes).

One test split decides a single run's figure within a few examples (digits' 359 test examples
are 0.28 points each, breast_cancer's 114 are 0.88), so the spread over splits and seeds is the
figure to compare; the default run (split seed 0, training seed 0) is reported as it falls.
Untimed: training speed is ``benchmarks/training.py``'s.

``--quick`` (the smoke test's mode): 2 epochs, 2 splits x 1 seed, on the first 256 training
examples of each set.
"""

import warnings

import jax
import numpy as np

import handbackprop as hbp
from benchmarks import common

from handbackprop.train_command import HIDDEN, defaults

SETS = ("digits", "breast_cancer", "diabetes")
GOALS = {"digits_default_run": 0.975, "digits_handbackprop_mean": 0.98,
         "breast_cancer_default_run": 0.95}


def _handbackprop(ds, s, seed):
    loss = ds.default_loss
    net = hbp.MLP((ds.num_features, *HIDDEN, ds.num_outputs(loss)), activation=s["activation"],
                  loss=loss, l2=s["l2"])
    state, _ = hbp.fit(net, hbp.sgd(s["lr"], s["momentum"], s["nesterov"]),
                       (ds.x_train, ds.y_train), epochs=s["epochs"], batch_size=s["batch_size"],
                       key=jax.random.key(seed))
    metrics = hbp.evaluate(net, state.params, *hbp.train.check_data(net, ds.x_test, ds.y_test))
    return float(metrics["accuracy" if ds.task == "classification" else "r2"])


def _sklearn(ds, s, seed):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from threadpoolctl import threadpool_limits

    model = MLPClassifier if ds.task == "classification" else MLPRegressor
    model = model(hidden_layer_sizes=HIDDEN, activation=s["activation"], solver="sgd",
                  learning_rate_init=s["lr"], momentum=s["momentum"],
                  nesterovs_momentum=s["nesterov"], alpha=s["l2"] * s["batch_size"],
                  batch_size=s["batch_size"], max_iter=s["epochs"],
                  n_iter_no_change=s["epochs"] + 1, random_state=seed)
    y_train = ds.y_train if ds.task == "classification" else ds.y_train.ravel()
    y_test = ds.y_test if ds.task == "classification" else ds.y_test.ravel()
    with warnings.catch_warnings(), threadpool_limits(1):  # one thread: faster on a shared box
        warnings.simplefilter("ignore", ConvergenceWarning)  # it stops at max_iter by design
        return float(model.fit(ds.x_train, y_train).score(ds.x_test, y_test))  # accuracy or R^2


def run(quick: bool = False, results_dir=None) -> dict:
    """Train every (data set, split, seed) with both libraries; print and save the figures."""
    splits, seeds, n_train = (2, 1, 256) if quick else (5, 3, None)
    rows, settings = [], {}
    for name in SETS:
        s = settings[name] = {**defaults(name), **({"epochs": 2} if quick else {})}
        for split in range(splits):
            ds = hbp.data.load(name, seed=split)
            ds = ds._replace(x_train=ds.x_train[:n_train].astype(np.float32),
                             y_train=ds.y_train[:n_train], x_test=ds.x_test.astype(np.float32))
            for library, train in (("handbackprop", _handbackprop), ("scikit-learn", _sklearn)):
                scores = [train(ds, s, seed) for seed in range(seeds)]
                rows.append({"dataset": name, "metric": "accuracy" if ds.task == "classification"
                             else "r2", "split": split, "library": library, "scores": scores,
                             "mean": float(np.mean(scores))})
    summary, stats = {}, []
    for name in SETS:
        ours, theirs = ([s for r in rows if (r["dataset"], r["library"]) == (name, lib)
                         for s in r["scores"]] for lib in ("handbackprop", "scikit-learn"))
        summary[f"{name}_default_run"] = ours[0]  # split seed 0, training seed 0
        summary[f"{name}_handbackprop_mean"] = float(np.mean(ours))
        summary[f"{name}_scikit_learn_mean"] = float(np.mean(theirs))
        stats.append({"dataset": name, "metric": rows[[r["dataset"] for r in rows].index(name)]["metric"],
                      "default_run": ours[0], "handbackprop_mean": float(np.mean(ours)),
                      "handbackprop_min": min(ours), "handbackprop_max": max(ours),
                      "scikit_learn_mean": float(np.mean(theirs)), "scikit_learn_min": min(theirs),
                      "scikit_learn_max": max(theirs), "runs": len(ours)})
    summary["goals"] = GOALS
    for r in rows:
        r["per_seed"] = ", ".join(f"{s:.4f}" for s in r["scores"])
    tables = {
        "summary": common.markdown_table(stats, [
            ("dataset", "data set", "{}"), ("metric", "metric", "{}"),
            ("default_run", "default run", "{:.4f}"),
            ("handbackprop_mean", "handbackprop mean", "{:.4f}"),
            ("handbackprop_min", "min", "{:.4f}"), ("handbackprop_max", "max", "{:.4f}"),
            ("scikit_learn_mean", "scikit-learn mean", "{:.4f}"),
            ("scikit_learn_min", "min", "{:.4f}"), ("scikit_learn_max", "max", "{:.4f}"),
            ("runs", "runs each", "{}")]),
        "every split": common.markdown_table(rows, [
            ("dataset", "data set", "{}"), ("split", "split seed", "{}"),
            ("library", "library", "{}"), ("per_seed", f"training seeds 0-{seeds - 1}", "{}"),
            ("mean", "mean", "{:.4f}")]),
    }
    result = {"quick": quick, "timed": False, "dtype": "float32", "settings": settings,
              "hidden": list(HIDDEN), "splits": splits, "seeds": seeds,
              "rows": rows, "stats": stats, "summary": summary, "tables": tables}
    path = common.save("accuracy", result, results_dir)
    print(tables["summary"])
    print(f"saved {path}")
    return result


def plot(result, folder):
    """Every run's score, one panel per data set, the default run circled; returns the PNG."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETS), figsize=(4 * len(SETS), 4))
    for ax, name in zip(axes, SETS):
        for i, library in enumerate(("handbackprop", "scikit-learn")):
            runs = [(r["split"], s) for r in result["rows"] if (r["dataset"], r["library"]) ==
                    (name, library) for s in r["scores"]]
            splits, scores = np.array(runs).T
            ax.scatter(i + 0.06 * (splits - splits.mean()), scores, s=18, label=library)
            ax.hlines(scores.mean(), i - 0.3, i + 0.3, colors="k")
        ax.scatter([0], [result["summary"][f"{name}_default_run"]], s=120, facecolors="none",
                   edgecolors="r", label="default run")
        metric = next(r["metric"] for r in result["rows"] if r["dataset"] == name)
        ax.set(xticks=[0, 1], xticklabels=["handbackprop", "scikit-learn"], ylabel=f"test {metric}",
               title=f"{name}: {result['splits']} splits x {result['seeds']} seeds")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = folder / "accuracy.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


if __name__ == "__main__":
    common.main(run, __doc__)
