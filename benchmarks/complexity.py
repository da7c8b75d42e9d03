"""The note's headline claim (section 2.2): the whole gradient costs O(n) by backpropagation and
O(n^2) by finite differences, for n weights.

Four ways to the full gradient of the two-layer network ``MLP((w, w, w))`` (tanh, squared
error, bias: ``n = 2w(w + 1)`` weights), float32, on a fixed batch B as the width w grows:

- ``naive_fd``: the note's forward differences, one weight at a time: a jit-compiled
  ``lax.map`` over the n coordinates of the flat parameter vector, one forward pass each
  (O(n) passes of O(n) each), like ``reference/finite_diff.py`` without Python's overhead;
- ``vectorised_fd``: ``handbackprop.numerical_grad(method="forward")``: the same n + 1
  forward passes, run as vmapped chunks (the ratio to ``naive_fd`` is what batching buys);
- ``backprop``: the hand-written delta recursion; ``jax_grad``: ``jax.grad`` of the loss.

Why a fixed batch and growing widths: one forward pass costs about 2Bn flops, so the batch
sets how large n must be before the work outweighs the fixed costs (dispatch, loop steps).
A jitted no-op on the same arguments is timed alongside (``dispatch_s``), as that floor.

Slopes are least-squares fits of log(time) on log(n) over each method's *fit window*: its
largest three sizes (its top decade: the asymptotic regime the claim is about), keeping those
whose time is at least ten times the dispatch floor; the slope over all its sizes and the local
slope between neighbouring sizes are recorded too. The finite-difference methods stop at the first size whose predicted time
(quadratic extrapolation) would overrun their time budget, and take fewer repeats when slow
(at least 3; each timing records its ``repeats``).

    python -m benchmarks.complexity [--quick]
"""

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import handbackprop as hbp
from benchmarks import common

DTYPE = jnp.float32
METHODS = ("naive_fd", "vectorised_fd", "backprop", "jax_grad")
FD_METHODS = METHODS[:2]
LABELS = {"naive_fd": "naive forward differences (one weight at a time)",
          "vectorised_fd": "vectorised finite differences (numerical_grad)",
          "backprop": "backprop (delta recursion)", "jax_grad": "jax.grad"}

# Target weight counts on a half-decade grid; the device scale (1 on CPU, 8 on GPU/TPU)
# multiplies the batch, the largest sizes and nothing else.
FULL = dict(batch=32, n_min=1e2, n_max=1e7, fd_n_max=3e5, fd_budget_s=300.0, repeats=20, fd_repeats=3)
QUICK = dict(batch=16, n_min=1e2, n_max=1e3, fd_n_max=4e2, fd_budget_s=2.0, repeats=5, fd_repeats=3)
FIT_POINTS = 3  # the fit window: a method's largest three sizes (its top decade on the grid) ...
OVERHEAD_FACTOR = 10  # ... whose time is at least ten times the dispatch floor
REPEAT_SHARE = 0.1  # a slow method's repeats at one size take at most this share of its budget left


def width_for(n):
    """The width w whose ``MLP((w, w, w))`` has about n weights: ``2w(w + 1) = n``."""
    return max(2, round((math.sqrt(1 + 2 * n) - 1) / 2))


def grid(n_min, n_max):
    """Half-decade sizes from n_min to n_max: 100, 316, 1000, ..."""
    k0, k1 = round(2 * math.log10(n_min)), math.floor(2 * math.log10(n_max) + 1e-9)
    return [10 ** (k / 2) for k in range(k0, k1 + 1)]


def naive_forward_differences(f, params, *args, h=None):
    """The note's section 2.2 gradient: ``(f(w + h e_i) - f(w)) / h`` for each weight i in turn.

    One forward pass per weight, in a sequential ``lax.map`` (a loop, not a batch), so the
    cost is n passes of O(n) each. ``h`` defaults to ``sqrt(eps)`` of the parameters' dtype.
    """
    flat, unravel = ravel_pytree(params)
    h = math.sqrt(float(jnp.finfo(flat.dtype).eps)) if h is None else h
    f0 = f(params, *args)
    derivative = lambda i: (f(unravel(flat.at[i].add(h)), *args) - f0) / h  # noqa: E731
    return unravel(jax.lax.map(derivative, jnp.arange(flat.size)))


