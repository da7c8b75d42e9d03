"""Per-example gradients, norms, clipped sums and statistics against materialised oracles.

Oracles: ``jax.vmap(jax.grad)`` of one example's own loss, a loop of batch-size-1 ``backprop``
calls, and plain NumPy-style reductions of the materialised per-example gradients.

Tolerances. In float64 the closed forms and the oracles evaluate the same sums in different
orders (e.g. ``sum_l ||d||^2 (||x||^2 + 1)`` against a sum over all parameters): a few ulps of
the largest partial sum, so rtol = 1e-10 with atol = 1e-12 (values here are O(1e-3..10)) is
tight yet safe. float32 is compared with the float64 result: a few dozen rounded operations
of eps32 ~ 6e-8 each on O(1) values, so rtol = 1e-4 with an absolute floor keeps ~100x margin.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ACTIVATIONS, LOSSES, assert_trees_close, covering, make_problem

import handbackprop as hbp

EXACT64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-4, atol=1e-5)
SIZES = (4, 5, 3, 3)  # two hidden layers: the inductive step runs twice


def _single(net):
    """One example's own loss: a sum over a batch of one, without the L2 term."""
    return dataclasses.replace(net, l2=0.0, reduction="sum")


def _vmap_grad(net, params, x, y):
    """The oracle a JAX user writes today: jax.vmap of jax.grad of each example's loss."""
    single = _single(net)
    e = lambda p, xb, yb: hbp.loss(single, p, xb[None], yb[None])  # noqa: E731
    return jax.vmap(jax.grad(e), in_axes=(None, 0, 0))(params, x, y)


def _loop(net, params, x, y):
    """The slowest oracle: B separate batch-size-1 backprop calls, stacked."""
    grads = [hbp.backprop(_single(net), params, x[b : b + 1], y[b : b + 1]) for b in range(len(x))]
    return jax.tree.map(lambda *g: jnp.stack(g), *grads)


def _flat(tree):
    """Per-example gradients as rows: (B, number of parameters)."""
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in jax.tree.leaves(tree)], 1)


def _net(activation="tanh", loss="squared_error", bias=True, l2=0.1, **kw):
    return hbp.MLP(SIZES, activation=activation, loss=loss, bias=bias, l2=l2, **kw)


CASES = [(a, loss, None) for a in ACTIVATIONS for loss in LOSSES] + [
    ("relu", "squared_error", "tanh"),  # general base case: (o - y) g'(S)
    ("relu", "squared_error", "softmax"),  # base case through the softmax Jacobian
]


# Fast: each loss, output head, bias setting and batch size once (the activations' own
# derivatives are test_backprop's); the full suite runs every combination.
@pytest.mark.parametrize("activation, loss, output_activation, bias, batch",
                         covering([c + (bias, batch) for c in CASES for bias in (True, False) for batch in (1, 9)],
                                  1, over=(1, 2, 3, 4)))
def test_per_example_grads_equal_vmap_grad_and_loop(activation, loss, output_activation, bias, batch):
    net = _net(activation, loss, bias, output_activation=output_activation)
    params, x, y = make_problem(net, batch, seed=batch + bias)
    oracle = _vmap_grad(net, params, x, y)
    assert_trees_close(_loop(net, params, x, y), oracle, **EXACT64, what="loop")
    for method in ("outer", "vmap"):
        g = hbp.per_example_grads(net, params, x, y, method=method)
        assert_trees_close(g, oracle, **EXACT64, what=method)
        # Mean plus the L2 term is the batch gradient (net.reduction is "mean").
        mean = jax.tree.map(lambda a: jnp.mean(a, axis=0), g)
        mean = tuple({**m, "w": m["w"] + net.l2 * p["w"]} for m, p in zip(mean, params))
        assert_trees_close(mean, hbp.backprop(net, params, x, y), **EXACT64, what=method)


