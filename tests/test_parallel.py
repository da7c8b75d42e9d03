"""Data parallelism: sharded gradients, clipping, DP-SGD and training equal their one-device
counterparts; two processes train like one; clear errors before any computation.

The multi-device cases run in subprocesses (``tests/parallel_worker.py``), so that this process
keeps its one CPU device: one subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
computes every sharded result next to its single-device counterpart (JAX starts once), and two
subprocesses of two CPU devices each train together through ``jax.distributed`` and gloo.

Tolerances. A sharded sum adds the same products as the one-device sum, grouped per shard and
then across shards: only the rounding of the additions differs, a few ulps of the largest
partial sum. So each leaf must agree to ``tol * max|leaf|`` with tol = 2e-6 (~16 ulps) in
float32 and 1e-12 in float64. Training compounds that over its 12 steps (momentum 0.9 carries
an error for ~10 more): 2e-5 in float32, 1e-12 in float64. A wrong reduction (psum for pmean,
a missing or doubled L2 term, noise per device) is off by O(1).
"""

import contextlib
import importlib.util
import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, make_problem

import handbackprop as hbp
from handbackprop import cli, parallel

WORKER = pathlib.Path(__file__).with_name("parallel_worker.py")
TIMEOUT_S = 240  # generous: a busy two-core machine; a hung collective must not hang the suite
TOL = {"float32": 2e-6, "float64": 1e-12}
TRAIN_TOL = {"float32": 2e-5, "float64": 1e-12}
pytestmark = pytest.mark.xdist_group("parallel")  # one test process: the device subprocesses' fixtures, once


