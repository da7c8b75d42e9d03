"""Per-example gradients, their norms, and DP-SGD: handbackprop against JAX's way.

Three interleaved groups (float32, jit, DESIGN.md section 5), each timed as ratios in one
process on the same shapes:

- materialised, on ``MLP((w, w, w, 10))``: ``per_example_grads`` (``"outer"`` and ``"vmap"``)
  against ``jax.vmap(jax.grad)``, all returning the B gradients (outputs, so XLA cannot fold
  them away), and the time to merely fill an output of that size.
- batch-sized, same networks: ``per_example_grad_norms``, ``clipped_grad`` and
  ``gradient_stats`` against one batch ``backprop``, and against clipping
  ``jax.vmap(jax.grad)``'s materialised gradients.
- DP-SGD steps, on the MNIST-sized MLP 784-512-512-10 and the Adult-data MLP 104-50-2 of
  Subramani et al.'s JAX DP-SGD study: ``dp_sgd_step`` against a plain SGD step (backprop,
  then ``w - eta g``) and against the canonical step that clips ``jax.vmap(jax.grad)``'s
  gradients (the JAX example's and jax_privacy's way); also the step with sigma = 0 (clipping
  alone: a known zero skips the noise) and drawing the noise alone (P normals).

On a CPU, a fresh output of B x P floats costs mostly page faults: glibc serves every
allocation above 32 MiB with a new ``mmap``, and the kernel faults it in 4 KiB at a time.
Both methods pay it, which hides their difference; so the materialised and DP-SGD groups are
measured twice, as every process gets them, and in a child process whose ``malloc`` asks for
transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc >= 2.35; skipped
elsewhere), as an accelerator's caching allocator would serve them. Temporary memory is XLA's
own count: ``jax.jit(f).lower(...).compile().memory_analysis()``.

    python -m benchmarks.per_example [--quick]
"""

import dataclasses
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import handbackprop as hbp
from benchmarks import common
from benchmarks.common import markdown_table, save, timeit_interleaved

CLIP, SIGMA, LR = 1.0, 1.1, 0.1
HUGE_PAGES = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
DP_NETS = {"mnist_mlp": (784, 512, 512, 10), "adult_mlp": (104, 50, 2)}
GOALS = {"outer_vs_vmap_grad_time": 0.5, "norms_vs_backprop_time": 1.0,
         "norms_vs_backprop_temp": 1.1, "mnist_mlp_dp_vs_sgd_step_time": 1.2,
         "adult_mlp_dp_vs_sgd_step_time": 1.5, "mnist_mlp_dp_speedup_vs_vmap_grad_dp": 20.0}


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