# Fast: bias on and off (the losses' base cases are test_backprop's and the test above's).
@pytest.mark.parametrize("loss, bias", covering(itertools.product(LOSSES, (True, False)), 1, over=(1,)))
def test_norms_clipping_and_stats_equal_materialised(loss, bias):
    net = _net("elu", loss, bias)
    params, x, y = make_problem(net, 9, seed=3)
    g = _vmap_grad(net, params, x, y)
    rows = _flat(g)
    norms = jnp.linalg.norm(rows, axis=1)
    np.testing.assert_allclose(hbp.per_example_grad_norms(net, params, x, y), norms, **EXACT64)

    clip = float(jnp.median(norms))  # about half the examples are clipped
    scale = jnp.minimum(1.0, clip / norms)
    clipped = jax.tree.map(lambda a: scale.reshape((-1,) + (1,) * (a.ndim - 1)) * a, g)
    assert np.all(np.linalg.norm(_flat(clipped), axis=1) <= clip * (1 + 1e-12))
    assert 0 < np.sum(norms > clip) < len(norms)
    out = hbp.clipped_grad(net, params, x, y, clip)
    assert_trees_close(out.sum, jax.tree.map(lambda a: jnp.sum(a, 0), clipped), **EXACT64)
    assert_trees_close(out.mean, jax.tree.map(lambda a: jnp.mean(a, 0), clipped), **EXACT64)
    np.testing.assert_allclose(out.norms, norms, **EXACT64)

    # Weights count each clipped gradient that many times: 0/1 keeps a subset (a padded batch).
    w = jnp.asarray([1, 0, 0.25, 1, 0, 1, 1, 0.5, 0])
    weighted = hbp.clipped_grad(net, params, x, y, clip, weights=w)
    assert_trees_close(weighted.sum, jax.tree.map(lambda a: jnp.einsum("b,b...->...", w, a), clipped),
                       **EXACT64)
    keep = np.flatnonzero(np.asarray(w) == 1)
    subset = hbp.clipped_grad(net, params, x[keep], y[keep], clip,
                              weights=(w[keep]))  # the same examples alone, weight 1
    assert_trees_close(hbp.clipped_grad(net, params, x, y, clip, weights=w == 1).sum, subset.sum,
                       **EXACT64)

    # A bound above every norm clips nothing: the plain sum.
    unclipped = hbp.clipped_grad(net, params, x, y, 2 * float(jnp.max(norms)))
    assert_trees_close(unclipped.sum, jax.tree.map(lambda a: jnp.sum(a, 0), g), **EXACT64)

    stats = hbp.gradient_stats(net, params, x, y)
    assert_trees_close(stats.mean, jax.tree.map(lambda a: jnp.mean(a, 0), g), **EXACT64)
    assert_trees_close(stats.sum_squares, jax.tree.map(lambda a: jnp.sum(a * a, 0), g), **EXACT64)
    # The one-pass variance cancels sum_squares / B against mean^2, both O(1) here: an
    # absolute error of a few ulps of those, so atol 1e-12 rather than a relative bound.
    assert_trees_close(stats.variance, jax.tree.map(lambda a: jnp.var(a, 0), g),
                       rtol=1e-9, atol=1e-12)


def test_zero_gradient_is_safe():
    """Targets equal to the outputs: every g_b = 0, norm 0, and no NaN even in jax.grad."""
    net = _net("tanh", "squared_error", l2=0.0)
    params, x, _ = make_problem(net, 4, seed=1)
    y = hbp.forward(net, params, x).at[0].add(1.0)  # example 0 has a gradient, 1..3 have none
    norms = hbp.per_example_grad_norms(net, params, x, y)
    assert norms[0] > 0 and np.all(np.asarray(norms[1:]) == 0)

    @jax.jit
    def f(p):  # differentiate through both the norms and the clipping factors
        c = hbp.clipped_grad(net, p, x, y, 0.1)
        return jnp.sum(c.norms) + sum(jnp.sum(leaf) for leaf in jax.tree.leaves(c.sum)), c

    (_, out), grad = jax.value_and_grad(f, has_aux=True)(params)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves((out, grad)))


