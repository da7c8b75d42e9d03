"""Test configuration and shared helpers.

float64 is enabled and rank promotion is an error (a (n,1) vs (n,) slip fails loudly); the
process keeps one CPU device (multi-device tests run in subprocesses). Compiled programs go
to JAX's persistent compilation cache (``.jax_cache/``, or ``$JAX_COMPILATION_CACHE_DIR``),
shared by the test processes and kept between runs: most of the suite's time is compiling
small programs, and a program compiled once, by either process or an earlier run, is read
back (keyed by its HLO, the compile options and the jaxlib version, so an edit recompiles;
nothing is evicted: delete the folder to reclaim its space, a few tens of MB per version).
"""

import itertools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(__file__).resolve().parents[1] / ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache every program
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

import handbackprop as hbp  # noqa: E402

MAX_WORKERS = 4  # each test process holds its own JAX runtime (~2 GB resident here); XLA threads big ops


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one test process per core, at most MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


LOSSES = ("squared_error", "binary_cross_entropy", "softmax_cross_entropy")
ACTIVATIONS = ("identity", "logistic", "tanh", "relu", "leaky_relu", "softplus", "elu")


def make_labels(key, loss, batch, k, dtype=jnp.float64):
    """Labels that fit ``loss``: real targets, 0/1 targets, or integer classes."""
    if loss == "squared_error":
        return jax.random.normal(key, (batch, k), dtype)
    if loss == "binary_cross_entropy":
        return jax.random.bernoulli(key, 0.5, (batch, k)).astype(dtype)
    return jax.random.randint(key, (batch,), 0, k)


def make_problem(net, batch, seed=0, dtype=jnp.float64):
    """Random params (non-zero biases, so the bias path is exercised), inputs and labels."""
    kp, kb, kx, ky = jax.random.split(jax.random.key(seed), 4)
    params = hbp.init_params(kp, net, dtype)
    if net.bias:
        keys = jax.random.split(kb, net.num_layers)
        params = tuple(
            {"w": p["w"], "b": 0.3 * jax.random.normal(k, p["b"].shape, dtype)}
            for p, k in zip(params, keys)
        )
    x = jax.random.normal(kx, (batch, net.sizes[0]), dtype)
    y = make_labels(ky, net.loss, batch, net.sizes[-1], dtype)
    return params, x, y


def assert_trees_close(actual, expected, rtol, atol, what="", dtype=None):
    """Leaf by leaf ``|a - e| <= atol + rtol |e|``, with matching structure and shapes, and
    ``actual``'s dtypes those of ``expected`` where it holds JAX arrays, or, for floating leaves,
    ``dtype`` when given (a float32 result against a float64 oracle)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for path, a, e in zip(
        jax.tree_util.tree_flatten_with_path(actual)[0],
        jax.tree.leaves(actual),
        jax.tree.leaves(expected),
    ):
        assert np.shape(a) == np.shape(e), (what, path[0], np.shape(a), np.shape(e))
        if dtype is not None and jnp.issubdtype(jnp.result_type(e), jnp.floating):
            want = jnp.dtype(dtype)
        else:
            want = e.dtype if isinstance(e, jax.Array) else None
        if want is not None:
            assert jnp.result_type(a) == want, (what, path[0], jnp.result_type(a), want)
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol,
            err_msg=f"{what} at {jax.tree_util.keystr(path[0])}",
        )


def covering(cases, strength=2, over=None, ids=None):
    """A grid's cases as ``pytest.param``s, all but a covering subset marked ``slow``.

    The subset (greedy, each pick covering the most still-uncovered combinations) holds every
    combination of values of any ``strength`` parameters that the grid holds: with 2,
    ``pytest -m "not slow"`` meets each activation with each loss, each depth with bias on and
    off, and so on, in a few percent of the cases (1: each value once; 0: the first case
    alone); the full suite still runs the whole grid. ``over``: the positions of the
    parameters to cover (default all), for a test whose concern is some of them. ``ids``: a
    function of a case's values giving its test id (default pytest's).
    """
    cases = [tuple(c) for c in cases]
    over = range(len(cases[0])) if over is None else over
    combos = [set(itertools.combinations([(i, c[i]) for i in over], strength)) for c in cases]
    uncovered, keep = set().union(*combos), set()
    while uncovered:
        best = max(range(len(cases)), key=lambda k: len(combos[k] & uncovered))
        keep.add(best)
        uncovered -= combos[best]
    return [pytest.param(*c, marks=() if k in keep else pytest.mark.slow, id=ids(*c) if ids else None)
            for k, c in enumerate(cases)]


@pytest.fixture
def fresh_jit_caches():
    """For tests that monkeypatch a library function that jitted code calls: every compiled
    program is dropped before (so the patch is traced, not a cached program that predates it)
    and after (so no program traced with the patch serves a later test)."""
    jax.clear_caches()
    yield
    jax.clear_caches()