def _noise(tree, key):
    """N(0, I) for every leaf, one split of ``key`` each: the canonical DP step's noise."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])


def _problem(sizes, batch):
    net = hbp.MLP(sizes, activation="relu", loss="softmax_cross_entropy")
    kp, kx, ky = jax.random.split(jax.random.key(0), 3)
    params = hbp.init_params(kp, net, jnp.float32)
    x = jax.random.normal(kx, (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(ky, (batch,), 0, sizes[-1])
    return net, (params, x, y)


def _measure(group, baseline, args, timing, extra):
    """Time a dict of functions interleaved, jitted (``timing``: ``timeit_interleaved``'s
    ``repeats`` and ``min_seconds``); rows with ratios and temp memory."""
    compiled, compile_s = {}, {}
    for k, f in group.items():  # compiled once: timed and asked for its memory
        t0 = time.perf_counter()
        compiled[k] = jax.jit(f).lower(*args).compile()
        compile_s[k] = time.perf_counter() - t0
    times = timeit_interleaved(compiled, *args, **timing)
    for k, t in times.items():
        t["compile_s"] = compile_s[k]
    mem = {k: c.memory_analysis() for k, c in compiled.items()}
    return [{
        **extra, "variant": k, "baseline": baseline,
        "median_ms": 1e3 * t["median_s"], "iqr_ms": 1e3 * t["iqr_s"],
        "ratio": t["median_s"] / times[baseline]["median_s"],
        "temp_mib": mem[k].temp_size_in_bytes / 2**20,
        "temp_ratio": mem[k].temp_size_in_bytes / max(mem[baseline].temp_size_in_bytes, 1),
        "output_mib": mem[k].output_size_in_bytes / 2**20,
        "timing": t,
    } for k, t in times.items()]


def materialised(width, batch, timing, allocator="default"):
    """The B gradients: ``per_example_grads`` against ``jax.vmap(jax.grad)`` and a plain fill."""
    net, args = _problem((width, width, width, 10), batch)
    return _measure({
        "per_example_grads outer": lambda p, x, y: hbp.per_example_grads(net, p, x, y),
        "per_example_grads vmap": lambda p, x, y: hbp.per_example_grads(net, p, x, y, "vmap"),
        "jax.vmap(jax.grad)": _jax_way(net)[0],
        "fill an output of that size": lambda p, x, y: jax.tree.map(
            lambda a: jnp.full((batch,) + a.shape, x[0, 0]), p),
    }, "jax.vmap(jax.grad)", args, timing, _extra(net, batch, allocator))


def batch_sized(width, batch, timing):
    """Norms, clipped sum and statistics against one batch ``backprop``."""
    net, args = _problem((width, width, width, 10), batch)
    return _measure({
        "backprop": lambda p, x, y: hbp.backprop(net, p, x, y),
        "per_example_grad_norms": lambda p, x, y: hbp.per_example_grad_norms(net, p, x, y),
        "clipped_grad": lambda p, x, y: hbp.clipped_grad(net, p, x, y, CLIP).sum,
        "gradient_stats": lambda p, x, y: hbp.gradient_stats(net, p, x, y),
        "clip jax.vmap(jax.grad)": _jax_way(net)[1],
    }, "backprop", args, timing, _extra(net, batch, "default"))


def dp_steps(sizes, batch, timing, allocator="default"):
    """A DP-SGD step against a plain SGD step and against the ``jax.vmap(jax.grad)`` DP step."""
    net, (params, x, y) = _problem(sizes, batch)
    clipped_sum = _jax_way(net)[1]

    def vmap_grad_dp(p, x, y, key):  # clip the materialised gradients, noise the sum, average
        g = jax.tree.map(lambda s, z: (s + SIGMA * CLIP * z) / batch, clipped_sum(p, x, y),
                         _noise(p, key))
        return jax.tree.map(lambda a, b: a - LR * b, p, g)

    return _measure({
        "SGD step": lambda p, x, y, key: jax.tree.map(
            lambda a, g: a - LR * g, p, hbp.backprop(net, p, x, y)),
        "dp_sgd_step": lambda p, x, y, key: hbp.dp_sgd_step(net, p, x, y, key, LR, CLIP, SIGMA),
        "dp_sgd_step, sigma = 0": lambda p, x, y, key: hbp.dp_sgd_step(
            net, p, x, y, key, LR, CLIP, 0.0),
        "the noise alone": lambda p, x, y, key: hbp.tree_normal(key, p),  # what dp_sgd_step draws
        "DP step from jax.vmap(jax.grad)": vmap_grad_dp,
    }, "SGD step", (params, x, y, jax.random.key(1)), timing, _extra(net, batch, allocator))


def _extra(net, batch, allocator):
    return {"network": "-".join(map(str, net.sizes)), "batch": batch, "allocator": allocator}


def _plan(quick):
    """``(widths, batch, dp nets, timing)``: the full sizes (each variant timed for at least
    20 calls and about a second), or seconds' worth with ``quick``."""
    if quick:
        return (64, 128), 64, {"mnist_mlp": (64, 32, 32, 10), "adult_mlp": (104, 50, 2)}, {
            "repeats": 5}
    return (256, 512), 256, DP_NETS, {"repeats": 20, "min_seconds": 1.0}


