"""Training throughput: the default digits run against scikit-learn and PyTorch.

    python -m benchmarks.training [--quick]

The same task for all three: digits (1438 training, 359 test examples), sizes 64-128-128-10,
ReLU, softmax cross-entropy, plain SGD (learning rate 0.1, no momentum, no L2), batch 32,
50 epochs, float32, one seed. Each variant is a whole training run from fresh parameters,
timed end to end, the three interleaved over the repeats; handbackprop's first run (which
compiles) is reported apart. Samples per second count the examples each one actually trains
on: handbackprop leaves each epoch's last ``1438 mod 32 = 30`` examples of the shuffled order
for a later epoch (static shapes), scikit-learn and this PyTorch loop train on a short last batch.

- handbackprop: :func:`handbackprop.fit`, each epoch one compiled ``lax.scan``.
- scikit-learn: ``MLPClassifier(solver="sgd", momentum=0, alpha=0, ...)``, early stopping off.
- PyTorch: an eager loop, ``torch.randperm`` batches, ``nn.Sequential`` and ``optim.SGD``.

scikit-learn (through ``threadpoolctl``) and PyTorch run on one thread: on a shared two-core
machine their default two threads spend their time waiting for each other (measured while
writing this: scikit-learn 3x and PyTorch over 100x slower per epoch than on one thread).
handbackprop runs with XLA's defaults. Test accuracy is the mean over 3 seeds (1 with
``--quick``), from untimed runs.

The FLOP rate puts the speed-ups in context: the FLOPs of one step (forward ``2BP``, weight
gradients ``2BP``, deltas below the top layer ``2B(P - (d0 + 1) d1)``, update ``2P``, for P
parameters, biases included) over handbackprop's time per step, against what NumPy's BLAS
reaches on one thread for a 512 x 512 float32 matrix product on the same machine: how much
faster any implementation of the same steps could go on one core of this CPU. (Accuracy over
many splits and seeds is ``benchmarks/accuracy.py``'s.)

``--quick`` (the smoke test's mode: a few seconds, figures without meaning) keeps the three
libraries and the result's fields but trains a 64-16-10 network for 1 epoch on the first 256
training examples, 3 repeats.
"""

import pathlib
import time
import warnings

import jax
import numpy as np

import handbackprop as hbp
from benchmarks import common

HIDDEN, LR, BATCH = (128, 128), 0.1, 32
QUICK_HIDDEN, QUICK_TRAIN = (16,), 256  # --quick: a tiny network on a slice of the training set
GOALS = {"speedup_vs_sklearn": 10.0, "speedup_vs_torch": 5.0}


def _handbackprop(ds, epochs, hidden):
    net = hbp.MLP((ds.num_features, *hidden, len(ds.classes)), loss="softmax_cross_entropy")
    opt = hbp.sgd(LR)

    def train(seed):
        state, _ = hbp.fit(net, opt, (ds.x_train, ds.y_train), epochs=epochs, batch_size=BATCH,
                           key=jax.random.key(seed))
        return state.params

    def accuracy(params):
        return float(hbp.evaluate(net, params, ds.x_test, ds.y_test)["accuracy"])
    return train, accuracy


def _sklearn(ds, epochs, hidden):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    from threadpoolctl import threadpool_limits

    def train(seed):
        model = MLPClassifier(hidden, activation="relu", solver="sgd", learning_rate_init=LR,
                              momentum=0.0, alpha=0.0, batch_size=BATCH, max_iter=epochs,
                              n_iter_no_change=epochs + 1, random_state=seed)
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)  # it stops at max_iter by design
            return model.fit(ds.x_train, ds.y_train)

    return train, lambda model: float(model.score(ds.x_test, ds.y_test))


def _torch(ds, epochs, hidden):
    import torch

    torch.set_num_threads(1)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    sizes = (ds.num_features, *hidden, len(ds.classes))

    def train(seed):
        torch.manual_seed(seed)
        layers = []
        for d_in, d_out in zip(sizes[:-1], sizes[1:]):
            layers += [torch.nn.Linear(d_in, d_out), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1])
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0)
        loss_fn = torch.nn.CrossEntropyLoss()
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for i in range(0, len(x), BATCH):
                idx = order[i: i + BATCH]
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
        return model

    def accuracy(model):
        with torch.no_grad():
            pred = model(torch.from_numpy(ds.x_test)).argmax(1).numpy()
        return float(np.mean(pred == ds.y_test))
    return train, accuracy


def _step_flops(sizes, batch):
    """FLOPs of one SGD step (see the module's docstring); biases count as weights."""
    p = sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:]))
    first = (sizes[0] + 1) * sizes[1]
    return 2 * batch * (3 * p - first) + 2 * p


