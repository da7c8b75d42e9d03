"""The verifier's cost and accuracy.

- cost: loss evaluations and time of ``verify_gradient`` (directions only, and exhaustive) as a
  multiple of one jitted ``backprop`` on the same network, and the first call's seconds
  (compilation included);
- realistic: ``check_backprop`` at 784-512-512-10 (669,706 parameters, float32, directions only
  as the default chooses there): the first call and later ones, goal under 5 s (full run only);
- accuracy: max |numerical_grad - jax.grad| relative to max |jax.grad|, by dtype, for the default
  cbrt(u) step and for check_grads' fixed 1e-4 step;
- rules: tests/test_rules.py's realistic derivative rules, right and with planted bugs, through
  ``verify_rule`` and ``jax.test_util.check_grads``: bugs caught, false alarms, seconds per check;
- detection: the planted bugs of tests/test_verify.py, flagged at the right leaf, by dtype; and
  whether ``jax.test_util.check_grads`` (float32, its default tolerances) passes a correct
  gradient and flags a planted one.

The cost's ``backprop`` reference is a ``common.timeit`` dict (with ``recompiled``); the
verifier's own time is a plain median of whole calls (``verify_gradient`` is not one jitted
function: each call traces).

``--quick`` (the smoke test's mode: a few seconds) keeps every section and field but measures one
network (16-8-4) in one mode (directions), 3 repeats, and the planted bugs in float32 only.

    python -m benchmarks.verifier [--quick]
    python -m benchmarks.verifier --update benchmarks/published/cpu   # realistic and rules only
"""

import json
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
GOALS = {"planted_right_leaf_fraction": 1.0, "realistic_first_call_s": 5.0}
REALISTIC = (784, 512, 512, 10)  # 669,706 parameters


def _case(sizes, dtype, batch=16, seed=0):
    net = hbp.MLP(sizes, activation="tanh", l2=0.1)

    @jax.jit  # one compilation instead of one per eager random op
    def draw(key):
        kp, kx, ky = jax.random.split(key, 3)
        return (hbp.init_params(kp, net, dtype), jax.random.normal(kx, (batch, sizes[0]), dtype),
                jax.random.normal(ky, (batch, sizes[-1]), dtype))

    params, x, y = draw(jax.random.key(seed))
    return net, params, x, y