def allocator_groups(quick, allocator="default"):
    """The groups that write B x P floats (materialised gradients, DP steps) as rows."""
    widths, batch, nets, timing = _plan(quick)
    rows = [r for w in widths for r in materialised(w, batch, timing, allocator)]
    return rows + [r for s in nets.values() for r in dp_steps(s, batch, timing, allocator)]


def _huge_pages_rows(quick):
    """:func:`allocator_groups` in a child process with huge-page ``malloc``; ``[]`` off the
    CPU (an accelerator's arrays do not come from ``malloc``) or where glibc has no such
    tunable (not Linux, or glibc < 2.35)."""
    if jax.default_backend() != "cpu":
        return []
    libc, version = platform.libc_ver()
    if libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
        print(f"huge pages: needs glibc >= 2.35, this is {libc or 'not glibc'} {version}; skipped")
        return []
    code = ("import json, sys; from benchmarks import per_example as m; "
            f"json.dump(m.allocator_groups({quick}, 'huge pages'), sys.stdout, default=float)")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **HUGE_PAGES},
                          cwd=pathlib.Path(__file__).resolve().parents[1],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the huge-pages child process failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


COLUMNS = [("network", "network", "{}"), ("batch", "B", "{}"), ("variant", "variant", "{}"),
           ("median_ms", "median ms", "{:.2f}"), ("iqr_ms", "IQR ms", "{:.2f}"),
           ("baseline", "ratio to", "{}"), ("ratio", "time ratio", "{:.3f}"),
           ("temp_mib", "temp MiB", "{:.2f}"), ("temp_ratio", "temp ratio", "{:.3f}"),
           ("output_mib", "output MiB", "{:.1f}")]


def _summary(rows, widths, nets):
    def row(network, variant, allocator="default"):
        return next(r for r in rows if (r["network"], r["variant"], r["allocator"]) ==
                    (network, variant, allocator))

    allocators = sorted({r["allocator"] for r in rows}, key=lambda a: a != "default")
    summary = {}
    for w in widths:
        net = f"{w}-{w}-{w}-10"
        for a in allocators:
            tag = "" if a == "default" else "_huge_pages"
            outer = row(net, "per_example_grads outer", a)
            summary[f"w{w}_outer_vs_fill_time{tag}"] = (
                outer["median_ms"] / row(net, "fill an output of that size", a)["median_ms"])
            summary[f"w{w}{tag}_outer_vs_vmap_grad_time"] = outer["ratio"]
        norms = row(net, "per_example_grad_norms")
        summary.update({
            f"w{w}_norms_vs_backprop_time": norms["ratio"],
            f"w{w}_norms_vs_backprop_temp": norms["temp_ratio"],
            f"w{w}_clipped_grad_vs_backprop_time": row(net, "clipped_grad")["ratio"],
            f"w{w}_clip_vmap_grad_vs_clipped_grad_time":
                row(net, "clip jax.vmap(jax.grad)")["median_ms"] / row(net, "clipped_grad")["median_ms"],
        })
    for name, sizes in nets.items():
        net = "-".join(map(str, sizes))
        for a in allocators:
            tag = "" if a == "default" else "_huge_pages"
            dp = row(net, "dp_sgd_step", a)
            summary[f"{name}{tag}_clipping_vs_sgd_step_time"] = row(net, "dp_sgd_step, sigma = 0", a)["ratio"]
            summary[f"{name}{tag}_noise_vs_sgd_step_time"] = row(net, "the noise alone", a)["ratio"]
            summary[f"{name}{tag}_dp_vs_sgd_step_time"] = dp["ratio"]
            summary[f"{name}{tag}_dp_speedup_vs_vmap_grad_dp"] = (
                row(net, "DP step from jax.vmap(jax.grad)", a)["median_ms"] / dp["median_ms"])
    return summary


