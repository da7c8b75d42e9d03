"""Curvature by the recursion against the autodiff route a JAX user writes, float32, jitted.

Two networks (tanh hidden layers, so that g'' is not zero): 784-256-256-10 with softmax
cross-entropy at batch 128 (K = 10), and 256-512-512-1 with squared error at batch 256. All
times are ratios to one ``backprop`` on the same inputs, interleaved in one process:

- ``hessian_vector_product`` against ``jax.jvp(jax.grad(loss))``: goal <= 1.0 of its time;
- ``ggn_vector_product`` against ``jax.linearize`` of the map to S^(L), ``jax.jvp(jax.grad)``
  of the loss in S (``H_S u``), and ``jax.vjp`` of the map back: goal <= 1.0 of its time;
- ``diag_ggn("mc")`` (one sample): goal <= 2.0 of a backprop;
- ``diag_ggn("exact")`` against per-example VJPs of the S^(L) map along the K columns of a
  factor of H_b, squared and summed (``lax.map`` over examples in chunks of 16, each chunk
  ``vmap``-ed over its examples and the K columns): goal >= 20x faster, and <= 3.0 of a
  backprop, at K = 10; this route is timed alone, after the others (a third of the repeats),
  since its memory traffic slows whatever runs next;
- ``kfac_factors`` (KFLR and sampled KFAC) and ``diag_hessian``: reported.

For the two products the summary also holds the ratio of XLA's own count of each route's
flops and bytes (``common.compiled_cost``): both routes compile to the same matrix products, so
their time ratio sits at 1, where run-to-run noise (about +-1% here) decides the third digit.

Then ``diag_hessian`` against ``jnp.diag(jax.hessian(loss))`` on ``MLP((w, w, w))`` (tanh,
squared error, batch 16) as the parameter count n grows, with growth exponents fitted (least
squares of log time on log n) over each method's largest three sizes, as the complexity
benchmark does. The Hessian is n x n, so the autodiff route grows as about n^2 (n HVPs of O(n)
each; it stops at 4,000 parameters, a 64 MB Hessian). With one hidden layer the recursion's
residual needs no columns (its first step down is in closed form), but this network has K = w
outputs, so the exact factor of H has w columns: O(B w^3) = O(B n^1.5). It is timed up to
10^6 parameters.

    python -m benchmarks.curvature [--quick]
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import handbackprop as hbp
from benchmarks import common
from benchmarks.complexity import fit_line, width_for
from handbackprop import curvature

DTYPE = jnp.float32
NETWORKS = {  # name: (sizes, loss, batch)
    "mnist": ((784, 256, 256, 10), "softmax_cross_entropy", 128),
    "regression": ((256, 512, 512, 1), "squared_error", 256),
}
QUICK_NETWORKS = {"mnist": ((32, 16, 16, 10), "softmax_cross_entropy", 8)}  # smoke runs: compiles dominate
GOALS = {"hvp_vs_autodiff_time": 1.0, "ggn_vp_vs_autodiff_time": 1.0, "diag_ggn_mc_vs_backprop_time": 2.0,
         "diag_ggn_exact_speedup_vs_autodiff": 20.0, "mnist_diag_ggn_exact_vs_backprop_time": 3.0}
HESSIAN_SIZES = (1e2, 3e2, 1e3, 2e3, 4e3, 3e4, 1e5, 3e5, 1e6)  # target n for the diag_hessian plot
AUTODIFF_MAX = 4e3  # the autodiff route's largest n
QUICK_HESSIAN_SIZES = (30, 100)
HESSIAN_BATCH = 16
FIT_POINTS = 3
CHUNK = 16  # examples per vmapped chunk in the autodiff route's per-example VJPs
SLOW = "autodiff diag ggn"  # some 300 backprops' time, and 100+ MB of VJPs per chunk: timed apart


def problem(sizes, loss, batch):
    net = hbp.MLP(sizes, activation="tanh", loss=loss)
    kp, kx, ky, kv = jax.random.split(jax.random.key(0), 4)
    params = hbp.init_params(kp, net, DTYPE)
    x = jax.random.normal(kx, (batch, sizes[0]), DTYPE)
    if loss == "softmax_cross_entropy":
        y = jax.random.randint(ky, (batch,), 0, sizes[-1])
    else:
        y = jax.random.normal(ky, (batch, sizes[-1]), DTYPE)
    flat, unravel = ravel_pytree(params)
    return net, params, x, y, unravel(jax.random.normal(kv, flat.shape, DTYPE))


def _s_map(net, params, x):
    return hbp.forward_cache(net, params, x).ss[-1]


def _loss_in_s(net, s, y):
    """The reduced loss as a function of S^(L) (canonical pairs: the benchmark's networks)."""
    per = net.loss_fn.value(s, net.activations[-1].fn(s), y)
    return jnp.mean(per) if net.reduction == "mean" else jnp.sum(per)


def autodiff_ggn_vp(net, params, x, y, v):
    s, jvp = jax.linearize(lambda p: _s_map(net, p, x), params)
    hu = jax.jvp(jax.grad(lambda t: _loss_in_s(net, t, y)), (s,), (jvp(v),))[1]
    return jax.vjp(lambda p: _s_map(net, p, x), params)[1](hu)[0]


def autodiff_diag_ggn(net, params, x, y):
    """Per-example VJPs of S_b^(L) along the K columns of a factor of H_b, squared and summed."""
    cache = hbp.forward_cache(net, params, x)
    factor = jnp.moveaxis(curvature.output_factor(net, cache.ss[-1], cache.xs[-1], y), 1, 0)  # (B, C, K)
    scale = 1.0 / x.shape[0] if net.reduction == "mean" else 1.0

    def one(xb, fb):
        vjp = jax.vjp(lambda p: _s_map(net, p, xb[None])[0], params)[1]
        cols = jax.vmap(lambda f: vjp(f)[0])(fb)
        return jax.tree.map(lambda c: jnp.sum(c * c, axis=0), cols)

    per = jax.lax.map(lambda a: one(*a), (x, factor), batch_size=CHUNK)
    return jax.tree.map(lambda d: scale * jnp.sum(d, axis=0), per)


def variants(net):
    loss = functools.partial(hbp.loss, net)
    key = jax.random.key(1)
    return {
        "backprop": jax.jit(lambda p, x, y, v: hbp.backprop(net, p, x, y)),
        "hessian_vector_product": jax.jit(lambda p, x, y, v: hbp.hessian_vector_product(net, p, x, y, v)),
        "autodiff hvp": jax.jit(lambda p, x, y, v: jax.jvp(jax.grad(lambda q: loss(q, x, y)), (p,), (v,))[1]),
        "ggn_vector_product": jax.jit(lambda p, x, y, v: hbp.ggn_vector_product(net, p, x, y, v)),
        "autodiff ggn vp": jax.jit(lambda p, x, y, v: autodiff_ggn_vp(net, p, x, y, v)),
        "diag_ggn mc": jax.jit(lambda p, x, y, v: hbp.diag_ggn(net, p, x, y, method="mc", key=key)),
        "diag_ggn exact": jax.jit(lambda p, x, y, v: hbp.diag_ggn(net, p, x, y)),
        "autodiff diag ggn": jax.jit(lambda p, x, y, v: autodiff_diag_ggn(net, p, x, y)),
        "kfac_factors kflr": jax.jit(lambda p, x, y, v: hbp.kfac_factors(net, p, x, y)),
        "kfac_factors kfac": jax.jit(lambda p, x, y, v: hbp.kfac_factors(net, p, x, y, kind="kfac", key=key)),
        "diag_hessian": jax.jit(lambda p, x, y, v: hbp.diag_hessian(net, p, x, y)),
    }


PAIRS = (("hessian_vector_product", "autodiff hvp", "hvp"), ("ggn_vector_product", "autodiff ggn vp", "ggn_vp"),
         ("diag_ggn exact", "autodiff diag ggn", "diag_ggn_exact"))  # (ours, the autodiff route, short name)


def _agreement(fns, args):
    """Largest deviation of each hand quantity from its autodiff route, relative to its scale."""
    out = {}
    for ours, theirs, _ in PAIRS:
        a, b = ravel_pytree(fns[ours](*args))[0], ravel_pytree(fns[theirs](*args))[0]
        out[ours] = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    return out


def network_rows(name, sizes, loss, batch, repeats):
    net, params, x, y, v = problem(sizes, loss, batch)
    fns = variants(net)
    args = (params, x, y, v)
    timing = common.timeit_interleaved({k: f for k, f in fns.items() if k != SLOW}, *args, repeats=repeats)
    # The per-example autodiff route is timed alone, after the others: interleaved with them it
    # evicts their caches and slows whichever variant follows it (the vector products' ratios
    # moved by up to 9% between runs that way); nothing it follows changes its second-long calls.
    timing[SLOW] = common.timeit(fns[SLOW], *args, repeats=max(3, repeats // 3))
    base = timing["backprop"]["median_s"]
    rows = [{"network": name, "sizes": "-".join(map(str, sizes)), "batch": batch, "variant": k,
             "median_ms": 1e3 * t["median_s"], "vs_backprop_ratio": t["median_s"] / base, "timing": t}
            for k, t in timing.items()]
    med = {k: t["median_s"] for k, t in timing.items()}
    summary = {
        f"{name}_hvp_vs_autodiff_time": med["hessian_vector_product"] / med["autodiff hvp"],
        f"{name}_ggn_vp_vs_autodiff_time": med["ggn_vector_product"] / med["autodiff ggn vp"],
        f"{name}_diag_ggn_mc_vs_backprop_time": med["diag_ggn mc"] / base,
        f"{name}_diag_ggn_exact_speedup_vs_autodiff": med[SLOW] / med["diag_ggn exact"],
        f"{name}_diag_ggn_exact_vs_backprop_time": med["diag_ggn exact"] / base,
        f"{name}_kflr_vs_backprop_time": med["kfac_factors kflr"] / base,
        f"{name}_kfac_vs_backprop_time": med["kfac_factors kfac"] / base,
        f"{name}_diag_hessian_vs_backprop_time": med["diag_hessian"] / base,
    }
    for ours, theirs, key in PAIRS[:2]:  # the products' work as XLA counts it: parity is its floor
        a, b = common.compiled_cost(fns[ours], *args), common.compiled_cost(fns[theirs], *args)
        summary[f"{name}_{key}_vs_autodiff_flops"] = a["flops"] / b["flops"]
        summary[f"{name}_{key}_vs_autodiff_bytes"] = a["bytes"] / b["bytes"]
    return rows, summary, _agreement(fns, args)


def hessian_rows(sizes, repeats):
    rows = []
    for target in sizes:
        w = width_for(target)
        net, params, x, y, _ = problem((w, w, w), "squared_error", HESSIAN_BATCH)
        flat, unravel = ravel_pytree(params)
        fns = {"diag_hessian": jax.jit(lambda p, x, y: hbp.diag_hessian(net, p, x, y))}
        if target <= AUTODIFF_MAX:
            fns["autodiff"] = jax.jit(lambda p, x, y: jnp.diag(jax.hessian(
                lambda f: hbp.loss(net, unravel(f), x, y))(ravel_pytree(p)[0])))
        t = common.timeit_interleaved(fns, params, x, y, repeats=repeats)
        rows.append({"n": net.num_params, "width": w, **t})
        print(f"curvature: diag_hessian n={net.num_params:,} " + " ".join(
            f"{k}={v['median_s']:.3g}s" for k, v in t.items()), flush=True)
    fits = {}
    for m in ("diag_hessian", "autodiff"):
        pts = [(r["n"], r[m]["median_s"]) for r in rows if m in r][-FIT_POINTS:]
        slope, intercept = fit_line(*zip(*pts))
        fits[m] = {"slope": slope, "intercept": intercept, "window": [n for n, _ in pts]}
    return rows, fits


COLUMNS = [("network", "network", "{}"), ("sizes", "sizes", "{}"), ("batch", "B", "{}"),
           ("variant", "variant", "{}"), ("median_ms", "median (ms)", "{:.3g}"),
           ("vs_backprop_ratio", "/ backprop", "{:.3f}")]


def run(quick: bool = False, results_dir=None) -> dict:
    networks = QUICK_NETWORKS if quick else NETWORKS
    repeats = 3 if quick else 60  # the vector products are near parity: 20 left a +-5% median spread
    rows, summary, agreement = [], {}, {}
    for name, (sizes, loss, batch) in networks.items():
        r, s, a = network_rows(name, sizes, loss, batch, repeats)
        rows += r
        summary.update(s)
        agreement[name] = a
        print(common.markdown_table(r, COLUMNS), flush=True)
    h_rows, fits = hessian_rows(QUICK_HESSIAN_SIZES if quick else HESSIAN_SIZES, repeats)
    summary["slope_diag_hessian"] = fits["diag_hessian"]["slope"]
    summary["slope_autodiff_diag_hessian"] = fits["autodiff"]["slope"]
    summary["goals"] = {k: v for k, v in GOALS.items() if any(s == k or s.endswith("_" + k) for s in summary)}
    h_table = common.markdown_table(
        [{"n": r["n"], "width": r["width"], "ours": f"{1e3 * r['diag_hessian']['median_s']:.3g}",
          "autodiff": f"{1e3 * r['autodiff']['median_s']:.3g}" if "autodiff" in r else "-"} for r in h_rows],
        [("n", "n params", "{:,}"), ("width", "width", "{}"), ("ours", "diag_hessian (ms)", "{}"),
         ("autodiff", "jnp.diag(jax.hessian) (ms)", "{}")])
    result = {"quick": quick, "dtype": "float32", "activation": "tanh",
              "networks": {k: {"sizes": v[0], "loss": v[1], "batch": v[2]} for k, v in networks.items()},
              "autodiff_routes": {"hvp": "jax.jvp(jax.grad(loss))",
                                  "ggn_vp": "jax.linearize(S map), jax.jvp(jax.grad(loss in S)), jax.vjp(S map)",
                                  "diag_ggn": f"lax.map over examples (chunks of {CHUNK}) of vmapped VJPs of "
                                              "S_b along the K factor columns of H_b, squared and summed",
                                  "diag_hessian": "jnp.diag(jax.hessian(loss))"},
              "agreement": agreement, "rows": rows, "hessian_rows": h_rows, "hessian_batch": HESSIAN_BATCH,
              "fits": fits, "summary": summary,
              "tables": {"ratios to one backprop": common.markdown_table(rows, COLUMNS),
                         "diag_hessian against jnp.diag(jax.hessian)": h_table}}
    path = common.save("curvature", result, results_dir)
    for k, v in summary.items():
        if k != "goals":
            goal = next((g for name, g in GOALS.items() if k == name or k.endswith("_" + name)), None)
            sign = ">=" if "speedup" in k else "<="
            print(f"{k}: {v:.3f}" + ("" if goal is None else f" (goal {sign} {goal})"))
    print(f"saved {path}")
    return result


def plot(result, folder):
    """The ratio bars, and diag_hessian's time against n beside the autodiff route's, log-log."""
    import matplotlib.pyplot as plt

    from benchmarks.run import plot_ratios

    paths = plot_ratios("curvature", {"rows": result["rows"]}, folder)
    fig, ax = plt.subplots(figsize=(7, 5))
    labels = {"diag_hessian": "diag_hessian (Hessian backpropagation)", "autodiff": "jnp.diag(jax.hessian)"}
    for m, marker in (("diag_hessian", "o"), ("autodiff", "s")):
        n = np.array([r["n"] for r in result["hessian_rows"] if m in r], float)
        t = np.array([r[m]["median_s"] for r in result["hessian_rows"] if m in r])
        fit = result["fits"][m]
        line = ax.plot(n, t, marker, label=f"{labels[m]}: exponent {fit['slope']:.2f}")[0]
        common.plot_power_law(ax, fit, line.get_color())
    path = common.save_loglog(
        fig, ax, folder / "curvature_diag_hessian.png", xlabel="number of parameters n", ylabel="median time (s)",
        title=f"Exact Hessian diagonal, MLP((w, w, w)), batch {result['hessian_batch']}, {result['dtype']}")
    return paths + [path]


if __name__ == "__main__":
    common.main(run, __doc__)