def _cost(sizes, repeats, modes=(False, True)):
    """Rows for ``exhaustive`` in ``modes`` (False: directions only; True: every coordinate)."""
    net, params, x, y = _case(sizes, jnp.float64)
    loss = lambda p, x, y: hbp.loss(net, p, x, y)  # noqa: E731
    grad = jax.jit(lambda p, x, y: hbp.backprop(net, p, x, y))
    timing = common.timeit(grad, params, x, y, repeats=repeats)
    one = timing["median_s"]
    rows = []
    for exhaustive in modes:
        t0 = time.perf_counter()
        hbp.verify_gradient(loss, grad, params, x, y, exhaustive=exhaustive)  # compile
        first = time.perf_counter() - t0
        times = []
        for _ in range(max(3, repeats // 4)):
            t0 = time.perf_counter()
            report = hbp.verify_gradient(loss, grad, params, x, y, exhaustive=exhaustive)
            times.append(time.perf_counter() - t0)
        rows.append({"sizes": "-".join(map(str, sizes)), "params": net.num_params,
                     "mode": "exhaustive" if exhaustive else "directions", "evaluations": report.evaluations,
                     "verify_s": float(np.median(times)), "first_call_s": first, "backprop_s": one,
                     "ratio": float(np.median(times)) / one, "ok": report.ok,
                     "backprop_timing": timing})
    return rows


def _realistic(repeats=3):
    """``check_backprop`` as a user calls it at 784-512-512-10: float32, defaults (directions
    only at that size); the first call (compilation included) and the median of later ones."""
    net = hbp.MLP(REALISTIC, activation="tanh", loss="softmax_cross_entropy")
    params = hbp.init_params(jax.random.key(0), net)
    x, y = jax.random.normal(jax.random.key(1), (16, REALISTIC[0]), jnp.float32), jnp.arange(16) % 10
    times = []
    for _ in range(1 + repeats):
        t0 = time.perf_counter()
        report = hbp.check_backprop(net, params, x, y)
        times.append(time.perf_counter() - t0)
    return {"sizes": "-".join(map(str, REALISTIC)), "params": net.num_params, "dtype": "float32",
            "exhaustive": report.exhaustive, "evaluations": report.evaluations, "ok": report.ok,
            "first_call_s": times[0], "later_call_s": float(np.median(times[1:]))}


def _accuracy(sizes):
    rows = []
    for dtype in (jnp.float32, jnp.float64):
        net, params, x, y = _case(sizes, dtype)
        f = lambda p: hbp.loss(net, p, x, y)  # noqa: E731
        auto = [np.asarray(a) for a in jax.tree.leaves(jax.jit(jax.grad(f))(params))]
        scale = max(float(np.max(np.abs(a))) for a in auto)
        for label, eps in (("cbrt(u)", None), ("fixed 1e-4", 1e-4)):
            num = jax.tree.leaves(hbp.numerical_grad(f, params, eps=eps))
            err = max(float(np.max(np.abs(np.asarray(n) - a))) for n, a in zip(num, auto))
            rows.append({"dtype": jnp.dtype(dtype).name, "step": label, "max_rel_error": err / scale})
    return rows


def _planted():
    """tests/test_verify.py, where the planted bugs live with their tests."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    import test_verify

    return test_verify


def _detection(dtypes=(jnp.float32, jnp.float64)):
    planted = _planted()
    rows = []
    for dtype in dtypes:
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


def _rule_cases(quick):
    """tests/test_rules.py's realistic rules, right and with planted bugs, through
    ``verify_rule`` (reference mode for the bfloat16 kernel) and ``jax.test_util.check_grads``
    (order 1, reverse mode, its default tolerances): verdicts and seconds per check, the first
    call (compilation) included, as a user's test pays it."""
    from jax.test_util import check_grads

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    import test_rules

    cases = test_rules.cases()
    if quick:
        cases = {k: cases[k] for k in ("tanh", "tanh, uniform 1 + 1e-5 (float64)")}
    rows = []
    for name, (f, primals, bug) in cases.items():
        ref = test_rules._mm_act if name.startswith("bfloat16") else None
        t0 = time.perf_counter()
        ours = hbp.verify_rule(f, *primals, reference=ref)
        ours_s = time.perf_counter() - t0
        failing = [row.name for row in ours.leaves if not row.ok]
        t0 = time.perf_counter()
        try:
            check_grads(f, primals, order=1, modes=["rev"])
            theirs = "pass"
        except AssertionError:
            theirs = "fail"
        theirs_s = time.perf_counter() - t0
        rows.append({"case": name, "planted_bug": bug, "handbackprop": "pass" if ours.ok else "fail",
                     "handbackprop_blocks": ", ".join(failing) or "-", "check_grads": theirs,
                     "handbackprop_s": ours_s, "check_grads_s": theirs_s})
    return rows


def _rules_table(rows):
    return common.markdown_table(rows, [
        ("case", "rule", "{}"), ("planted_bug", "planted bug", "{}"),
        ("handbackprop", "verify_rule", "{}"), ("handbackprop_blocks", "failing blocks", "{}"),
        ("check_grads", "check_grads", "{}"), ("handbackprop_s", "verify_rule s", "{:.2f}"),
        ("check_grads_s", "check_grads s", "{:.2f}")])


def _rule_summary(rows):
    bugs = [r for r in rows if r["planted_bug"]]
    right = [r for r in rows if not r["planted_bug"]]
    out = {}
    for who in ("handbackprop", "check_grads"):
        out[f"rules_{who}_bugs_caught"] = f"{sum(r[who] == 'fail' for r in bugs)} / {len(bugs)}"
        out[f"rules_{who}_false_alarms"] = f"{sum(r[who] == 'fail' for r in right)} / {len(right)}"
        out[f"rules_{who}_median_s_per_check"] = float(np.median([r[f"{who}_s"] for r in rows]))
    return out


def _summary(cost, accuracy, detection, check_grads, realistic, rules):
    """Headline figures: the largest network's cost, the FD errors, the planted bugs caught."""
    summary = {f"{r['mode']}_ratio": r["ratio"] for r in cost if r["sizes"] == cost[-1]["sizes"]}
    if realistic is not None:
        summary.update(realistic_first_call_s=realistic["first_call_s"],
                       realistic_later_call_s=realistic["later_call_s"])
    summary.update({f"fd_error_{r['dtype']}_{'cbrt' if r['step'] == 'cbrt(u)' else 'fixed'}":
                    r["max_rel_error"] for r in accuracy})
    summary["planted_right_leaf_fraction"] = sum(r["right_leaf"] for r in detection) / len(detection)
    summary["check_grads_flags_one_element"] = check_grads["one element 1e-3"] == "fail"
    summary.update(_rule_summary(rules))
    summary["goals"] = GOALS
    return summary


def run(quick: bool = False, results_dir=None) -> dict:
    """Measure, print and save (``<results>/verifier.json``): ``cost``, ``accuracy``,
    ``detection``, ``check_grads_float32``, ``summary`` (with ``goals``) and ``tables``."""
    if quick:  # one network, one mode, one dtype for the planted bugs: few compilations
        sizes, modes, repeats, det_dtypes = [(16, 8, 4)], (False,), 3, (jnp.float32,)
    else:
        sizes, modes, repeats = [(16, 8, 4), (64, 32, 10), (256, 128, 10)], (False, True), 20
        det_dtypes = (jnp.float32, jnp.float64)
    cost = [row for s in sizes for row in _cost(s, repeats, modes)]
    realistic = None if quick else _realistic()
    accuracy = _accuracy((16, 8, 4) if quick else (64, 32, 10))
    detection = _detection(det_dtypes)
    check_grads = _check_grads_float32()
    rules = _rule_cases(quick)
    tables = {
        "cost": common.markdown_table(cost, [
            ("sizes", "network", "{}"), ("params", "params", "{}"), ("mode", "mode", "{}"),
            ("evaluations", "loss evals", "{}"), ("ratio", "time / backprop", "{:.0f}x"),
            ("first_call_s", "first call (s)", "{:.2f}"), ("verify_s", "later calls (s)", "{:.3f}")]),
        "accuracy": common.markdown_table(accuracy, [
            ("dtype", "dtype", "{}"), ("step", "step", "{}"),
            ("max_rel_error", "max |FD - jax.grad| / max|g|", "{:.1e}")]),
        "detection": common.markdown_table(detection, [
            ("dtype", "dtype", "{}"), ("bug", "planted bug", "{}"), ("flagged", "flagged", "{}"),
            ("right_leaf", "at the right leaf", "{}")]),
        "rules": _rules_table(rules),
        "check_grads_float32": common.markdown_table(
            [{"gradient": k, "verdict": v} for k, v in check_grads.items()],
            [("gradient", "gradient (checker)", "{}"), ("verdict", "verdict", "{}")]),
    }
    result = {
        "quick": quick,
        "dtype": "float64 (cost), float32 and float64 (accuracy, detection)",
        "cost": cost,
        "accuracy": accuracy,
        "detection": detection,
        "check_grads_float32": check_grads,
        "realistic": realistic,
        "rules": rules,
        "summary": _summary(cost, accuracy, detection, check_grads, realistic, rules),
        "tables": tables,
    }
    path = common.save(NAME, result, results_dir)
    for title, table in tables.items():
        print(f"{title}:\n{table}\n")
    det = result["detection"]
    print(f"planted bugs flagged at the right leaf: {sum(r['right_leaf'] for r in det)} / {len(det)}")
    print(f"saved {path}")
    return result


def update(results_dir) -> dict:
    """Re-measure the ``rules`` and ``realistic`` sections only, into an existing
    ``<results>/verifier.json`` (the others kept, with their own date); ``sections_measured``
    records when each part was measured. For a shared machine where the full run cannot finish."""
    path = pathlib.Path(results_dir) / f"{NAME}.json"
    result = json.loads(path.read_text())
    kept = result.pop("environment")
    result.pop("benchmark")
    result["realistic"], result["rules"] = _realistic(), _rule_cases(False)
    result["summary"].update(_rule_summary(result["rules"]), goals=GOALS,
                             realistic_first_call_s=result["realistic"]["first_call_s"],
                             realistic_later_call_s=result["realistic"]["later_call_s"])
    result["tables"]["rules"] = _rules_table(result["rules"])
    result["sections_measured"] = {
        "cost, accuracy, detection, check_grads_float32": kept["date"],
        "realistic, rules": common.environment()["date"]}
    common.save(NAME, result, results_dir)
    print(result["tables"]["rules"])
    print({k: v for k, v in result["summary"].items() if k != "goals"})
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:
        update(sys.argv[2])
    else:
        common.main(run, __doc__)
