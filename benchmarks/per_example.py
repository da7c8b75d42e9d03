"""Per-example gradients, their norms and DP-SGD's clipped sum: handbackprop against JAX's way.

Two interleaved groups per network (float32, jit, DESIGN.md section 5), each timed as ratios
in one process:

- materialised: ``per_example_grads`` (``"outer"`` and ``"vmap"``) against
  ``jax.vmap(jax.grad)``, all returning the B gradients (outputs, so XLA cannot fold them
  away), and the time to merely fill an output of that size: on a CPU, writing B x P fresh
  floats (page faults included) is most of the cost, and no method can avoid it.
- batch-sized: ``per_example_grad_norms``, ``clipped_grad`` and ``gradient_stats`` against
  one batch ``backprop``, and against clipping ``jax.vmap(jax.grad)``'s materialised
  gradients (the JAX example's and jax_privacy's DP-SGD).

Temporary memory is XLA's own count: ``jax.jit(f).lower(...).compile().memory_analysis()``.

    python -m benchmarks.per_example [--quick]
"""

import dataclasses

import jax
import jax.numpy as jnp

import handbackprop as hbp
from benchmarks import common
from benchmarks.common import markdown_table, save, timeit_interleaved

CLIP = 1.0


def _jax_way(net):
    """``jax.vmap(jax.grad)`` of each example's own loss, and DP-SGD's clipped sum from it."""
    single = dataclasses.replace(net, l2=0.0, reduction="sum")
    e = lambda p, xb, yb: hbp.loss(single, p, xb[None], yb[None])  # noqa: E731
    per_example = jax.vmap(jax.grad(e), in_axes=(None, 0, 0))

    def clipped_sum(p, x, y):
        g = per_example(p, x, y)
        sq = sum(jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=1) for a in jax.tree.leaves(g))
        c = jnp.minimum(1.0, CLIP / jnp.sqrt(sq))
        return jax.tree.map(lambda a: jnp.einsum("b,b...->...", c, a), g)

    return per_example, clipped_sum


def _problem(width, batch, classes=10):
    net = hbp.MLP((width, width, width, classes), activation="relu",
                  loss="softmax_cross_entropy")
    kp, kx, ky = jax.random.split(jax.random.key(0), 3)
    params = hbp.init_params(kp, net, jnp.float32)
    x = jax.random.normal(kx, (batch, width), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, classes)
    return net, (params, x, y)


def _measure(group, baseline, args, repeats, extra):
    """Time a dict of functions interleaved, jitted; rows with ratios and temp memory."""
    fns = {k: jax.jit(f) for k, f in group.items()}
    times = timeit_interleaved(fns, *args, repeats=repeats)
    mem = {k: f.lower(*args).compile().memory_analysis() for k, f in fns.items()}
    return [{
        "width": extra["width"], "batch": extra["batch"], "variant": k, "baseline": baseline,
        "median_ms": 1e3 * t["median_s"], "iqr_ms": 1e3 * t["iqr_s"],
        "ratio": t["median_s"] / times[baseline]["median_s"],
        "temp_mib": mem[k].temp_size_in_bytes / 2**20,
        "temp_ratio": mem[k].temp_size_in_bytes / max(mem[baseline].temp_size_in_bytes, 1),
        "output_mib": mem[k].output_size_in_bytes / 2**20,
        "timing": t,
    } for k, t in times.items()]


COLUMNS = [("width", "width", "{}"), ("batch", "B", "{}"), ("variant", "variant", "{}"),
           ("median_ms", "median ms", "{:.2f}"), ("iqr_ms", "IQR ms", "{:.2f}"),
           ("baseline", "ratio to", "{}"), ("ratio", "time ratio", "{:.3f}"),
           ("temp_mib", "temp MiB", "{:.2f}"), ("temp_ratio", "temp ratio", "{:.3f}"),
           ("output_mib", "output MiB", "{:.1f}")]
GOALS = {"outer_vs_vmap_grad_time": 0.5, "norms_vs_backprop_time": 1.0,
         "norms_vs_backprop_temp": 1.1}


def run(quick: bool = False, results_dir=None) -> dict:
    """Both groups for each width, float32, jitted; prints and saves the table.

    Returns:
      ``{"rows", "summary" (with "goals"), "table", ...}`` as saved to ``per_example.json``.
    """
    batch, widths, repeats = (64, (64, 128), 5) if quick else (256, (256, 512), 20)
    rows, summary = [], {}
    for width in widths:
        net, args = _problem(width, batch)
        vmap_grad, jax_clipped = _jax_way(net)
        extra = {"width": width, "batch": batch}
        rows += _measure({
            "per_example_grads outer": lambda p, x, y: hbp.per_example_grads(net, p, x, y),
            "per_example_grads vmap": lambda p, x, y: hbp.per_example_grads(
                net, p, x, y, method="vmap"),
            "jax.vmap(jax.grad)": vmap_grad,
            "fill an output of that size": lambda p, x, y: jax.tree.map(
                lambda a: jnp.full((batch,) + a.shape, x[0, 0]), p),
        }, "jax.vmap(jax.grad)", args, repeats, extra)
        rows += _measure({
            "backprop": lambda p, x, y: hbp.backprop(net, p, x, y),
            "per_example_grad_norms": lambda p, x, y: hbp.per_example_grad_norms(net, p, x, y),
            "clipped_grad": lambda p, x, y: hbp.clipped_grad(net, p, x, y, CLIP).sum,
            "gradient_stats": lambda p, x, y: hbp.gradient_stats(net, p, x, y),
            "clip jax.vmap(jax.grad)": jax_clipped,
        }, "backprop", args, repeats, extra)
        row = {r["variant"]: r for r in rows if r["width"] == width}
        outer, norms = row["per_example_grads outer"], row["per_example_grad_norms"]
        summary.update({
            f"w{width}_outer_vs_vmap_grad_time": outer["ratio"],
            f"w{width}_outer_vs_fill_time":
                outer["median_ms"] / row["fill an output of that size"]["median_ms"],
            f"w{width}_norms_vs_backprop_time": norms["ratio"],
            f"w{width}_norms_vs_backprop_temp": norms["temp_ratio"],
            f"w{width}_clipped_grad_vs_backprop_time": row["clipped_grad"]["ratio"],
            f"w{width}_clip_vmap_grad_vs_clipped_grad_time":
                row["clip jax.vmap(jax.grad)"]["median_ms"] / row["clipped_grad"]["median_ms"],
        })
    summary["goals"] = GOALS
    result = {"quick": quick, "dtype": "float32", "network": "MLP((w, w, w, 10)), relu, softmax CE",
              "rows": rows, "summary": summary, "table": markdown_table(rows, COLUMNS)}
    path = save("per_example", result, results_dir)
    print(result["table"])
    for k, v in summary.items():
        if k != "goals":
            goal = next((g for name, g in GOALS.items() if k.endswith("_" + name)), None)
            print(f"{k}: {v:.3f}" + ("" if goal is None else f" (goal <= {goal})"))
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    common.main(run, __doc__)