def test_norms_are_differentiable():
    """jax.grad through the closed-form norms equals jax.grad through materialised ones."""
    net = _net("softplus", "softmax_cross_entropy")
    params, x, y = make_problem(net, 5, seed=2)
    closed = lambda p: jnp.sum(hbp.per_example_grad_norms(net, p, x, y) ** 3)  # noqa: E731
    materialised = lambda p: jnp.sum(  # noqa: E731
        jnp.linalg.norm(_flat(hbp.per_example_grads(net, p, x, y)), axis=1) ** 3
    )
    grad = lambda f: jax.jit(jax.grad(f))(params)  # noqa: E731  (one compile beats eager)
    assert_trees_close(grad(closed), grad(materialised), **EXACT64)


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.float64))
def test_jit_and_dtypes(dtype):
    net = _net("relu", "softmax_cross_entropy")
    params64, x64, y = make_problem(net, 6, seed=4)
    params, x = jax.tree.map(lambda a: a.astype(dtype), (params64, x64))

    @jax.jit  # one compile for everything; net is a closure constant, i.e. static
    def everything(params, x, y, clip):
        return (
            hbp.per_example_grads(net, params, x, y, method="outer"),
            hbp.per_example_grads(net, params, x, y, method="vmap"),
            hbp.per_example_grad_norms(net, params, x, y),
            hbp.clipped_grad(net, params, x, y, 0.5),  # a constant: value-checked
            hbp.clipped_grad(net, params, x, y, clip),  # traced: shape-checked only
            hbp.gradient_stats(net, params, x, y),
        )

    got = everything(params, x, y, 0.5)
    clipped = hbp.clipped_grad(net, params64, x64, y, 0.5)
    g = hbp.per_example_grads(net, params64, x64, y)
    norms = hbp.per_example_grad_norms(net, params64, x64, y)
    want = (g, g, norms, clipped, clipped, hbp.gradient_stats(net, params64, x64, y))
    assert_trees_close(got, want, **(F32 if dtype == jnp.float32 else EXACT64), dtype=dtype)
    counts = (got[3].dropped, got[4].dropped)  # clipped_grad's count of dropped examples
    assert all(c.dtype == jnp.int32 and c == 0 for c in counts)
    floats = [a for a in jax.tree.leaves(got) if all(a is not c for c in counts)]
    assert all(a.dtype == dtype for a in floats)


def test_errors_name_the_argument():
    net = _net()
    params, x, y = make_problem(net, 3)
    with pytest.raises(ValueError, match=r"method: expected one of \('outer', 'vmap'\), got 'loop'"):
        hbp.per_example_grads(net, params, x, y, method="loop")
    for bad, msg in ((-1.0, "got -1.0"), (0, "got 0.0"), (float("nan"), "got nan"),
                     (float("inf"), "got inf"), (jnp.array(-2.0), "got -2.0")):
        with pytest.raises(ValueError, match="clip_norm: expected a positive finite number, " + msg):
            hbp.clipped_grad(net, params, x, y, bad)
    for bad in ("1", True, jnp.ones(2), None, 1j):
        with pytest.raises(TypeError, match="clip_norm: expected a positive finite number"):
            hbp.clipped_grad(net, params, x, y, bad)
    with pytest.raises(ValueError, match=r"weights: expected shape \(3,\), one per example of x, "
                                         r"got shape \(2,\)"):
        hbp.clipped_grad(net, params, x, y, 1.0, weights=jnp.ones(2))
    # Traced: the value is unknown at trace time, the shape is checked.
    traced = jax.jit(hbp.clipped_grad, static_argnums=0)
    with pytest.raises(TypeError, match="clip_norm: expected a positive finite number"):
        traced(net, params, x, y, jnp.ones(2))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 4\), got \(3, 5\)"):
        hbp.per_example_grad_norms(net, params, jnp.ones((3, 5)), y)
    with pytest.raises(ValueError, match="y: squared_error expects"):
        hbp.gradient_stats(net, params, x, y[:2])
    with pytest.raises(ValueError, match="y: squared_error expects"):
        hbp.per_example_grads(net, params, x, y[:2], method="vmap")


def test_a_non_finite_example_is_dropped_and_counted():
    """A NaN and an Inf example add nothing, are counted and have NaN norms; the rest is the
    clipped sum of the other examples. (Before: a NaN norm read as 0, so the NaN example went
    unclipped and made the whole sum, and so the noisy DP step, NaN.)"""
    net = _net("tanh", "squared_error")
    params, x, y = make_problem(net, 5, seed=5)
    x = x.at[1, 0].set(jnp.nan).at[3, 2].set(jnp.inf)
    rest = np.array([0, 2, 4])
    # An example of weight 0 (the padding of a Poisson batch) is not counted as dropped.
    w = jnp.array([1.0, 0.0, 1.0, 1.0, 1.0])

    @jax.jit  # one compile; net and params are closure constants
    def run(x, y):
        return (hbp.clipped_grad(net, params, x, y, 0.5),
                hbp.clipped_grad(net, params, x, y, 0.5, weights=w[: len(x)]).dropped,
                hbp.per_example_grad_norms(net, params, x, y),
                hbp.dp_grad(net, params, x, y, jax.random.key(0), 0.5, 1.0))

    (out, weighted, norms, noisy), (want, *_) = run(x, y), run(x[rest], y[rest])
    assert int(out.dropped) == 2 and int(want.dropped) == 0 and int(weighted) == 1
    assert np.all(np.isnan(np.asarray(out.norms)[[1, 3]]))
    assert np.all(np.isnan(np.asarray(norms)[[1, 3]]))
    np.testing.assert_allclose(np.asarray(out.norms)[rest], want.norms, **EXACT64)
    assert_trees_close(out.sum, want.sum, **EXACT64)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(noisy))