def _worker_module():
    spec = importlib.util.spec_from_file_location("parallel_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(devices=None):
    env = {**os.environ, "PYTHONHASHSEED": "0", "JAX_PLATFORMS": "cpu"}  # CPU even on a GPU box
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def _start(*args, devices=None):
    """A worker in its own process group, so that cleanup can kill it and anything it started."""
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _kill(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _finish(procs, timeout):
    """Wait for every process; on a timeout or failure kill them all and report their output."""
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"worker timed out after {timeout} s")
    finally:
        for p in procs:
            _kill(p)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"worker {p.args} exited with {p.returncode}:\n{out[-4000:]}"
    return outputs


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    _finish([_start("checks", out, devices=4)], TIMEOUT_S)
    with np.load(out / "checks.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads((out / "checks.json").read_text())


def _pairs(arrays, case):
    keys = sorted(k for k in arrays if k.startswith(case + "|sharded|"))
    assert keys, f"no results for {case}"
    return [(k, arrays[k], arrays[k.replace("|sharded|", "|single|")]) for k in keys]


def _assert_close(arrays, case, tol):
    for key, sharded, single in _pairs(arrays, case):
        assert sharded.dtype == single.dtype and sharded.shape == single.shape, key
        scale = float(np.max(np.abs(single))) if single.size else 1.0
        np.testing.assert_allclose(sharded, single, rtol=0, atol=tol * scale, err_msg=key)


@pytest.mark.slow
def test_the_subprocess_used_four_devices(checks):
    _, meta = checks
    assert meta["device_count"] == 4
    assert meta["mesh4"] == {"data": 4} and meta["mesh2"] == {"data": 2}
    assert meta["shard_batch_shards"] == [2, 2, 2, 2]  # 8 examples, 2 per device
    for dtype in TOL:
        info = meta[f"shardings/{dtype}/softmax_mean_l2"]
        assert info["grads"] == "P()" and info["grads_devices"] == 4  # replicated result
        assert info["norms"] == "P('data',)" and info["norms_devices"] == 4  # per-device norms
        assert 0 < info["clipped_fraction"] < 1  # some examples clipped, some not
        assert meta[f"train/{dtype}/devices"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("net", ["softmax_mean_l2", "squared_sum_l2_nobias", "binary"])
def test_sharded_gradient_equals_single_device(checks, dtype, net):
    arrays, _ = checks
    _assert_close(arrays, f"grad/{dtype}/{net}", TOL[dtype])  # loss and every gradient leaf


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sharded_gradient_on_part_of_the_devices(checks, dtype):
    _assert_close(checks[0], f"grad2/{dtype}/softmax_mean_l2", TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sharded_clipping_and_dp_equal_single_device_with_the_same_key(checks, dtype):
    arrays, _ = checks
    _assert_close(arrays, f"clip/{dtype}/softmax_mean_l2", TOL[dtype])  # sum, mean, norms
    _assert_close(arrays, f"dp/{dtype}/softmax_mean_l2", TOL[dtype])
    # The noise matters: another key gives another gradient, far outside the tolerance.
    first = _pairs(arrays, f"dp/{dtype}/softmax_mean_l2")[0][2]
    other = arrays[f"dp_other_key/{dtype}/softmax_mean_l2"]
    assert np.max(np.abs(first - other)) > 100 * TOL[dtype] * np.max(np.abs(first))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_poisson_dp_over_a_mesh_equals_one_device(checks, dtype):
    """A padded Poisson batch whose capacity is a multiple of the 4 devices, its masked clipped
    sum psum-ed, noised once: the one-device result with the same key (and nothing dropped)."""
    arrays, meta = checks
    info = meta[f"shardings/{dtype}/softmax_mean_l2"]
    capacity, count = info["poisson_capacity"], info["poisson_count"]
    assert capacity % 4 == 0 and 0 < count < capacity  # padded, and split over the 4 devices
    _assert_close(arrays, f"poisson/{dtype}/softmax_mean_l2", TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sharded_training_matches_single_device(checks, dtype):
    _assert_close(checks[0], f"train/{dtype}", TRAIN_TOL[dtype])  # parameters and losses


@pytest.mark.slow
def test_poisson_dp_sgd_over_a_mesh_is_the_one_device_run(checks):
    # As the sharded training above: the same examples summed in another order (the batch
    # padded from 39 to 40 slots, the padding masked out); float64, 8 steps with momentum.
    _assert_close(checks[0], "train_poisson/float64", TRAIN_TOL["float64"])


@pytest.mark.slow
def test_errors_name_the_argument_before_computation(checks):
    errors = checks[1]["errors"]
    indivisible = "batch size {} is not divisible by the 4 devices of the mesh"
    assert errors["value_and_backprop"] == "ValueError: x: " + indivisible.format(10)
    assert errors["clipped_grad"] == "ValueError: x: " + indivisible.format(6)
    assert errors["dp_grad"] == "ValueError: x: " + indivisible.format(6)
    assert errors["fit"] == "ValueError: batch_size: " + indivisible.format(10)
    assert errors["shard_batch"] == "ValueError: x: " + indivisible.format(10)
    # Labels are checked against the whole batch, not a device's slice of it.
    assert errors["y_global"] == ("ValueError: y: integer class labels must have shape (8,), "
                                  "got (9,)")
    assert errors["num_devices"] == ("ValueError: num_devices: asked for 5 devices, "
                                     "there are 4 (cpu)")
    assert errors["mesh"].startswith("TypeError: mesh: expected a jax.sharding.Mesh with a 'data'")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    port = _free_port()  # free a moment ago; the coordinator (process 0) binds it
    procs = [_start("process", tmp_path, port, i) for i in range(2)]
    _finish(procs, TIMEOUT_S)
    results = []
    for i in range(2):
        with np.load(tmp_path / f"process{i}.npz") as f:
            results.append({k: f[k] for k in f.files})
    # Two processes, two CPU devices each, one mesh of four.
    for r in results:
        assert r["devices"].tolist() == [4, 2, 2, 4]
    leaves, losses = _worker_module().train_single("float64")
    for r in results:
        got = [r[f"arr_{i}"] for i in range(len(leaves))]
        assert_trees_close(got, leaves, rtol=0, atol=TRAIN_TOL["float64"], what="parameters")
        np.testing.assert_allclose(r["losses"], losses, rtol=TRAIN_TOL["float64"])
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])  # replicas agree
    # Then each process held only its half of the 72 examples (measured on the host and on
    # its devices) and, in float32, took the one-process steps: TRAIN_TOL["float32"] of each
    # leaf's largest entry, as the sums run in another order.
    leaves, losses = _worker_module().train_single("float32")
    half = 72 * (5 * 4 + 4) // 2  # x float32 (72, 5) and y int32 (72,)
    for i in range(2):
        with np.load(tmp_path / f"sharded{i}.npz") as f:
            r = {k: f[k] for k in f.files}
        assert r["rows"].tolist() == [36 * i, 36 * (i + 1)]
        assert r["host_bytes"] == half and r["device_bytes"] == half
        for j, expected in enumerate(leaves):
            np.testing.assert_allclose(r[f"arr_{j}"], expected, rtol=0,
                                       atol=TRAIN_TOL["float32"] * np.max(np.abs(expected)))
        np.testing.assert_allclose(r["losses"], losses, rtol=TRAIN_TOL["float32"])



# -- in this process: one device ---------------------------------------------------------


def test_one_device_mesh_is_the_plain_computation():
    net = hbp.MLP((4, 6, 3), activation="tanh", loss="softmax_cross_entropy", l2=0.01)
    params, x, y = make_problem(net, 8)
    mesh = hbp.data_parallel_mesh(1)
    assert mesh.shape == {"data": 1} and mesh.axis_names == ("data",)

    @jax.jit
    def both(params, x, y, key):  # one compilation for all of them
        return (
            (hbp.sharded_value_and_backprop(net, params, x, y, mesh),
             hbp.sharded_backprop(net, params, x, y, mesh),
             tuple(hbp.sharded_clipped_grad(net, params, x, y, 0.3, mesh)),
             hbp.sharded_dp_grad(net, params, x, y, key, 0.3, 1.0, mesh)),
            (hbp.value_and_backprop(net, params, x, y), hbp.backprop(net, params, x, y),
             tuple(hbp.clipped_grad(net, params, x, y, 0.3)),
             hbp.dp_grad(net, params, x, y, key, 0.3, 1.0)),
        )

    sharded, single = both(params, x, y, jax.random.key(3))
    assert_trees_close(sharded, single, rtol=1e-13, atol=0, what="one-device mesh")


AUTODIFF = {"grad", "value_and_grad", "vjp", "jvp", "linearize", "hessian", "jacobian",
            "jacfwd", "jacrev"}
# Where autodiff is an oracle, as the rules allow: the verifier, and the train command's check
# of the hand gradient against jax.grad before it trains.
ORACLES = {"error_model.py", "layer_check.py", "rules.py", "curvature_check.py", "train_command.py"}


def test_library_gradient_code_uses_no_autodiff():
    """No jax.grad and kin in any library module's code (docstrings may name them)."""
    import ast

    modules = sorted(pathlib.Path(hbp.__file__).parent.glob("*.py"))
    assert len(modules) > 10 and {m.name for m in modules} >= ORACLES
    found = {}
    for module in modules:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in AUTODIFF and (
                    isinstance(node.value, ast.Name) and node.value.id == "jax"):
                found.setdefault(module.name, set()).add(f"jax.{node.attr}")
            if isinstance(node, ast.ImportFrom) and node.module == "jax":
                found.setdefault(module.name, set()).update(
                    a.name for a in node.names if a.name in AUTODIFF)
    assert {m: names for m, names in found.items() if m not in ORACLES} == {}
    assert set(found) == ORACLES  # the scan sees real uses, and the list is not stale


@pytest.mark.parametrize("call, message", [
    (lambda: hbp.data_parallel_mesh(0), "num_devices: expected an int >= 1, got 0"),
    (lambda: hbp.data_parallel_mesh("2"), "num_devices: expected an int >= 1, got '2'"),
    (lambda: parallel.initialize(devices=0), "devices: expected an int >= 1, got 0"),
    (lambda: parallel.initialize(coordinator="127.0.0.1:1234"),
     "num_processes, process_id: a multi-process run needs coordinator, num_processes and "
     "process_id"),
    (lambda: parallel.initialize(coordinator="127.0.0.1:1", num_processes=2, process_id=2),
     "process_id: expected an int in [0, 2), got 2"),
])
def test_bad_mesh_and_initialize_arguments(call, message):
    with pytest.raises((ValueError, TypeError)) as e:
        call()
    assert str(e.value).startswith(message)


def test_a_mesh_of_more_devices_than_there_are():
    n = jax.device_count()
    with pytest.raises(ValueError, match=rf"num_devices: asked for {n + 1} devices, there are "
                                         rf"{n} \({jax.default_backend()}\)"):
        hbp.data_parallel_mesh(n + 1)


def test_initialize_refuses_a_device_count_once_jax_has_started():
    jax.devices()  # this process's backend is up (as in any test run)
    with pytest.raises(RuntimeError, match="jax_num_cpu_devices"):
        parallel.initialize(devices=2)


def test_replicate_keeps_typed_keys_and_values():
    mesh = hbp.data_parallel_mesh(1)
    tree = {"k": jax.random.key(5), "a": jnp.arange(3.0)}
    out = parallel.replicate(tree, mesh)
    assert jnp.issubdtype(out["k"].dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(out["k"]), jax.random.key_data(tree["k"]))
    assert out["a"].sharding.is_fully_replicated and np.array_equal(out["a"], tree["a"])


# -- the train command: --devices and the multi-process flags, in subprocesses -------------

XOR = ["--dataset", "xor", "--sizes", "2,16,1", "--batch-size", "40", "--epochs", "3",
       "--dtype", "float64", "--json"]


def _cli(*argv):
    """``python -m handbackprop train ...`` in its own process group (see :func:`_start`)."""
    return subprocess.Popen([sys.executable, "-m", "handbackprop", "train", *map(str, argv)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _cli_results(procs):
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        pytest.fail(f"train command timed out after {TIMEOUT_S} s")
    finally:
        for p in procs:
            _kill(p)
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


XOR32 = XOR[:-3] + ["--json"]  # the default dtype, float32
assert XOR[-3:-1] == ["--dtype", "float64"]


def _one_device_run(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def one_device_run():
    return _one_device_run(XOR)


def _assert_same_run(result, reference, dtype="float64"):
    assert result["settings"] == reference["settings"]
    tol = TRAIN_TOL[dtype]
    np.testing.assert_allclose(result["history"]["train_loss"], reference["history"]["train_loss"],
                               rtol=tol)
    for split in ("train", "test"):
        for k, v in reference[split].items():
            np.testing.assert_allclose(result[split][k], v, rtol=tol)


@pytest.mark.slow
def test_cli_devices_splits_batches_and_checks_divisibility(one_device_run):
    (rc, out, err), (bad_rc, _, bad_err), (poisson_rc, _, poisson_err) = _cli_results([
        _cli(*XOR, "--devices", "2"), _cli(*XOR, "--devices", "3"),
        _cli(*XOR, "--devices", "2", "--dp-clip", "1", "--dp-noise", "1", "--dp-sampling", "poisson")])
    assert rc == 0, err[-3000:]
    assert poisson_rc == 0, poisson_err[-3000:]  # Poisson-sampled DP-SGD over a mesh
    result = json.loads(out)
    assert result["devices"] == 2 and result["processes"] == 1 and one_device_run["devices"] == 1
    _assert_same_run(result, one_device_run)
    assert bad_rc == 2 and ("--batch-size: 40 is not divisible by the 3 devices of the "
                            "data-parallel mesh") in bad_err


@pytest.mark.slow
def test_cli_two_processes_train_like_one():
    """In float32, the default: issue 11's crash at the end (and --json printing nothing)
    came with float32; each process now holds only its half of the training set."""
    port = _free_port()
    flags = ["--devices", "2", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    runs = _cli_results([_cli(*XOR32, *flags, "--process-id", i) for i in range(2)])
    reference = _one_device_run(XOR32)
    for rc, out, err in runs:
        assert rc == 0, err[-3000:]
        result = json.loads(out)  # stdout is the JSON alone: gloo's connection lines go to stderr
        assert result["devices"] == 4 and result["processes"] == 2
        assert result["settings"]["dtype"] == "float32"
        _assert_same_run(result, reference, "float32")
