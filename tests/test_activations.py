"""Each g' against jax.grad of its g, including the kinks and far tails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ACTIVATIONS

from handbackprop import activations

# Kinks at 0, both sides of it, and tails where logistic and tanh saturate.
POINTS = jnp.array([-50.0, -3.0, -1.0, -1e-8, 0.0, 1e-8, 0.5, 1.0, 3.0, 50.0], jnp.float64)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_derivative_equals_autodiff(name, dtype):
    act = activations.ACTIVATIONS[name]
    s = POINTS.astype(dtype)
    x = act.fn(s)
    auto = jax.vmap(jax.grad(act.fn))(s)
    got = act.derivative(s, x)
    assert got.dtype == dtype
    # From-output forms (x (1 - x), 1 - x^2) round x first: a few ulps of 1 apart from autodiff.
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(got, auto, rtol=8 * eps, atol=8 * eps)


def test_documented_kinks():
    zero = jnp.zeros(())
    assert activations.relu.derivative(zero, zero) == 0.0  # g'(0) = 0, as jax.nn.relu
    assert activations.leaky_relu.derivative(zero, zero) == 1.0  # as jax.nn.leaky_relu
    assert activations.elu.derivative(zero, zero) == 1.0  # as jax.nn.elu
    assert activations.leaky_relu.fn(jnp.array(-2.0)) == -0.02
    assert activations.elu.fn(jnp.array(-1.0)) == jnp.expm1(-1.0)


def test_get_resolves_names_pairs_and_rejects_the_rest():
    assert activations.get("tanh") is activations.tanh
    pair = (jnp.sin, jnp.cos)
    act = activations.get(pair)
    assert act.fn is jnp.sin and act.derivative(jnp.array(0.0), None) == 1.0
    assert act == activations.get(pair)  # equal configs hash alike, so jit caches them
    with pytest.raises(ValueError, match="valid names are"):
        activations.get("gelu")
    with pytest.raises(TypeError, match=r"a \(g, g'\) pair"):
        activations.get((jnp.sin,))


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_second_derivative_equals_autodiff(name, dtype):
    act = activations.ACTIVATIONS[name]
    s = POINTS.astype(dtype)
    auto = jax.vmap(jax.grad(jax.grad(act.fn)))(s)
    got = act.second_derivative(s, act.fn(s))
    assert got.dtype == dtype
    # As for g': the from-output forms round x first, a few ulps of the result's scale (<= 1).
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(got, auto, rtol=16 * eps, atol=16 * eps)


def test_a_user_pair_has_no_second_derivative():
    act = activations.get((jnp.sin, jnp.cos))
    with pytest.raises(ValueError, match="'sin' has no second derivative"):
        act.second_derivative(jnp.zeros(2), jnp.zeros(2))