def test_a_huge_finite_gradient_is_clipped_not_dropped():
    """float32: a target of 1e25 makes delta ~ 1e25, whose squared norm (1e50) overflows,
    though every entry of the gradient is finite. The norm is computed with scaling, so the
    example is clipped to C like any other. (Before: norm Inf, clipping factor 0, the example
    silently left out.) Oracle: the same in float64, where nothing overflows; float32 against
    float64 as for F32 (the norms' scaling adds a few roundings of eps32 ~ 6e-8)."""
    net = _net("tanh", "squared_error", l2=0.0)
    params, x, y = make_problem(net, 3, seed=6)
    y = y.at[0].set(1e25)
    clipped = jax.jit(hbp.clipped_grad, static_argnums=(0, 4))
    want = clipped(net, params, x, y, 1.0)
    got = clipped(net, *jax.tree.map(lambda a: a.astype(jnp.float32), (params, x, y)), 1.0)
    assert int(got.dropped) == 0 and float(want.norms[0]) > 1e25
    np.testing.assert_allclose(got.norms, want.norms, rtol=1e-5)
    assert_trees_close(got.sum, want.sum, **F32, dtype=jnp.float32)


def test_weights_must_lie_in_zero_one():
    """Weights above 1 or NaN would break the sensitivity bound C the accounting relies on."""
    net = _net()
    params, x, y = make_problem(net, 3)
    for bad, shown in ((1.5, "1.5"), (-0.25, "-0.25"), (float("nan"), "nan")):
        w = jnp.ones(3).at[1].set(bad)
        with pytest.raises(ValueError, match=rf"weights: expected numbers in \[0, 1\], got "
                                             rf"{shown} at index 1"):
            hbp.clipped_grad(net, params, x, y, 1.0, weights=w)
        # Traced, the value is unknown at trace time: the result is NaN, never a number.
        out = jax.jit(hbp.clipped_grad, static_argnums=0)(net, params, x, y, 1.0, w)
        assert all(np.all(np.isnan(leaf)) for leaf in jax.tree.leaves(out.sum))
    with pytest.raises(TypeError, match="weights: expected real or boolean weights, got dtype "
                                        "complex"):
        hbp.clipped_grad(net, params, x, y, 1.0, weights=jnp.ones(3) * 1j)


def test_gradients_keep_mixed_parameter_dtypes():
    """float32 and bfloat16 layers: every per-example result keeps each leaf's dtype. The
    computation runs in float32 either way (bfloat16 promotes exactly to float32), so the
    values are those of the float32 parameters, cast leaf by leaf: equal, bit for bit."""
    net = _net("tanh", "softmax_cross_entropy")
    params, x, y = make_problem(net, 4, seed=7)
    mixed = tuple(jax.tree.map(lambda a: a.astype(dt), layer) for layer, dt in
                  zip(params, (jnp.float32, jnp.bfloat16, jnp.float32)))
    wide = jax.tree.map(lambda a: a.astype(jnp.float32), mixed)
    x = x.astype(jnp.float32)

    def results(p):  # trees like params
        c = hbp.clipped_grad(net, p, x, y, 0.5)
        return (hbp.per_example_grads(net, p, x, y), hbp.per_example_grads(net, p, x, y, "vmap"),
                c.sum, c.mean, *hbp.gradient_stats(net, p, x, y),
                hbp.dp_grad(net, p, x, y, jax.random.key(0), 0.5, 1.0))

    dtypes = jax.tree.map(lambda a: a.dtype, mixed)
    run = jax.jit(results)  # one compile per dtype set, far fewer than eager
    for got, want in zip(run(mixed), run(wide)):
        assert jax.tree.map(lambda a: a.dtype, got) == dtypes
        assert_trees_close(got, jax.tree.map(lambda w, d: w.astype(d), want, dtypes),
                           rtol=0, atol=0)