def problem(n, batch):
    """Network, float32 parameters, inputs and targets for about n weights."""
    w = width_for(n)
    net = hbp.MLP((w, w, w), activation="tanh")
    kp, kx, ky = jax.random.split(jax.random.key(0), 3)
    params = hbp.init_params(kp, net, DTYPE)
    x = jax.random.normal(kx, (batch, w), DTYPE)
    y = jax.random.normal(ky, (batch, w), DTYPE)
    return net, params, x, y


def gradient_fns(net):
    """The four full-gradient functions, jitted, each ``(params, x, y) -> grads``."""
    loss = functools.partial(hbp.loss, net)
    return {
        "naive_fd": jax.jit(lambda p, x, y: naive_forward_differences(loss, p, x, y)),
        "vectorised_fd": jax.jit(lambda p, x, y: hbp.numerical_grad(loss, p, x, y, method="forward")),
        "backprop": jax.jit(lambda p, x, y: hbp.backprop(net, p, x, y)),
        "jax_grad": jax.jit(jax.grad(loss)),
    }


def agreement(fns, params, x, y):
    """Each method's largest deviation from ``jax.grad``, relative to the largest |gradient|."""
    ref = ravel_pytree(fns["jax_grad"](params, x, y))[0]
    scale = float(jnp.max(jnp.abs(ref)))
    return {m: float(jnp.max(jnp.abs(ravel_pytree(fns[m](params, x, y))[0] - ref))) / scale
            for m in METHODS if m != "jax_grad"}


def fit_line(ns, ts):
    """Least-squares ``(slope, intercept)`` of log t on log n (None for fewer than two points)."""
    if len(ns) < 2:
        return None
    return tuple(float(c) for c in np.polyfit(np.log(ns), np.log(ts), 1))


def slopes(rows, method):
    """The fitted slope over the method's fit window, over all its sizes, and locally."""
    pts = [(r["n"], r[method]["median_s"], r["dispatch_s"]) for r in rows if method in r]
    window = [(n, t) for n, t, floor in pts[-FIT_POINTS:] if t >= OVERHEAD_FACTOR * floor]
    fit = fit_line(*zip(*window)) if window else None
    every = fit_line([n for n, _, _ in pts], [t for _, t, _ in pts])
    return {
        "slope": fit and fit[0],
        "intercept": fit and fit[1],
        "window": [n for n, _ in window],
        "slope_all": every and every[0],
        "local": [fit_line([n0, n1], [t0, t1])[0] for (n0, t0, _), (n1, t1, _) in zip(pts, pts[1:])],
    }


