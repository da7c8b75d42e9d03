"""Per-example losses from logits, and the base case (3.4) against jax.grad."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from handbackprop import activations, losses
from reference import backprop as ref

S = jnp.array([[-1e4, 0.0, 3.0], [2.0, -0.5, 1e4], [0.1, 0.2, -0.3]], jnp.float64)
TARGETS = {
    "squared_error": jnp.array([[0.5, -1.0, 2.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
    "binary_cross_entropy": jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]),
    "softmax_cross_entropy": jnp.array([2, 0, 1]),
}


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_fused_delta_equals_autodiff_and_is_finite(name, dtype):
    loss = losses.LOSSES[name]
    out = activations.ACTIVATIONS[loss.canonical]
    s = S.astype(dtype)
    y = TARGETS[name] if name == "softmax_cross_entropy" else TARGETS[name].astype(dtype)
    value = loss.value(s, out.fn(s), y)
    delta = losses.output_delta(loss, out, s, out.fn(s), y)
    auto = jax.grad(lambda s: jnp.sum(loss.value(s, out.fn(s), y)))(s)
    assert value.shape == (3,) and delta.shape == (3, 3)
    assert np.all(np.isfinite(value)) and np.all(np.isfinite(delta))
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(delta, auto, rtol=4 * eps, atol=4 * eps)
    if dtype == jnp.float64:  # the literal float64 loss, computed from logits too
        ref_value = [ref.example_loss(list(sb), list(ob), list(tb), name) for sb, ob, tb in
                     zip(np.asarray(s), np.asarray(out.fn(s)), ref._targets(y, 3))]
        np.testing.assert_allclose(value, ref_value, rtol=1e-14)


def test_extreme_logits_cost_their_margin():
    # A wrong logit of 1e4 costs about 1e4; a right one about nothing.
    bce = losses.binary_cross_entropy.value(jnp.array([[1e4], [-1e4]]), None, jnp.array([[0.0], [0.0]]))
    np.testing.assert_allclose(bce, [1e4, 0.0], atol=1e-12)


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match=r"valid names are \['binary_cross_entropy', 'softmax_cross_entropy', 'squared_error'\]"):
        losses.get("mse")


# -- labels outside the loss's domain: a ValueError when concrete, NaN when traced --------------

import handbackprop as hbp  # noqa: E402

K = 3
SOFTMAX = hbp.MLP((2, 5, K), activation="tanh", loss="softmax_cross_entropy")
BCE = hbp.MLP((2, 5, K), activation="tanh", loss="binary_cross_entropy")
GOOD_ROW = [0.2, 0.3, 0.5]
# (net, labels with example 2 bad, the message); example 2 is the only bad one.
BAD_LABELS = {
    "class >= K": (SOFTMAX, [0, 2, 7, 1], r"y: softmax_cross_entropy needs class labels in "
                   r"\[0, 3\), got 7 at index 2"),
    "class < 0": (SOFTMAX, [0, 2, -1, 1], r"got -1 at index 2"),
    "negative entry": (SOFTMAX, [GOOD_ROW, GOOD_ROW, [1.5, -0.5, 0.0], GOOD_ROW],
                       r"y: softmax_cross_entropy needs probability rows .* row 2 .*-0.5"),
    "row sum 0.9": (SOFTMAX, [GOOD_ROW, GOOD_ROW, [0.2, 0.2, 0.5], GOOD_ROW],
                    r"summing to 1 .* row 2 with sum 0.9"),
    "bce above 1": (BCE, [[0, 1, 0]] * 2 + [[0, 1.5, 1]] + [[1, 1, 0]],
                    r"y: binary_cross_entropy needs targets in \[0, 1\], got 1.5 at index \(2, 1\)"),
    "bce below 0": (BCE, [[0, 1, 0]] * 2 + [[0, 1, -0.5]] + [[1, 1, 0]], r"got -0.5 at index \(2, 2\)"),
    "bce NaN": (BCE, [[0, 1, 0]] * 2 + [[0, np.nan, 1]] + [[1, 1, 0]], r"got nan at index \(2, 1\)"),
}
ENTRY_POINTS = {
    "loss": hbp.loss, "backprop": hbp.backprop, "value_and_backprop": hbp.value_and_backprop,
    "deltas": hbp.deltas, "per_example_grads": hbp.per_example_grads,
    "per_example_grad_norms": hbp.per_example_grad_norms,
    "clipped_grad": lambda net, p, x, y: hbp.clipped_grad(net, p, x, y, 1.0),
    "gradient_stats": hbp.gradient_stats, "evaluate": hbp.evaluate,
}


def _problem(net, labels):
    params = hbp.init_params(jax.random.key(0), net, jnp.float64)
    x = jax.random.normal(jax.random.key(1), (4, 2), jnp.float64)
    y = np.asarray(labels)
    return params, x, y.astype(np.float64) if y.dtype.kind == "f" else y


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_concrete_bad_labels_raise_naming_y(case):
    net, labels, match = BAD_LABELS[case]
    params, x, y = _problem(net, labels)
    with pytest.raises(ValueError, match=match):  # eagerly, as a JAX array
        hbp.loss(net, params, x, jnp.asarray(y))
    for name, entry in ENTRY_POINTS.items():  # constants under jit: refused at trace time
        with pytest.raises(ValueError, match=match):
            jax.jit(lambda p: entry(net, p, x, y))(params)


@functools.partial(jax.jit, static_argnums=0)
def _everything(net, params, x, y):
    """What the entry points give for traced labels, in one compile per label shape."""
    value, grads = hbp.value_and_backprop(net, params, x, y)
    autodiff = jax.grad(hbp.loss, argnums=1)(net, params, x, y)  # the oracle, too
    return (value, grads, autodiff, hbp.deltas(net, params, x, y),
            hbp.per_example_grads(net, params, x, y), hbp.clipped_grad(net, params, x, y, 1.0))


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_traced_bad_labels_give_nan_for_that_example(case):
    """Under jit the labels have no value to check: the bad example's loss, deltas and
    gradient are NaN (a bad label never passes as a zero); the others are untouched."""
    net, labels, _ = BAD_LABELS[case]
    params, x, y = _problem(net, labels)
    value, grads, autodiff, deltas, per_ex, clipped = _everything(net, params, x, y)
    assert np.isnan(value) and all(np.all(np.isnan(g)) for g in jax.tree.leaves(grads[-1]))
    assert np.isnan(autodiff[-1]["w"]).all() and np.isnan(clipped.sum[-1]["w"]).all()
    good = np.arange(4) != 2
    assert np.isnan(deltas[-1][2]).all() and np.isfinite(deltas[-1][good]).all()
    for leaf in jax.tree.leaves(per_ex[-1]):  # the output layer's: every entry sees the NaN
        assert np.isnan(leaf[2]).all() and np.isfinite(leaf[good]).all()
    # The good examples' gradients are those of the same batch with the bad example repaired.
    fixed = y.copy()
    fixed[2] = y[0]
    ref_ex = _everything(net, params, x, fixed)[4]
    for a, b in zip(jax.tree.leaves(per_ex), jax.tree.leaves(ref_ex)):
        np.testing.assert_array_equal(a[good], b[good])


def test_probability_rows_within_rounding_pass():
    """Rows that are probabilities up to rounding pass; the tolerance is K eps of the dtype."""
    logits = 5 * np.random.default_rng(2).standard_normal((64, K))
    rows = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    tol = losses.row_sum_tolerance(K, np.float32)
    assert tol == K * float(np.finfo(np.float32).eps)
    assert np.all(np.abs(rows.sum(-1) - 1) <= tol)  # rounded probabilities: inside the bound
    net = hbp.MLP((2, K), loss="softmax_cross_entropy")
    params = hbp.init_params(jax.random.key(0), net, jnp.float32)
    x = np.ones((64, 2), np.float32)
    f = jax.jit(hbp.loss, static_argnums=0)
    off = rows.copy()
    off[0, 0] += 4 * tol  # clearly off: 4 K eps
    assert np.isfinite(f(net, params, x, rows)) and np.isnan(f(net, params, x, off))
    with pytest.raises(ValueError, match="row 0"):
        jax.jit(lambda p: hbp.loss(net, p, x, off))(params)


def test_label_checks_do_not_change_valid_results():
    """The masking is exact on valid labels: integer classes and their one-hot rows agree."""
    params, x, y = _problem(SOFTMAX, [0, 2, 1, 1])
    f = jax.jit(hbp.backprop, static_argnums=0)
    for a, b in zip(jax.tree.leaves(f(SOFTMAX, params, x, y)),
                    jax.tree.leaves(f(SOFTMAX, params, x, np.eye(K)[y]))):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)
