"""Run the benchmarks and write a results folder: one JSON per benchmark, PNG plots,
``summary.md``, and ``index.json`` (what ran, was skipped or failed, and why).

    python -m benchmarks [--quick | --full] [--only NAME ...] [--results DIR]
    python -m benchmarks --replot --results benchmarks/published/cpu   # plots from saved JSON

Each benchmark is a module ``benchmarks/<name>.py`` with ``run(quick, results_dir) -> dict``
that saves its JSON through ``common.save``, and optionally ``plot(result, folder) -> [paths]``;
without one, the runner plots the ratios in its ``rows``. A benchmark whose module is not there,
or that needs an optional package that is not installed (PyTorch, scikit-learn), is skipped with
a message; one that fails is reported and the others still run (the exit status is then 1).
"""

import argparse
import importlib
import json
import pathlib
import sys
import time
import traceback

import matplotlib

matplotlib.use("Agg")  # files only, no display

from benchmarks import common  # noqa: E402
from benchmarks import readme_table  # noqa: E402

BENCHMARKS = (
    "accuracy",  # the default training run's test metrics over splits and seeds, vs scikit-learn
    "backprop_vs_autodiff",  # hand backprop vs jax.grad over a shape grid; FLOP-rate fraction
    "complexity",  # the whole gradient: linear (backprop, jax.grad) vs quadratic (finite differences)
    "curvature",  # GGN / Hessian products, diagonals, KFAC against the autodiff routes
    "per_example",  # per-example gradients, norms and DP-SGD
    "scaling",  # data-parallel steps per second on 1, 2, 4 devices (meaningful on GPU/TPU)
    "training",  # training against scikit-learn and PyTorch
    "verifier",  # the verifier's cost and accuracy
)
OPTIONAL = {"torch": "PyTorch", "sklearn": "scikit-learn"}  # import name -> what to install


def timings(tree, path=""):
    """``(path, timing)`` for every ``common.timeit``-style dict (with ``median_s``) in a result."""
    if isinstance(tree, dict):
        if "median_s" in tree:
            yield path, tree
        for k, v in tree.items():
            yield from timings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from timings(v, f"{path}[{i}]")


def _ratio_tables(result):
    """``(key, rows, ratio fields)`` for each list of row dicts in a result with ``*ratio*`` figures."""
    for key, rows in result.items():
        rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
        fields = sorted({k for r in rows for k, v in r.items()
                         if "ratio" in k and isinstance(v, (int, float)) and not isinstance(v, bool)})
        if fields:
            yield key, rows, fields