def _blas_flop_rate(n=512, seconds=1.0):
    """NumPy's one-thread float32 GFLOP/s for an n x n matrix product (the best of 5 runs)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = 0.0
    with threadpool_limits(1):
        for _ in range(5):
            count, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 5:
                a @ a
                count += 1
            best = max(best, 2 * n**3 * count / (time.perf_counter() - t0) / 1e9)
    return best


def run(quick: bool = False, results_dir=None) -> dict:
    """Measure, print and save (``<results>/training.json``) the comparison."""
    epochs, repeats, seeds = (1, 3, 1) if quick else (50, 20, 3)
    hidden, n_train = (QUICK_HIDDEN, QUICK_TRAIN) if quick else (HIDDEN, None)
    ds = hbp.data.load("digits")
    ds = ds._replace(x_train=ds.x_train[:n_train].astype(np.float32), y_train=ds.y_train[:n_train],
                     x_test=ds.x_test.astype(np.float32))
    n = len(ds.x_train)
    samples = {"handbackprop": epochs * (n // BATCH) * BATCH, "scikit-learn": epochs * n,
               "pytorch": epochs * n}
    variants = {"handbackprop": _handbackprop(ds, epochs, hidden),
                "scikit-learn": _sklearn(ds, epochs, hidden)}
    try:
        variants["pytorch"] = _torch(ds, epochs, hidden)
    except ImportError:
        print("PyTorch not installed: pip install torch==2.13.0 (CPU); skipping it")
    timings = common.timeit_interleaved({k: (lambda t=t: t(0)) for k, (t, _) in variants.items()},
                                        repeats=repeats)
    rows = []
    for name, (train, accuracy) in variants.items():
        t = timings[name]
        rows.append({"library": name, "samples_per_s": samples[name] / t["median_s"],
                     "train_s": t["median_s"], "iqr_s": t["iqr_s"], "first_run_s": t["compile_s"],
                     "test_accuracy": float(np.mean([accuracy(train(s)) for s in range(seeds)]))})
    ours = rows[0]
    for r in rows:
        r["speedup_ratio"] = ours["samples_per_s"] / r["samples_per_s"]
    summary = {f"speedup_vs_{'sklearn' if r['library'] == 'scikit-learn' else 'torch'}": r["speedup_ratio"]
               for r in rows[1:]}
    summary.update({f"accuracy_{r['library'].replace('-', '_')}": r["test_accuracy"] for r in rows})
    sizes = [ds.num_features, *hidden, len(ds.classes)]
    flops = _step_flops(sizes, BATCH)
    step_s = timings["handbackprop"]["median_s"] / (samples["handbackprop"] / BATCH)
    blas = _blas_flop_rate()
    summary.update({"handbackprop_gflops": flops / step_s / 1e9, "numpy_one_thread_gflops": blas,
                    "flop_rate_fraction": flops / step_s / 1e9 / blas})
    summary["goals"] = {k: v for k, v in GOALS.items() if k in summary}
    table = common.markdown_table(rows, [
        ("library", "library", "{}"), ("samples_per_s", "samples/s", "{:,.0f}"),
        ("speedup_ratio", "handbackprop speed-up", "{:.1f}x"), ("train_s", "median run (s)", "{:.3f}"),
        ("iqr_s", "IQR (s)", "{:.3f}"), ("first_run_s", "first run (s)", "{:.2f}"),
        ("test_accuracy", f"test accuracy (mean of {seeds} seed{'s' * (seeds > 1)})", "{:.4f}"),
    ])
    result = {"quick": quick, "dtype": "float32", "epochs": epochs, "batch_size": BATCH,
              "learning_rate": LR, "sizes": sizes,
              "train_examples": n, "test_examples": len(ds.x_test), "step_flops": flops,
              "timings": timings, "rows": rows, "summary": summary, "table": table}
    common.save("training", result, results_dir)
    print(table)
    return result



def plot(result, folder):
    """Time to train, one bar per library, handbackprop first, each labelled with how many
    times handbackprop's time it takes and its test accuracy. Returns the PNG's path."""
    import matplotlib.pyplot as plt

    rows = sorted(result["rows"], key=lambda r: r["library"] != "handbackprop")
    ours = rows[0]["train_s"]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(rows)))
    bars = ax.barh(range(len(rows)), [r["train_s"] for r in rows],
                   color=["C2" if r["library"] == "handbackprop" else "C7" for r in rows])
    labels = [f"{r['train_s']:.2f} s" + ("" if r["library"] == "handbackprop" else
                                         f" = {r['train_s'] / ours:.1f}x handbackprop's")
              + f", test accuracy {r['test_accuracy']:.3f}" for r in rows]
    ax.bar_label(bars, labels, padding=4, fontsize=9)
    ax.set_yticks(range(len(rows)), [r["library"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 2.6 * max(r["train_s"] for r in rows))  # room for the labels
    ax.set_xlabel("seconds to train (median; shorter is faster)")
    ax.set_title(f"Training {'-'.join(map(str, result['sizes']))} on digits: {result['epochs']} "
                 f"epochs, batch {result['batch_size']}, SGD lr {result['learning_rate']:g}, "
                 "one thread each", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = pathlib.Path(folder) / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


if __name__ == "__main__":
    common.main(run, __doc__)
