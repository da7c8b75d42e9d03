"""A Laplace approximation of the trained digits network, from curvature computed by hand.

    pip install 'handbackprop[train]'
    python examples/laplace_digits.py [results/laplace_digits.png]

The MAP network is trained on the digits data, a fifth of the training split held out for
validation. Around it, the posterior over the weights is approximated by a Gaussian whose
precision is the Gauss-Newton matrix of the summed training loss plus a prior precision tau,
in two forms, neither of which forms the matrix:

- diagonal: ``hbp.diag_ggn`` (exact, K = 10 factor columns) plus tau;
- KFAC: per layer ``kron(a, g) + tau I`` from ``hbp.kfac_factors`` (KFLR), sampled through
  the eigendecompositions of a and g.

Each posterior is used two ways: sampled weights through the network itself, and through the
network linearised at the MAP, ``f(theta) ~ f(theta*) + J (theta - theta*)`` (the predictive
that matches the Gauss-Newton posterior: Immer, Korzepa and Bauer, AISTATS 2021), both as a
Monte Carlo average of softmax outputs. tau is chosen for each on the validation split (the
negative log-likelihood of its predictive) from a grid wide enough that the choice is interior.
The script prints the test accuracy, NLL and expected calibration error (15 equal-width
confidence bins) of the MAP network and of each Laplace predictive, and writes a reliability
diagram.
"""

import argparse
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import handbackprop as hbp

SAMPLES = 64  # weight draws per predictive
TAUS = tuple(10.0 ** k for k in np.arange(-1.0, 6.01, 0.5))  # prior precisions tried
BINS = 15


def metrics(probs, y):
    """Accuracy, mean negative log-likelihood and expected calibration error."""
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y).astype(float)
    nll = -np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)))
    edges = np.linspace(0, 1, BINS + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, BINS - 1)
    ece = sum(np.abs(correct[which == b].mean() - conf[which == b].mean()) * np.mean(which == b)
              for b in range(BINS) if np.any(which == b))
    return {"accuracy": correct.mean(), "nll": nll, "ece": ece}


def reliability(probs, y):
    """Per confidence bin: mean confidence, accuracy, count."""
    conf, correct = probs.max(1), (probs.argmax(1) == y)
    which = np.clip(np.digitize(conf, np.linspace(0, 1, BINS + 1)[1:-1]), 0, BINS - 1)
    return [(conf[which == b].mean(), correct[which == b].mean(), int(np.sum(which == b)))
            for b in range(BINS) if np.any(which == b)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("png", nargs="?", default="results/laplace_digits.png",
                        help="where to write the reliability diagram (default %(default)s)")
    args = parser.parse_args(argv)

    ds = hbp.data.load("digits")
    n_val = len(ds.x_train) // 5
    x_tr, y_tr = jnp.asarray(ds.x_train[n_val:], jnp.float32), jnp.asarray(ds.y_train[n_val:])
    x_val, y_val = jnp.asarray(ds.x_train[:n_val], jnp.float32), np.asarray(ds.y_train[:n_val])
    x_te, y_te = jnp.asarray(ds.x_test, jnp.float32), np.asarray(ds.y_test)

    net = hbp.MLP((64, 64, 10), activation="tanh", loss="softmax_cross_entropy")
    state, _ = hbp.fit(net, hbp.sgd(0.1), (x_tr, y_tr), epochs=30, batch_size=32, key=jax.random.key(0))
    params = state.params

    # The posterior's precision is that of the summed (not mean) training loss.
    total = dataclasses.replace(net, reduction="sum")
    diag = hbp.diag_ggn(total, params, x_tr, y_tr)
    kron = hbp.kfac_factors(total, params, x_tr, y_tr)
    eig = [(jnp.linalg.eigh(f.a), jnp.linalg.eigh(f.g)) for f in kron]

    def draw_diag(key, tau):
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        noise = [jax.random.normal(k, p.shape, p.dtype) / jnp.sqrt(d + tau)
                 for k, p, d in zip(keys, leaves, jax.tree.leaves(diag))]
        return jax.tree.unflatten(tree, [p + z for p, z in zip(leaves, noise)])

    def draw_kfac(key, tau):
        # (A kron G + tau I)^(-1/2) z for [W; b] row-major: (Ua x Ug) diag(1/sqrt(la lg + tau)) z.
        out = []
        for k, layer, ((la, ua), (lg, ug)) in zip(jax.random.split(key, len(params)), params, eig):
            z = jax.random.normal(k, (la.size, lg.size), jnp.float32)
            m = ua @ (z / jnp.sqrt(jnp.maximum(la, 0)[:, None] * jnp.maximum(lg, 0)[None] + tau)) @ ug.T
            out.append({"w": layer["w"] + m[:-1], "b": layer["b"] + m[-1]})
        return tuple(out)

    def logits(p, x):
        return hbp.forward_cache(net, p, x).ss[-1]

    def linearised(p, x):  # f(theta*) + J (theta - theta*): one forward-mode pass
        delta = jax.tree.map(jnp.subtract, p, params)
        s, jd = jax.jvp(lambda q: logits(q, x), (params,), (delta,))
        return s + jd

    @jax.jit
    def predictive(key, tau, x):
        def one(k):
            drawn = [draw(k, tau) for draw in (draw_diag, draw_kfac)]
            return jnp.stack([jax.nn.softmax(f(p, x)) for f in (logits, linearised) for p in drawn])
        return jnp.mean(jax.lax.map(one, jax.random.split(key, SAMPLES)), axis=0)  # (4, N, K)

    names = ("diagonal GGN Laplace", "KFAC Laplace", "diagonal GGN, linearised", "KFAC, linearised")
    val_map = np.asarray(hbp.forward(net, params, x_val), np.float64)
    conf, acc = val_map.max(1).mean(), np.mean(val_map.argmax(1) == y_val)
    print(f"MAP on the validation split: mean confidence {conf:.3f}, accuracy {acc:.3f} "
          f"({'under' if conf < acc else 'over'}confident)")
    key = jax.random.key(1)
    val = [np.asarray(predictive(key, tau, x_val), np.float64) for tau in TAUS]
    best = [int(np.argmin([metrics(v[i], y_val)["nll"] for v in val])) for i in range(len(names))]
    map_probs = np.asarray(hbp.forward(net, params, x_te), np.float64)
    results = {"MAP": map_probs}
    for i, name in enumerate(names):
        results[name] = np.asarray(predictive(jax.random.key(2), TAUS[best[i]], x_te)[i], np.float64)
        edge = " (the grid's edge)" if best[i] in (0, len(TAUS) - 1) else ""
        print(f"{name}: prior precision {TAUS[best[i]]:g}{edge} (validation NLL)")
    print(f"{'digits test set':26s} accuracy    NLL     ECE")
    for name, probs in results.items():
        m = metrics(probs, y_te)
        print(f"{name:26s} {m['accuracy']:.4f}   {m['nll']:.4f}  {m['ece']:.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for (name, probs), marker in zip(results.items(), "osD^v"):
        conf, acc, _ = zip(*reliability(probs, y_te))
        ax.plot(conf, acc, marker + "-", label=f"{name} (ECE {metrics(probs, y_te)['ece']:.3f})")
    ax.set(xlabel="confidence", ylabel="accuracy", title="Digits: reliability diagram", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper left")
    path = pathlib.Path(args.png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