def run(quick: bool = False, results_dir=None) -> dict:
    cfg = dict(QUICK if quick else FULL)
    scale = common.device_scale()
    cfg.update(batch=cfg["batch"] * scale, n_max=cfg["n_max"] * scale, fd_n_max=cfg["fd_n_max"] * scale)
    sizes = grid(cfg["n_min"], cfg["n_max"])
    spent, skipped, rows = dict.fromkeys(FD_METHODS, 0.0), {}, []
    for target in sizes:
        net, params, x, y = problem(target, cfg["batch"])
        fns = gradient_fns(net)
        fns["dispatch"] = jax.jit(lambda p, x, y: x[0, 0])  # the fixed cost of one call
        row = {"n": net.num_params, "width": net.sizes[1], "batch": cfg["batch"]}
        fast = common.timeit_interleaved({k: fns[k] for k in ("backprop", "jax_grad", "dispatch")},
                                         params, x, y, repeats=cfg["repeats"])
        row["dispatch_s"] = fast.pop("dispatch")["median_s"]
        row.update(fast)
        for m in FD_METHODS:
            if m in skipped:
                continue
            last = next((r for r in reversed(rows) if m in r), None)
            predicted = last[m]["median_s"] * (row["n"] / last["n"]) ** 2 if last else 0.0
            left = cfg["fd_budget_s"] - spent[m]
            if target > cfg["fd_n_max"] or predicted * (1 + cfg["fd_repeats"]) > left:
                skipped[m] = {"from_n": row["n"], "predicted_s": predicted,
                              "reason": "size cap" if target > cfg["fd_n_max"] else "time budget"}
                continue
            repeats = max(cfg["fd_repeats"], min(cfg["repeats"], int(REPEAT_SHARE * left / max(predicted, 1e-9))))
            t0 = time.perf_counter()
            row[m] = common.timeit(fns[m], params, x, y, repeats=repeats)
            spent[m] += time.perf_counter() - t0
        if not rows:  # the smallest size: check that every method computes the gradient
            check = agreement(fns, params, x, y)
        rows.append(row)
        print(f"complexity: n={row['n']:>9,} " + " ".join(
            f"{m}={row[m]['median_s']:.3g}s" for m in METHODS if m in row), flush=True)

    fits = {m: slopes(rows, m) for m in METHODS}
    summary = {f"slope_{m}": fits[m]["slope"] for m in METHODS}
    top = [r for r in rows if all(m in r for m in METHODS)][-1]  # the largest size all four ran
    ratio = lambda r, a, b: r[a]["median_s"] / r[b]["median_s"]  # noqa: E731
    summary.update({
        "fd_max_n": top["n"],
        "naive_fd_over_backprop_at_fd_max_n": ratio(top, "naive_fd", "backprop"),
        "naive_fd_over_vectorised_fd_at_fd_max_n": ratio(top, "naive_fd", "vectorised_fd"),
        "backprop_over_jax_grad_at_max_n": ratio(rows[-1], "backprop", "jax_grad"),
        "goals": {"slope_backprop": 1.0, "slope_jax_grad": 1.0, "slope_naive_fd": 2.0, "slope_vectorised_fd": 2.0},
    })
    result = {
        "quick": quick, "dtype": "float32", "network": "MLP((w, w, w)), tanh, squared error, bias",
        "config": {**cfg, "device_scale": scale, "fit_points": FIT_POINTS,
                   "overhead_factor": OVERHEAD_FACTOR, "repeat_share": REPEAT_SHARE},
        "fit_rule": (f"least squares of log(median time) on log(n) over the method's largest {FIT_POINTS} "
                     f"sizes (its top decade), keeping those whose time is >= {OVERHEAD_FACTOR}x the "
                     "dispatch floor (a jitted no-op on the same arguments)"),
        "repeats_note": (f"backprop, jax_grad, dispatch: {cfg['repeats']} interleaved repeats; finite "
                         f"differences: {cfg['repeats']} while fast, fewer when slow (>= {cfg['fd_repeats']}), "
                         "capped by a time budget per method; see each timing's 'repeats'"),
        "summary": summary, "fits": fits, "fd_skipped": skipped,
        "agreement_at_smallest_n": check,
        "rows": rows, "table": table(rows, fits),
    }
    common.save("complexity", result, results_dir)
    return result


def table(rows, fits) -> str:
    """Median times (ms) per size and the fitted slopes, as Markdown."""
    fmt = lambda r, m: f"{1e3 * r[m]['median_s']:.3g}" if m in r else "-"  # noqa: E731
    lines = ["| n weights | width | " + " | ".join(f"{m} (ms)" for m in METHODS) + " |",
             "|---:|---:|" + "---:|" * len(METHODS)]
    lines += [f"| {r['n']:,} | {r['width']} | " + " | ".join(fmt(r, m) for m in METHODS) + " |" for r in rows]
    slope = lambda s: "-" if s is None else f"{s:.2f}"  # noqa: E731
    lines.append("| **fitted slope** | | " + " | ".join(f"**{slope(fits[m]['slope'])}**" for m in METHODS) + " |")
    return "\n".join(lines)


def plot(result, folder):
    """A log-log plot of time against n with the fitted lines; returns the PNG's path."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for m, marker in zip(METHODS, "osD^"):
        pts = [(r["n"], r[m]["median_s"], r[m]["min_s"], r[m]["max_s"]) for r in result["rows"] if m in r]
        if not pts:
            continue
        n, t, lo, hi = map(np.array, zip(*pts))
        fit = result["fits"][m]
        label = LABELS[m] + ("" if fit["slope"] is None else f": slope {fit['slope']:.2f}")
        line = ax.errorbar(n, t, yerr=[t - lo, hi - t], marker=marker, ls="none", label=label)[0]
        if fit["slope"] is not None:
            common.plot_power_law(ax, fit, line.get_color())
    ax.plot([r["n"] for r in result["rows"]], [r["dispatch_s"] for r in result["rows"]],
            "k:", label="dispatch floor (jitted no-op)")
    path = common.save_loglog(fig, ax, folder / "complexity.png", xlabel="number of weights n",
                              ylabel="median time (s)",
                              title=f"Full gradient, batch {result['config']['batch']}, {result['dtype']}")
    return [path]


if __name__ == "__main__":
    common.main(run, __doc__)
