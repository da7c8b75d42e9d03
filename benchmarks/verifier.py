"""The verifier's cost and accuracy.

- cost: loss evaluations and time of ``verify_gradient`` (directions only, and exhaustive) as a
  multiple of one jitted ``backprop`` on the same network;
- accuracy: max |numerical_grad - jax.grad| relative to max |jax.grad|, by dtype, for the default
  cbrt(u) step and for check_grads' fixed 1e-4 step;
- detection: the planted bugs of tests/test_verify.py, flagged at the right leaf, by dtype; and
  whether ``jax.test_util.check_grads`` (float32, its default tolerances) passes a correct
  gradient and flags a planted one.

    python -m benchmarks.verifier [--quick]
"""

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import handbackprop as hbp  # noqa: E402
from benchmarks import common  # noqa: E402

NAME = "verifier"


def _case(sizes, dtype, batch=16, seed=0):
    net = hbp.MLP(sizes, activation="tanh", l2=0.1)
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    params = hbp.init_params(kp, net, dtype)
    x = jax.random.normal(kx, (batch, sizes[0]), dtype)
    y = jax.random.normal(ky, (batch, sizes[-1]), dtype)
    return net, params, x, y


def _cost(sizes, repeats):
    net, params, x, y = _case(sizes, jnp.float64)
    loss = lambda p, x, y: hbp.loss(net, p, x, y)  # noqa: E731
    grad = jax.jit(lambda p, x, y: hbp.backprop(net, p, x, y))
    one = common.timeit(grad, params, x, y, repeats=repeats)["median_s"]
    rows = []
    for exhaustive in (False, True):
        hbp.verify_gradient(loss, grad, params, x, y, exhaustive=exhaustive)  # compile
        times = []
        for _ in range(max(3, repeats // 4)):
            t0 = time.perf_counter()
            report = hbp.verify_gradient(loss, grad, params, x, y, exhaustive=exhaustive)
            times.append(time.perf_counter() - t0)
        rows.append({"sizes": "-".join(map(str, sizes)), "params": net.num_params,
                     "mode": "exhaustive" if exhaustive else "directions", "evaluations": report.evaluations,
                     "verify_s": float(np.median(times)), "backprop_s": one,
                     "ratio": float(np.median(times)) / one, "ok": report.ok})
    return rows


def _accuracy(sizes):
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        net, params, x, y = _case(sizes, dtype)
        f = lambda p: hbp.loss(net, p, x, y)  # noqa: E731
        auto = jax.grad(f)(params)
        scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(auto))
        for label, eps in (("cbrt(u)", None), ("fixed 1e-4", 1e-4)):
            num = hbp.numerical_grad(f, params, eps=eps)
            err = max(float(jnp.max(jnp.abs(n - a))) for n, a in zip(jax.tree.leaves(num), jax.tree.leaves(auto)))
            rows.append({"dtype": jnp.dtype(dtype).name, "step": label, "max_rel_error": err / scale})
    return rows


def _planted():
    """tests/test_verify.py, where the planted bugs live with their tests."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    import test_verify

    return test_verify


def _detection():
    planted = _planted()
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        params, x, y = planted._setup(planted.NET, dtype)
        for bug, (fn, culprits) in sorted(planted.PLANTED.items()):
            report = hbp.verify_gradient(planted._loss, fn, params, x, y)
            flagged = {leaf.name for leaf in report.leaves if not leaf.ok}
            rows.append({"dtype": jnp.dtype(dtype).name, "bug": bug, "flagged": not report.ok,
                         "right_leaf": flagged == culprits})
    return rows


def _check_grads_float32():
    """jax.test_util.check_grads (fixed step 1e-4, tolerances scaled for float32) on our net."""
    from jax.test_util import check_grads

    planted = _planted()
    params, x, y = planted._setup(planted.NET, jnp.float32)
    out = {}
    for label, fn in (("correct", planted._grad), ("one element 1e-3", planted._one_element),
                      ("missing L2", planted._missing_l2)):
        # check_grads checks jax's own derivative; wrap the hand gradient as a custom_vjp.
        @jax.custom_vjp
        def f(p):
            return planted._loss(p, x, y)

        f.defvjp(lambda p: (f(p), p), lambda p, g: (jax.tree.map(lambda t: g * t, fn(p, x, y)),))
        try:
            check_grads(f, (params,), order=1, modes=["rev"])
            out[label] = "pass"
        except AssertionError:
            out[label] = "fail"
        out[label + " (handbackprop)"] = "pass" if hbp.verify_gradient(
            planted._loss, fn, params, x, y).ok else "fail"
    return out


def run(quick: bool = False, results_dir=None) -> dict:
    sizes = [(16, 8, 4)] if quick else [(16, 8, 4), (64, 32, 10), (256, 128, 10)]
    cost = [row for s in sizes for row in _cost(s, 5 if quick else 20)]
    result = {
        "cost": cost,
        "accuracy": _accuracy((16, 8, 4) if quick else (64, 32, 10)),
        "detection": _detection(),
        "check_grads_float32": _check_grads_float32(),
    }
    path = common.save(NAME, result, results_dir)
    print(common.markdown_table(cost, [("sizes", "network", "{}"), ("params", "params", "{}"),
                                       ("mode", "mode", "{}"), ("evaluations", "loss evals", "{}"),
                                       ("ratio", "time / backprop", "{:.0f}x")]))
    print()
    print(common.markdown_table(result["accuracy"], [("dtype", "dtype", "{}"), ("step", "step", "{}"),
                                                     ("max_rel_error", "max |FD - jax.grad| / max|g|", "{:.1e}")]))
    det = result["detection"]
    print(f"\nplanted bugs flagged at the right leaf: {sum(r['right_leaf'] for r in det)} / {len(det)}")
    print("check_grads (float32) vs handbackprop:", result["check_grads_float32"])
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (seconds)")
    run(**vars(parser.parse_args()))
