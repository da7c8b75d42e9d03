"""Hand backprop vs jax.grad over a shape grid, and the training step's FLOP-rate fraction.

For each shape (width, depth L, batch B), in one process, float32, both jit-compiled:
- ratio = median time of ``backprop`` / median time of ``jax.grad(loss)`` (goal: median <= 1.0,
  none above 1.10);
- FLOP fraction = (6 B n_weights / backprop time) / (the rate of a (B, width) @ (width, width)
  matmul timed in the same run): forward plus backward is about three matmuls' worth of flops
  per layer (goal >= 0.85 at width >= 512 and batch >= 256).

    python -m benchmarks.backprop_vs_autodiff [--quick]
"""

import itertools
import statistics

import jax
import jax.numpy as jnp

import handbackprop as hbp
from benchmarks import common

FULL = dict(widths=(64, 256, 512, 1024), depths=(2, 3, 4), batches=(32, 128, 512))
QUICK = dict(widths=(32, 64), depths=(2,), batches=(16,))


def measure(width, depth, batch, repeats, min_seconds=0.0):
    net = hbp.MLP((width,) * depth + (10,), activation="relu", loss="softmax_cross_entropy")
    kp, kx, ky = jax.random.split(jax.random.key(0), 3)
    params = hbp.init_params(kp, net, jnp.float32)
    x = jax.random.normal(kx, (batch, width), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, 10)
    a = jax.random.normal(kx, (batch, width), jnp.float32)
    w = jax.random.normal(ky, (width, width), jnp.float32)
    fns = {
        "backprop": jax.jit(lambda p, x, y: hbp.backprop(net, p, x, y)),
        "jax_grad": jax.jit(jax.grad(lambda p, x, y: hbp.loss(net, p, x, y))),
    }
    t = common.timeit_interleaved(fns, params, x, y, repeats=repeats, min_seconds=min_seconds)
    mm = common.timeit(jax.jit(jnp.matmul), a, w, repeats=repeats, min_seconds=min_seconds)
    weights = sum(d0 * d1 for d0, d1 in zip(net.sizes[:-1], net.sizes[1:]))
    matmul_rate = 2 * batch * width * width / mm["median_s"]
    step_rate = 6 * batch * weights / t["backprop"]["median_s"]
    return {
        "width": width, "depth": depth, "batch": batch, "weights": weights,
        "backprop": t["backprop"], "jax_grad": t["jax_grad"], "matmul": mm,
        "ratio": t["backprop"]["median_s"] / t["jax_grad"]["median_s"],
        "backprop_gflops": step_rate / 1e9, "matmul_gflops": matmul_rate / 1e9,
        "flop_fraction": step_rate / matmul_rate,
    }


COLUMNS = [("width", "width", "{}"), ("depth", "L", "{}"), ("batch", "B", "{}"),
           ("ratio", "backprop / jax.grad", "{:.3f}"), ("backprop_gflops", "backprop GFLOP/s", "{:.1f}"),
           ("matmul_gflops", "matmul GFLOP/s", "{:.1f}"), ("flop_fraction", "FLOP fraction", "{:.2f}")]


def run(quick: bool = False, results_dir=None) -> dict:
    grid = QUICK if quick else FULL
    # Full runs: at least 20 repeats and about a second of calls per variant (sub-millisecond
    # shapes then take hundreds of repeats, and their medians stop jumping by 10%).
    repeats, seconds = (5, 0.0) if quick else (20, 1.0)
    rows = [measure(w, d, b, repeats, seconds)
            for w, d, b in itertools.product(grid["widths"], grid["depths"], grid["batches"])]
    ratios = [r["ratio"] for r in rows]
    big = [r["flop_fraction"] for r in rows if r["width"] >= 512 and r["batch"] >= 256]
    summary = {
        "median_ratio": statistics.median(ratios),
        "max_ratio": max(ratios),
        "min_flop_fraction_large": min(big) if big else None,
        "goals": {"median_ratio": 1.0, "max_ratio": 1.10, "flop_fraction_large": 0.85},
    }
    result = {"quick": quick, "dtype": "float32", "summary": summary, "rows": rows,
              "table": common.markdown_table(rows, COLUMNS)}
    common.save("backprop_vs_autodiff", result, results_dir)
    return result


if __name__ == "__main__":
    common.main(run, __doc__)
