"""Per-example losses from logits, and the base case (3.4) against jax.grad."""

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
