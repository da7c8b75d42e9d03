"""Smoke test of the benchmarks: ``python -m benchmarks --quick`` into a temporary folder.

Runs every benchmark of ``run.BENCHMARKS`` and checks the files and their fields (JSON per
benchmark with its environment, summary and goals, tables, timings and the re-compilation check,
summary.md, PNG plots, the README block), never the timings. A benchmark may be skipped only for
a reason the runner documents: an optional package (``run.OPTIONAL``) that is not installed;
likewise the training benchmark leaves out PyTorch only when ``torch`` is not installed.
"""

import datetime
import importlib.util
import json
import os
import pathlib
import platform
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
# Every benchmark: each --quick mode takes seconds on two cores (about a minute in all).
SMOKE = runner.BENCHMARKS
pytestmark = pytest.mark.xdist_group("benchmarks")  # one test process: the smoke run's fixture, once


def installed(module) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run the benchmarks in --quick mode, in a fresh process (as a user would), once."""
    folder = tmp_path_factory.mktemp("results")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--results", str(folder),
                           "--only", *SMOKE],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    index = json.loads((folder / "index.json").read_text())
    return folder, {o["name"]: o for o in index["outcomes"]}


@pytest.mark.slow
def test_every_benchmark_ran_or_was_rightly_skipped(results):
    folder, outcomes = results
    assert set(outcomes) == set(runner.BENCHMARKS)
    for name, o in outcomes.items():
        assert (ROOT / "benchmarks" / f"{name}.py").exists(), name
        if o["status"] == "skipped":  # only for an optional package that is really not installed
            absent = [m for m in runner.OPTIONAL if not installed(m)]
            assert any(o["reason"] == f"needs {runner.OPTIONAL[m]} (`{m}`), not installed"
                       for m in absent), o
        else:
            assert o["status"] == "ok", o
            untimed = json.loads((folder / f"{name}.json").read_text()).get("timed") is False
            assert o["reason"] == "untimed: figures other than speed" if untimed else o[
                "reason"].endswith("none re-compiled after warm-up (checked)"), o
    for name in ("backprop_vs_autodiff", "complexity", "per_example", "scaling", "verifier"):
        assert outcomes[name]["status"] == "ok", outcomes[name]  # no optional package needed


@pytest.mark.slow
def test_json_is_well_formed(results):
    folder, outcomes = results
    for name in (n for n, o in outcomes.items() if o["status"] == "ok"):
        payload = json.loads((folder / f"{name}.json").read_text())
        assert payload["benchmark"] == name
        env = payload["environment"]
        assert ENVIRONMENT <= set(env), (name, ENVIRONMENT - set(env))
        assert env["device_count"] >= 1 and env["threads"] >= 1 and env["device_kind"]
        datetime.datetime.fromisoformat(env["date"])
        assert payload["quick"] is True and payload["dtype"]
        summary = payload["summary"]
        assert isinstance(summary["goals"], dict), name
        for goal in summary["goals"]:  # a goal names its figure, or the end of its name
            assert any(k == goal or k.endswith("_" + goal) for k in summary if k != "goals"), (name, goal)
        assert set(summary) - {"goals"}, f"{name}: no headline figures"
        tables = payload["tables"] if "tables" in payload else {"": payload["table"]}
        assert tables and all(isinstance(t, str) and "|---" in t for t in tables.values()), name
        timings = list(runner.timings(payload))
        assert timings or payload.get("timed") is False, f"{name}: no timing dicts"
        for path, timing in timings:
            assert TIMING <= set(timing), (name, path, TIMING - set(timing))
            assert timing["recompiled"] is False, (name, path)
            assert timing["repeats"] >= 3 and timing["median_s"] > 0


def _payload(results, name):
    folder, outcomes = results
    if outcomes[name]["status"] != "ok":
        pytest.skip(f"{name}: {outcomes[name]['reason']}")
    return json.loads((folder / f"{name}.json").read_text())


@pytest.mark.slow
def test_training_figures(results):
    payload = _payload(results, "training")
    libraries = [r["library"] for r in payload["rows"]]
    # PyTorch is left out only when it is not installed (the runner says so), never otherwise.
    assert libraries == ["handbackprop", "scikit-learn"] + ["pytorch"] * installed("torch")
    assert set(payload["timings"]) == set(libraries)
    for r in payload["rows"]:
        assert {"samples_per_s", "speedup_ratio", "train_s", "first_run_s", "test_accuracy"} <= set(r)
        assert 0 <= r["test_accuracy"] <= 1
    assert {"speedup_vs_sklearn", "accuracy_handbackprop"} <= set(payload["summary"])
    assert ("speedup_vs_torch" in payload["summary"]) == installed("torch")
    assert {"epochs", "batch_size", "sizes", "train_examples"} <= set(payload)
    summary = payload["summary"]
    assert 0 < summary["flop_rate_fraction"] == pytest.approx(
        summary["handbackprop_gflops"] / summary["numpy_one_thread_gflops"])


@pytest.mark.slow
def test_per_example_figures(results):
    payload = _payload(results, "per_example")
    libc, version = platform.libc_ver()
    huge = libc == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
    allocators = ["default"] + ["huge pages"] * huge
    want = {"batch-sized"} | {f"{g}{'' if a == 'default' else ', ' + a}"
                              for g in ("materialised", "DP-SGD steps") for a in allocators}
    assert set(payload["tables"]) == want
    dp_rows = [r for r in payload["rows"] if r["baseline"] == "SGD step"]
    assert {(r["network"], r["variant"], r["allocator"]) for r in dp_rows} == {
        ("-".join(map(str, sizes)), v, a) for sizes in payload["networks"]["dp"].values()
        for v in ("SGD step", "dp_sgd_step", "dp_sgd_step, sigma = 0", "the noise alone",
                  "DP step from jax.vmap(jax.grad)") for a in allocators}
    summary = payload["summary"]
    for name in ("mnist_mlp", "adult_mlp"):
        assert {f"{name}_dp_vs_sgd_step_time", f"{name}_clipping_vs_sgd_step_time",
                f"{name}_dp_speedup_vs_vmap_grad_dp"} <= set(summary)
    assert ("w64_huge_pages_outer_vs_vmap_grad_time" in summary) == huge


@pytest.mark.slow
def test_accuracy_figures(results):
    payload = _payload(results, "accuracy")
    from benchmarks.accuracy import SETS

    # --quick: 2 split seeds x 1 training seed, both libraries, every data set.
    assert sorted((r["dataset"], r["split"], r["library"]) for r in payload["rows"]) == sorted(
        (d, s, lib) for d in SETS for s in (0, 1) for lib in ("handbackprop", "scikit-learn"))
    for r in payload["rows"]:
        assert r["metric"] == ("r2" if r["dataset"] == "diabetes" else "accuracy")
        assert len(r["scores"]) == 1 and r["scores"][0] <= 1
        assert r["metric"] == "r2" or r["scores"][0] >= 0
    summary = payload["summary"]
    for d in SETS:
        ours = next(r for r in payload["rows"] if (r["dataset"], r["split"], r["library"]) ==
                    (d, 0, "handbackprop"))
        assert summary[f"{d}_default_run"] == ours["scores"][0]
        assert {f"{d}_handbackprop_mean", f"{d}_scikit_learn_mean"} <= set(summary)


@pytest.mark.slow
def test_verifier_figures(results):
    payload = _payload(results, "verifier")
    assert set(payload["tables"]) == {"cost", "accuracy", "detection", "rules", "check_grads_float32"}
    assert payload["cost"] and all({"sizes", "mode", "evaluations", "ratio", "backprop_timing"}
                                   <= set(r) for r in payload["cost"])
    assert {(r["dtype"], r["step"]) for r in payload["accuracy"]} == {
        (d, s) for d in ("float32", "float64") for s in ("cbrt(u)", "fixed 1e-4")}
    assert payload["detection"] and all({"dtype", "bug", "flagged", "right_leaf"} <= set(r)
                                        for r in payload["detection"])
    assert set(payload["check_grads_float32"].values()) <= {"pass", "fail"}
    assert {"planted_right_leaf_fraction", "directions_ratio", "fd_error_float32_cbrt",
            "rules_handbackprop_bugs_caught", "rules_check_grads_bugs_caught"} <= set(payload["summary"])
    assert payload["rules"] and all({"handbackprop", "check_grads"} <= set(r) for r in payload["rules"])


@pytest.mark.slow
def test_scaling_figures(results):
    payload = _payload(results, "scaling")
    # --quick: 1 and 2 devices, measured in one subprocess (on a CPU, started with 2 devices).
    measured = [r["devices"] for r in payload["rows"]]
    assert sorted(measured + [int(n) for n in payload["skipped"]]) == [1, 2] and measured[0] == 1
    for r in payload["rows"]:
        assert {"steps_per_s", "examples_per_s", "speedup_ratio", "compile_s", "timing"} <= set(r)
    assert payload["note"] and ("speedup_2_devices" in payload["summary"]) == (2 in measured)


@pytest.mark.slow
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


@pytest.mark.slow
def test_curvature_figures(results):
    payload = _payload(results, "curvature")
    from benchmarks.curvature import PAIRS

    for name in payload["networks"]:
        # float32 against its autodiff route, relative to the quantity's largest entry: the two
        # sum the same products in other orders (measured 1-3 eps here and at full size), so
        # 64 eps (7.6e-6) bounds the rounding; a missing or wrong term is of order 1.
        assert set(payload["agreement"][name]) == {ours for ours, *_ in PAIRS}
        assert all(err < 64 * 2.0 ** -23 for err in payload["agreement"][name].values()), payload["agreement"]
        for _, _, key in PAIRS[:2]:  # XLA's count of the work: the autodiff route's (measured within 0.2%)
            for unit in ("flops", "bytes"):
                ratio = payload["summary"][f"{name}_{key}_vs_autodiff_{unit}"]
                assert abs(ratio - 1) < 0.05, (name, key, unit, ratio)
    assert {"slope_diag_hessian", "slope_autodiff_diag_hessian"} <= set(payload["summary"])
    assert [r["n"] for r in payload["hessian_rows"]] == sorted(r["n"] for r in payload["hessian_rows"])


@pytest.mark.slow
def test_summary_and_plots(results):
    folder, outcomes = results
    summary = (folder / "summary.md").read_text()
    assert "complexity.png" in [p for o in outcomes.values() for p in o["plots"]]
    for name, o in outcomes.items():
        assert f"| {name} | {o['status']} |" in summary
        if o["status"] == "ok":
            assert f"## {name}" in summary
            assert o["plots"] and all(p.startswith(name) and p.endswith(".png") for p in o["plots"]), o
            assert all(f"]({p})" in summary for p in o["plots"]), name
        for png in o["plots"]:
            data = (folder / png).read_bytes()
            assert data.startswith(PNG) and len(data) > 1000, png


@pytest.mark.slow
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


@pytest.mark.slow
def test_replot_redraws_the_plots_from_the_saved_json(results, tmp_path):
    folder, outcomes = results
    for name in ("per_example", "training", "accuracy"):
        (tmp_path / f"{name}.json").write_bytes((folder / f"{name}.json").read_bytes())
    assert runner.main(["--replot", "--results", str(tmp_path)]) == 0  # nothing is rerun
    drawn = sorted(p.name for p in tmp_path.glob("*.png"))
    assert drawn == ["accuracy.png", "per_example.png", "training.png"]
    assert all((tmp_path / p).read_bytes().startswith(PNG) for p in drawn)


@pytest.mark.slow
def test_plots_root_makes_links_relative_to_it(results, tmp_path):
    folder, _ = results
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text(f"{readme_table.START}\n{readme_table.END}\n")
    readme_table.main([str(folder), "--write", str(page), "--plots", "--plots-root", str(tmp_path)])
    link = f"]({pathlib.Path(os.path.relpath(folder, tmp_path)).as_posix()}/complexity.png)"
    assert link in page.read_text()


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
