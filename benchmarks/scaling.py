"""Data-parallel scaling: training steps per second on 1, 2 and 4 devices.

    python -m benchmarks.scaling [--quick]

One compiled epoch of :func:`handbackprop.train_epoch` with a mesh (a ``lax.scan`` of SGD
steps; each step splits its mini-batch over the mesh, ``pmean``-s the hand-written gradients
and updates the replicated parameters), the global batch fixed: strong scaling. Each device
count runs in its own subprocess, because JAX fixes its devices when it starts: on a CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, on a GPU or TPU with N of the real
devices (counts beyond the machine's are reported as skipped).

On a CPU the figures mean little: the N "devices" are slices of the same few cores, so more
devices add collectives without adding compute. The benchmark exists for GPU and TPU machines.

``--quick`` (the smoke test's mode: a few seconds) measures 1 and 2 devices in one subprocess
started with 2, on a tiny network (width 32, batch 16, 4 steps, 3 repeats); same fields.
"""

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from benchmarks import common

COUNTS = (1, 2, 4)
QUICK_COUNTS = (1, 2)  # --quick: measured together, in one subprocess
GOALS = {}  # no target: the figures depend on the machine (and mean little on a CPU)
CPU_NOTE = ("CPU run: the 'devices' are slices of the same cores (XLA's host-platform "
            "device count), so these figures mean little; the benchmark is meant for GPU and "
            "TPU machines.")
COLUMNS = [("devices", "devices", "{}"), ("steps_per_s", "steps/s", "{:.1f}"),
           ("examples_per_s", "examples/s", "{:.0f}"),
           ("speedup_ratio", "speedup vs 1", "{:.2f}"), ("compile_s", "compile s", "{:.2f}")]


def _sizes(quick):
    """(width, global batch, steps per epoch, repeats), larger on a GPU or TPU."""
    scale = common.device_scale()
    return (32, 16, 4, 3) if quick else (256 * scale, 256 * scale, 16, 20)


def measure(devices: int, quick: bool) -> dict:
    """In this process: steps per second of a data-parallel epoch on ``devices`` devices."""
    import handbackprop as hbp

    if devices > jax.device_count():
        return {"devices": devices, "skipped": f"{jax.device_count()} {jax.default_backend()} "
                                               f"devices here"}
    width, batch, steps, repeats = _sizes(quick)
    net = hbp.MLP((width, width, width, 10), loss="softmax_cross_entropy")
    opt = hbp.sgd(0.01)
    mesh = hbp.data_parallel_mesh(devices)
    kx, ky, ks = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch * steps, width), jnp.float32)
    y = jax.random.randint(ky, (batch * steps,), 0, 10)
    state = hbp.init_state(ks, net, opt)
    state, x, y = hbp.parallel.replicate((state, x, y), mesh)
    timing = common.timeit(lambda s, x, y: hbp.train_epoch(net, opt, batch, s, x, y, mesh),
                           state, x, y, repeats=repeats)  # compiled inside train_epoch
    return {"devices": devices, "width": width, "batch": batch, "steps": steps,
            "steps_per_s": steps / timing["median_s"],
            "examples_per_s": steps * batch / timing["median_s"],
            "compile_s": timing["compile_s"], "timing": timing}


def _subprocess(counts, quick):
    """``measure`` for each of ``counts`` in one fresh process that JAX starts with
    ``max(counts)`` CPU devices; a list of rows."""
    env = {**os.environ, "XLA_FLAGS": " ".join(
        [os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={max(counts)}"]
    ).strip()}
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", *map(str, counts)]
    proc = subprocess.run(cmd + ["--quick"] * quick, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False, results_dir=None) -> dict:
    """Steps per second on 1, 2 and 4 devices (1 and 2 with ``quick``); prints and saves the table.

    Returns:
      ``{"rows", "summary", "table", "note", ...}`` as saved to ``scaling.json``.
    """
    if quick:
        measured = _subprocess(QUICK_COUNTS, quick)
    else:  # one process per count: each JAX sees only the devices it measures
        measured = [row for n in COUNTS for row in _subprocess((n,), quick)]
    rows = [r for r in measured if "skipped" not in r]
    skipped = {r["devices"]: r["skipped"] for r in measured if "skipped" in r}
    base = rows[0]["steps_per_s"]
    for r in rows:
        r["speedup_ratio"] = r["steps_per_s"] / base
    backend = jax.default_backend()  # this process starts JAX only now, after the workers
    note = CPU_NOTE if backend == "cpu" else (
        f"{backend}: each device count is a mesh of that many real devices.")
    summary = {"note": note}
    summary.update({f"speedup_{r['devices']}_devices": r["speedup_ratio"] for r in rows[1:]})
    summary["goals"] = GOALS
    result = {"quick": quick, "dtype": "float32", "note": note,
              "network": "MLP((w, w, w, 10)), relu, softmax CE, SGD; global batch fixed",
              "rows": rows, "skipped": skipped, "summary": summary,
              "table": common.markdown_table(rows, COLUMNS)}
    path = common.save("scaling", result, results_dir)
    print(note)
    print(result["table"])
    for n, why in skipped.items():
        print(f"{n} devices: skipped ({why})")
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    if "--worker" in sys.argv:  # a subprocess of run(): measure these device counts, JSON out
        worker = argparse.ArgumentParser()
        worker.add_argument("--worker", type=int, nargs="+")
        worker.add_argument("--quick", action="store_true")
        args = worker.parse_args()
        print(json.dumps([measure(n, args.quick) for n in args.worker], default=float))
    else:
        common.main(run, __doc__)
