"""Shared benchmark protocol (DESIGN.md section 5, after the JAX docs' "Benchmarking JAX code").

Jit the outermost function, time the first (compiling) call separately, ``block_until_ready``
every result, report the median (and spread) of at least 20 repeats, and compare variants as
ratios measured in the same process on the same shapes. Every timing records ``recompiled``:
whether JAX traced or compiled anything during the timed repeats (it must be ``False``: a
steady-state time that includes compilation is wrong). Every result file records the
jax/jaxlib versions, the device, the thread count and the date.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import random
import statistics
import time
import warnings

import jax
import jax.monitoring
import numpy as np

RESULTS = pathlib.Path(os.environ.get("HANDBACKPROP_RESULTS", "benchmarks/results"))


# Every trace and backend compilation in this process, counted through jax.monitoring's events,
# so that a timing can check that its repeats compiled nothing (any function: jitted or not).
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")
_compiles = [0]


def _count_compiles(event, duration_secs, **kwargs):
    if event in _COMPILE_EVENTS:
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def compile_count() -> int:
    """How many traces and compilations JAX has done in this process so far."""
    return _compiles[0]


def device_scale() -> int:
    """How much larger default sizes should be on this backend: 1 on CPU, 8 on GPU or TPU.

    ``HANDBACKPROP_BENCH_SCALE`` overrides it (e.g. ``=1`` for CPU sizes on a GPU).
    """
    if "HANDBACKPROP_BENCH_SCALE" in os.environ:
        return int(os.environ["HANDBACKPROP_BENCH_SCALE"])
    return 1 if jax.default_backend() == "cpu" else 8


def _spread(times: list, recompiled: bool) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "iqr_s": q[2] - q[0],
        "repeats": len(times),
        "recompiled": recompiled,
    }


def environment() -> dict:
    """What the figures were measured on."""
    import jaxlib

    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "threads": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def timeit(fn, *args, repeats=20, min_seconds=0.0) -> dict:
    """Time ``fn(*args)`` (already jitted): compile call apart, then ``repeats`` timed calls.

    Returns:
      ``{"compile_s", "median_s", "min_s", "max_s", "iqr_s", "repeats", "recompiled"}``:
      ``compile_s`` is the first call (trace, compile and one run); ``recompiled`` is whether
      anything was traced or compiled during the timed calls.
    """
    return timeit_interleaved({"fn": fn}, *args, repeats=repeats, min_seconds=min_seconds)["fn"]


def timeit_interleaved(fns: dict, *args, repeats=20, min_seconds=0.0) -> dict:
    """Time several jitted variants of one computation, interleaving their repeats so that
    a noisy neighbour slows them all alike, in a fresh random order each round (seeded).
    Returns ``{name: timeit-style dict}``.

    ``repeats`` is a minimum: with ``min_seconds``, fast functions repeat until each variant
    has run about that long (estimated from one warm call), so that the median of sub-
    millisecond calls is not at the mercy of a few scheduler hiccups.
    """
    out, times, recompiled = {}, {k: [] for k in fns}, dict.fromkeys(fns, False)
    warm = 0.0
    for k, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        out[k] = {"compile_s": time.perf_counter() - t0}
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        warm = max(warm, time.perf_counter() - t0)
    repeats = max(repeats, int(min_seconds / max(warm, 1e-9)))
    order, rng = list(fns), random.Random(0)
    for _ in range(repeats):
        rng.shuffle(order)  # a fixed order would give each variant the same predecessor's caches
        for k in order:
            f = fns[k]
            compiles = compile_count()
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t0)
            recompiled[k] |= compile_count() > compiles
    for k, ts in times.items():
        if recompiled[k]:
            warnings.warn(f"{k}: JAX traced or compiled during the timed repeats; its times include it")
        out[k].update(_spread(ts, recompiled[k]))
    return out


def compiled_cost(fn, *args) -> dict:
    """XLA's own count of the work in ``fn``'s optimised program (jitted): ``{"flops", "bytes"}``.

    Two routes whose counts agree run the same arithmetic, so their time ratio is 1 up to noise.
    """
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per device
    return {"flops": float(cost["flops"]), "bytes": float(cost["bytes accessed"])}


def save(name: str, result: dict, results_dir=None) -> pathlib.Path:
    """Write ``{"benchmark": name, "environment": ..., **result}`` to ``<results>/<name>.json``."""
    folder = pathlib.Path(results_dir or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    payload = {"benchmark": name, "environment": environment(), **result}
    path.write_text(json.dumps(payload, indent=2, default=float))
    return path


def plot_power_law(ax, fit, color):
    """The fitted line ``t = exp(intercept) n^slope`` over the fit's window (log-log axes)."""
    w = np.array(fit["window"], float)
    ax.plot(w, np.exp(fit["intercept"] + fit["slope"] * np.log(w)), color=color)


def save_loglog(fig, ax, path, **labels):
    """Log-log axes with ``labels`` (xlabel, ylabel, title), a legend and a grid, saved as PNG."""
    import matplotlib.pyplot as plt

    ax.set(xscale="log", yscale="log", **labels)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def markdown_table(rows: list, columns: list) -> str:
    """A Markdown table of ``rows`` (dicts) with the given ``(key, header, format)`` columns."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt.format(r[k]) for k, _, fmt in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def main(run, doc: str, argv=None) -> dict:
    """The command line of one benchmark module, ``python -m benchmarks.<name> [--quick]
    [--results DIR]``: runs ``run(quick, results_dir)``, prints its tables and summary."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds (CPU smoke runs)")
    parser.add_argument("--results", default=None, help=f"results folder (default {RESULTS})")
    args = parser.parse_args(argv)
    result = run(quick=args.quick, results_dir=args.results)
    tables = {"": result["table"]} if "table" in result else result.get("tables", {})
    for title, table in tables.items():
        print(f"{title}\n{table}\n" if title else f"{table}\n")
    summary = dict(result.get("summary", {}))
    print("summary:", {k: v for k, v in summary.items() if k != "goals"})
    print("goals:", summary.get("goals"))
    return result
