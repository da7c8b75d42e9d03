"""Smoke test of the benchmarks: ``python -m benchmarks --quick`` into a temporary folder.

Checks the files and their fields (JSON per benchmark with its environment, the re-compilation
check, summary.md, PNG plots, the README block), never the timings.
"""

import datetime
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import common
from benchmarks import readme_table
from benchmarks import run as runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
ENVIRONMENT = {"date", "jax", "jaxlib", "backend", "device_kind", "device_count", "threads"}
TIMING = {"compile_s", "median_s", "min_s", "max_s", "iqr_s", "repeats", "recompiled"}
# The benchmarks whose --quick mode takes seconds on two cores; add training and verifier
# (runner.BENCHMARKS) once theirs do: the whole run must stay under a minute.
SMOKE = ("backprop_vs_autodiff", "complexity", "per_example")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the benchmarks in --quick mode, in a fresh process (as a user would), once."""
    folder = tmp_path_factory.mktemp("results")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--results", str(folder),
                           "--only", *SMOKE],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    index = json.loads((folder / "index.json").read_text())
    return folder, {o["name"]: o for o in index["outcomes"]}


def test_every_benchmark_ran_or_was_rightly_skipped(results):
    _, outcomes = results
    assert set(outcomes) == set(SMOKE) and set(SMOKE) <= set(runner.BENCHMARKS)
    for name, o in outcomes.items():
        missing = not (ROOT / "benchmarks" / f"{name}.py").exists()
        optional_absent = any(importlib.util.find_spec(m) is None for m in runner.OPTIONAL)
        if o["status"] == "skipped":
            assert missing or optional_absent, o
        else:
            assert o["status"] == "ok", o
    assert outcomes["complexity"]["status"] == "ok"
    assert outcomes["backprop_vs_autodiff"]["status"] == "ok"


def test_json_is_well_formed(results):
    folder, outcomes = results
    for name in (n for n, o in outcomes.items() if o["status"] == "ok"):
        payload = json.loads((folder / f"{name}.json").read_text())
        assert payload["benchmark"] == name
        env = payload["environment"]
        assert ENVIRONMENT <= set(env), (name, ENVIRONMENT - set(env))
        assert env["device_count"] >= 1 and env["threads"] >= 1 and env["device_kind"]
        datetime.datetime.fromisoformat(env["date"])
        assert payload["quick"] is True
        assert set(payload) - {"benchmark", "environment", "quick"}, f"{name}: no figures"
        for path, timing in runner.timings(payload):
            assert TIMING <= set(timing), (name, path, TIMING - set(timing))
            assert timing["recompiled"] is False, (name, path)
            assert timing["repeats"] >= 1 and timing["median_s"] > 0


def test_complexity_figures(results):
    folder, _ = results
    payload = json.loads((folder / "complexity.json").read_text())
    from benchmarks.complexity import METHODS

    assert len(payload["rows"]) >= 3
    for row in payload["rows"]:
        assert {"n", "width", "batch", "dispatch_s", "backprop", "jax_grad"} <= set(row)
    assert all(m in payload["rows"][0] for m in METHODS)  # every method ran at the smallest size
    for m in METHODS:
        assert {"slope", "slope_all", "window", "local"} <= set(payload["fits"][m])
        assert f"slope_{m}" in payload["summary"]
    assert all(err < 0.1 for err in payload["agreement_at_smallest_n"].values())
    assert payload["fit_rule"] and payload["repeats_note"] and "| n weights |" in payload["table"]


def test_summary_and_plots(results):
    folder, outcomes = results
    summary = (folder / "summary.md").read_text()
    assert "complexity.png" in [p for o in outcomes.values() for p in o["plots"]]
    for name, o in outcomes.items():
        assert f"| {name} | {o['status']} |" in summary
        if o["status"] == "ok":
            assert f"## {name}" in summary
        for png in o["plots"]:
            data = (folder / png).read_bytes()
            assert data.startswith(PNG) and len(data) > 1000, png


def test_readme_block(results, tmp_path):
    folder, _ = results
    device = json.loads((folder / "complexity.json").read_text())["environment"]["device_kind"]
    block = readme_table.render(folder)
    assert block.startswith(readme_table.START) and block.rstrip().endswith(readme_table.END)
    assert f"Measured on {device}" in block and "### complexity" in block

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nBefore.\n\n{readme_table.START}\nstale\n{readme_table.END}\n\nAfter.\n")
    readme_table.main([str(folder), "--write", str(readme), "--plots"])
    text = readme.read_text()
    assert text.startswith("# Title\n\nBefore.\n\n") and text.endswith("\n\nAfter.\n")
    assert "stale" not in text and f"Measured on {device}" in text and ".png)" in text
    readme_table.main([str(folder), "--write", str(readme)])  # idempotent: markers survive
    assert readme.read_text().count(readme_table.START) == 1

    readme.write_text("# No markers\n")
    with pytest.raises(SystemExit, match="benchmarks:start"):
        readme_table.main([str(folder), "--write", str(readme)])


def test_timeit_detects_recompilation():
    x = jnp.ones(3, jnp.float32)
    steady = common.timeit(jax.jit(jnp.sin), x, repeats=3)
    assert steady["recompiled"] is False and steady["repeats"] == 3
    retraced = lambda a: jax.jit(lambda b: b + 1)(a)  # noqa: E731  (a new function each call)
    with pytest.warns(UserWarning, match="compiled during the timed repeats"):
        timings = common.timeit_interleaved({"steady": jax.jit(jnp.cos), "retraced": retraced}, x, repeats=2)
    assert timings["retraced"]["recompiled"] is True and timings["steady"]["recompiled"] is False


def test_runner_skips_a_missing_module(tmp_path):
    outcome = runner.run_one("no_such_benchmark", True, tmp_path)
    assert outcome["status"] == "skipped" and "no_such_benchmark.py" in outcome["reason"]