def plot_ratios(name, result, folder) -> list:
    """The default plot: for each table of rows, one bar per row for every ``*ratio*`` figure,
    with the parity line at 1. Writes ``<name>.png`` (rows under ``rows``) or ``<name>_<key>.png``."""
    import matplotlib.pyplot as plt

    paths = []
    for key, rows, fields in _ratio_tables(result):
        label = lambda r: " ".join(f"{k}={v}" for k, v in r.items()  # noqa: E731
                                   if isinstance(v, (int, str)) and not isinstance(v, bool))
        fig, axes = plt.subplots(1, len(fields), figsize=(3 + 4 * len(fields), 0.3 * len(rows) + 1.5),
                                 squeeze=False, sharey=True)
        axes[0, 0].set_yticks(range(len(rows)), [label(r) for r in rows], fontsize=7)
        axes[0, 0].invert_yaxis()
        for ax, field in zip(axes[0], fields):
            values = [r.get(field, float("nan")) for r in rows]
            ax.barh(range(len(rows)), values)
            ax.axvline(1.0, color="k", ls="--", lw=1)
            positive = [v for v in values if v > 0]
            if positive and max(positive) / min(positive) > 10:
                ax.set_xscale("log")
            ax.set(xlabel=field, title=f"{name}: {field}" + ("" if key == "rows" else f" ({key})"))
        path = pathlib.Path(folder) / (f"{name}.png" if key == "rows" else f"{name}_{key}.png")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def run_one(name, quick, folder) -> dict:
    """Run one benchmark; returns its outcome: status ``ok``, ``skipped`` or ``failed`` and why."""
    t0 = time.perf_counter()
    outcome = {"name": name, "status": "ok", "reason": "", "plots": []}
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        result = module.run(quick=quick, results_dir=folder)
        path = folder / f"{name}.json"
        if not path.exists():  # a module that returned its result without saving it
            common.save(name, result, folder)
        result = json.loads(path.read_text())
        plot = getattr(module, "plot", None) or (lambda r, f: plot_ratios(name, r, f))
        outcome["plots"] = [pathlib.Path(p).name for p in plot(result, folder)]
        checked = [(p, t["recompiled"]) for p, t in timings(result) if "recompiled" in t]
        bad = [p for p, recompiled in checked if recompiled]
        outcome["reason"] = (
            f"re-compiled during the timed repeats: {', '.join(bad)}" if bad
            else f"{len(checked)} timings, none re-compiled after warm-up (checked)" if checked
            else "untimed: figures other than speed" if result.get("timed") is False
            else "re-compilation not recorded (no timing dicts with 'recompiled' in the JSON)")
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if e.name == f"benchmarks.{name}":
            outcome.update(status="skipped", reason=f"no benchmarks/{name}.py")
        elif top in OPTIONAL:
            outcome.update(status="skipped", reason=f"needs {OPTIONAL[top]} (`{top}`), not installed")
        else:
            traceback.print_exc()
            outcome.update(status="failed", reason=f"{type(e).__name__}: {e}")
    except Exception as e:  # report it, run the others
        traceback.print_exc()
        outcome.update(status="failed", reason=f"{type(e).__name__}: {e}")
    outcome["seconds"] = time.perf_counter() - t0
    return outcome


def replot(names, folder) -> list:
    """Redraw the plots of the saved results in ``folder`` (no benchmark is run); their paths."""
    paths = []
    for name in names:
        path = pathlib.Path(folder) / f"{name}.json"
        if path.exists():
            module = importlib.import_module(f"benchmarks.{name}")
            plot = getattr(module, "plot", None) or (lambda r, f: plot_ratios(name, r, f))
            paths += plot(json.loads(path.read_text()), folder)
    return paths


def summary(outcomes, folder, quick) -> str:
    """``summary.md``: what ran and on what, then each benchmark's figures, table and plots."""
    lines = ["# handbackprop benchmarks", "",
             f"`python -m benchmarks {'--quick' if quick else '--full'}` on "
             f"{readme_table.measured_on(common.environment())}.", "",
             "| benchmark | status | seconds | notes |", "|---|---|---:|---|"]
    lines += [f"| {o['name']} | {o['status']} | {o['seconds']:.1f} | {o['reason']} |" for o in outcomes]
    for o in outcomes:
        if o["status"] == "ok":
            result = json.loads((folder / f"{o['name']}.json").read_text())
            lines += ["", readme_table.section(result, level=2, plots=o["plots"])]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, seconds each (CPU smoke runs)")
    size.add_argument("--full", action="store_true", help="the full sizes (the default)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only these, of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--results", default=str(common.RESULTS), help="results folder (default %(default)s)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plots from the JSON already in the results folder")
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.results)
    if args.replot:
        for path in replot(args.only or BENCHMARKS, folder):
            print(f"wrote {path}")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for name in args.only or BENCHMARKS:
        print(f"== {name}", flush=True)
        outcomes.append(run_one(name, args.quick, folder))
        o = outcomes[-1]
        print(f"== {name}: {o['status']} ({o['seconds']:.1f} s) {o['reason']}", flush=True)
    index = {"quick": args.quick, "environment": common.environment(), "outcomes": outcomes}
    (folder / "index.json").write_text(json.dumps(index, indent=2))
    (folder / "summary.md").write_text(summary(outcomes, folder, args.quick))
    print(f"wrote {folder / 'summary.md'} and {folder / 'index.json'}")
    return 1 if any(o["status"] == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