def run(quick: bool = False, results_dir=None) -> dict:
    """All groups, float32, jitted; prints and saves the tables.

    Returns:
      ``{"rows", "summary" (with "goals"), "tables", ...}`` as saved to ``per_example.json``.
    """
    widths, batch, nets, timing = _plan(quick)
    rows = [r for w in widths for r in batch_sized(w, batch, timing)]
    rows += allocator_groups(quick) + _huge_pages_rows(quick)
    summary = _summary(rows, widths, nets)
    summary["goals"] = {k: v for k, v in GOALS.items() if any(s.endswith(k) for s in summary)}

    def table(keep):
        return markdown_table([r for r in rows if keep(r)], COLUMNS)

    materialised_variants = {"per_example_grads outer", "per_example_grads vmap",
                             "jax.vmap(jax.grad)", "fill an output of that size"}
    tables = {"batch-sized": table(lambda r: r["baseline"] == "backprop")}
    for a in sorted({r["allocator"] for r in rows}):
        title = "" if a == "default" else f", {a}"
        tables[f"materialised{title}"] = table(
            lambda r: r["allocator"] == a and r["variant"] in materialised_variants)
        tables[f"DP-SGD steps{title}"] = table(
            lambda r: r["allocator"] == a and r["baseline"] == "SGD step")
    result = {"quick": quick, "dtype": "float32", "batch": batch,
              "networks": {"materialised and batch-sized": [f"{w}-{w}-{w}-10" for w in widths],
                           "dp": nets},
              "activation": "relu", "loss": "softmax_cross_entropy", "clip_norm": CLIP,
              "noise_multiplier": SIGMA, "huge_pages_env": HUGE_PAGES,
              "rows": rows, "summary": summary, "tables": tables}
    path = save("per_example", result, results_dir)
    for k, v in summary.items():
        if k != "goals":
            goal = next((g for name, g in GOALS.items() if k.endswith(name)), None)
            sign = ">=" if "speedup" in k else "<="
            print(f"{k}: {v:.3f}" + ("" if goal is None else f" (goal {sign} {goal})"))
    print(f"saved {path}")
    return result



# Each panel answers "what does it cost, against what it replaces?": (baseline, title, variants).
PANELS = (
    ("backprop", "against one batch gradient (backprop)",
     ("per_example_grad_norms", "clipped_grad", "gradient_stats", "clip jax.vmap(jax.grad)")),
    ("jax.vmap(jax.grad)", "per-example gradients, against jax.vmap(jax.grad)",
     ("per_example_grads outer", "per_example_grads vmap", "fill an output of that size")),
    ("SGD step", "a DP-SGD step, against a plain SGD step",
     ("dp_sgd_step", "dp_sgd_step, sigma = 0", "the noise alone", "DP step from jax.vmap(jax.grad)")),
)


def plot(result, folder):
    """Time relative to the baseline each quantity replaces (1 = as fast), one panel per
    baseline, one bar per network; the default allocator only. Returns the PNG's path."""
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["allocator"] == "default"]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9.5, 8.5))
    for ax, (baseline, title, variants) in zip(axes, PANELS):
        networks = list(dict.fromkeys(r["network"] for r in rows if r["baseline"] == baseline))
        height = 0.8 / max(len(networks), 1)
        for k, network in enumerate(networks):
            ratio = {r["variant"]: r["ratio"] for r in rows
                     if (r["baseline"], r["network"]) == (baseline, network)}
            ys = [i + (k - (len(networks) - 1) / 2) * height for i in range(len(variants))]
            values = [ratio.get(v, float("nan")) for v in variants]
            bars = ax.barh(ys, values, height=height * 0.9, label=network)
            ax.bar_label(bars, [f"{v:.2f}x" for v in values], padding=3, fontsize=8)
        ax.axvline(1.0, color="k", lw=1)
        ax.set_xscale("log")
        ax.set_xlim(0.1, 300)
        ax.set_yticks(range(len(variants)), variants, fontsize=9)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="network",
                  title_fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel(f"time / baseline's time (log scale; left of 1 is faster), "
                        f"batch {result['batch']}, {result['dtype']}")
    fig.suptitle("What per-example quantities cost", fontsize=12)
    fig.tight_layout()
    path = pathlib.Path(folder) / "per_example.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


if __name__ == "__main__":
    common.main(run, __doc__)
