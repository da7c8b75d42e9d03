"""The equivalence suite: hand backprop against jax.grad, reference/ and finite differences.

Tolerances. In float64 the hand recursion and jax.grad evaluate the same sums in possibly
different orders: their difference is a few ulps of the largest partial sum, so
rtol = 1e-10 with atol = 1e-12 (gradients here are O(1e-3..1)) is tight yet safe. The
literal reference loops sum in yet another order: same bound. Central differences with step
cbrt(eps) max(1, |w|) ~ 6e-6 carry truncation h^2 |f'''| / 6 plus round-off eps |f| / h, about
1e-11 each for O(1) values and derivatives; atol = 1e-7, rtol = 1e-6 leaves a margin for the
larger third derivatives of deep or saturated networks, and would still catch any wrong term.
"""

import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
import pytest
from conftest import ACTIVATIONS, LOSSES, assert_trees_close, covering, make_problem

import handbackprop as hbp
from reference import backprop as ref
from reference import finite_diff as ref_fd

backprop_module = importlib.import_module("handbackprop.backprop")  # hbp.backprop is the function

EXACT64 = dict(rtol=1e-10, atol=1e-12)
FD64 = dict(rtol=1e-6, atol=1e-7)
# float32 vs float64 truth: each of a few dozen rounded products and sums errs by eps32 ~ 6e-8
# relative to its largest term; 1e-4 relative with an absolute floor keeps a ~100x margin.
F32 = dict(rtol=1e-4, atol=1e-5)

DEPTH_SIZES = {1: (3, 2), 2: (3, 4, 2), 4: (3, 4, 3, 4, 2)}


def _net(activation, loss, depth, bias, l2, reduction):
    return hbp.MLP(DEPTH_SIZES[depth], activation=activation, loss=loss, bias=bias, l2=l2,
                   reduction=reduction)


def _reference_args(net):
    return dict(activations=[g.name for g in net.activations], loss=net.loss, bias=net.bias)


GRID = list(itertools.product(ACTIVATIONS, LOSSES, (1, 2, 4), (True, False), (0.0, 0.1),
                              ("mean", "sum"), (1, 7)))


# Fast: every pair of values of the settings other than the activation (each activation is
# checked against autodiff in test_deltas_are_gradients_with_respect_to_pre_activations);
# the full suite runs the whole grid.
@pytest.mark.parametrize("activation, loss, depth, bias, l2, reduction, batch", covering(GRID, 2, over=range(1, 7)))
def test_backprop_equals_jax_grad_and_reference(activation, loss, depth, bias, l2, reduction, batch):
    net = _net(activation, loss, depth, bias, l2, reduction)
    params, x, y = make_problem(net, batch, seed=depth + 10 * batch)
    value, hand = hbp.value_and_backprop(net, params, x, y)
    auto_value, auto = jax.value_and_grad(hbp.loss, argnums=1)(net, params, x, y)
    assert_trees_close(hand, auto, **EXACT64, what="backprop vs jax.grad")
    np.testing.assert_allclose(value, auto_value, rtol=1e-14)
    literal = ref.backprop(params, x, y, **_reference_args(net), l2=l2, reduction=reduction)
    assert_trees_close(hand, literal, **EXACT64, what="backprop vs reference")
    ref_loss = ref.loss(params, x, y, **_reference_args(net), l2=l2, reduction=reduction)
    np.testing.assert_allclose(value, ref_loss, rtol=1e-12)
    for leaf, p in zip(jax.tree.leaves(hand), jax.tree.leaves(params)):
        assert leaf.dtype == p.dtype


# Finite differences cost O(weights^2) in the literal reference: one slice of the grid each
# for depth, bias, l2, reduction, batch, with every activation and loss.
FD_GRID = [(a, l, d, b, l2, r, n) for a, l in itertools.product(ACTIVATIONS, LOSSES)
           for d, b, l2, r, n in [(1, True, 0.1, "sum", 1), (2, False, 0.0, "mean", 7),
                                  (4, True, 0.1, "mean", 7)]]


@pytest.mark.parametrize("activation, loss, depth, bias, l2, reduction, batch", FD_GRID)
def test_backprop_equals_central_differences(activation, loss, depth, bias, l2, reduction, batch):
    net = _net(activation, loss, depth, bias, l2, reduction)
    params, x, y = make_problem(net, batch, seed=3 + depth)
    args = _reference_args(net)
    numeric = ref_fd.central_difference_gradient(
        lambda p: ref.loss(p, x, y, **args, l2=l2, reduction=reduction), params)
    assert_trees_close(hbp.backprop(net, params, x, y), numeric, **FD64, what="backprop vs FD")


@pytest.mark.parametrize("activation, loss", covering(itertools.product(ACTIVATIONS, LOSSES), 1))
def test_deltas_are_gradients_with_respect_to_pre_activations(activation, loss):
    net = hbp.MLP((3, 4, 5, 2), activation=activation, loss=loss)
    params, x, y = make_problem(net, 6, seed=1)
    cache = hbp.forward_cache(net, params, x)

    def losses_from(l, s):  # e_b as a function of S^(l+1) (0-based l), running the layers above
        for layer, g in zip(params[l + 1:], net.activations[l:-1]):
            s = g.fn(s) @ layer["w"] + layer["b"][None, :]
        return net.loss_fn.value(s, net.activations[-1].fn(s), y)

    ds = hbp.deltas(net, params, x, y)
    literal = ref.deltas(params, x, y, **_reference_args(net))
    for l, (delta, s) in enumerate(zip(ds, cache.ss)):
        # e_b depends on S_b only, so the gradient of sum_b e_b w.r.t. S is each delta_b.
        auto = jax.grad(lambda s: jnp.sum(losses_from(l, s)))(s)
        np.testing.assert_allclose(delta, auto, **EXACT64, err_msg=f"layer {l + 1}")
        np.testing.assert_allclose(delta, literal[l], **EXACT64, err_msg=f"layer {l + 1}")


@pytest.mark.parametrize("output_activation", ["logistic", "tanh", "relu", "softmax"])
def test_general_base_case_for_non_canonical_outputs(output_activation):
    # The note's own set-up: squared error through a non-identity output, delta = de/do g'(S).
    net = hbp.MLP((3, 5, 4), activation="tanh", output_activation=output_activation)
    params, x, y = make_problem(net, 5, seed=2)
    assert_trees_close(hbp.backprop(net, params, x, y), jax.grad(hbp.loss, argnums=1)(net, params, x, y),
                       **EXACT64)
    literal = ref.backprop(params, x, y, **_reference_args(net))
    assert_trees_close(hbp.backprop(net, params, x, y), literal, **EXACT64)


def test_user_supplied_activation_pair():
    cube = (lambda s: s ** 3 / 3 + s, lambda s: s ** 2 + 1)
    net = hbp.MLP((3, 4, 4, 2), activation=(cube, "tanh"))
    params, x, y = make_problem(net, 4)
    assert_trees_close(hbp.backprop(net, params, x, y), jax.grad(hbp.loss, argnums=1)(net, params, x, y),
                       **EXACT64)


@pytest.mark.parametrize("loss", covering([(l,) for l in LOSSES], 0))
def test_float32_agrees_with_float64(loss):
    net = hbp.MLP((5, 8, 8, 3), activation="tanh", loss=loss, l2=0.01)
    params64, x64, y64 = make_problem(net, 16, seed=4)
    params32, x32, y32 = jax.tree.map(
        lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, (params64, x64, y64))
    truth = hbp.backprop(net, params64, x64, y64)
    hand32 = hbp.backprop(net, params32, x32, y32)
    auto32 = jax.grad(hbp.loss, argnums=1)(net, params32, x32, y32)
    assert_trees_close(hand32, truth, **F32, dtype=jnp.float32)
    assert_trees_close(hand32, auto32, **F32)


def test_jit_equals_eager():
    net = hbp.MLP((4, 6, 3), activation="elu", loss="softmax_cross_entropy", l2=0.1)
    params, x, y = make_problem(net, 5)
    eager = hbp.value_and_backprop(net, params, x, y)
    jitted = jax.jit(hbp.value_and_backprop, static_argnums=0)(net, params, x, y)
    # Same operations, possibly fused differently by XLA: a few ulps.
    assert_trees_close(jitted, eager, **EXACT64)


def test_vmap_over_independent_batches():
    net = hbp.MLP((3, 4, 2), activation="softplus")
    params, x, y = make_problem(net, 12)
    stacked = jax.vmap(hbp.backprop, in_axes=(None, None, 0, 0))(net, params, x.reshape(3, 4, 3),
                                                                   y.reshape(3, 4, 2))
    for i in range(3):
        one = hbp.backprop(net, params, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
        assert_trees_close(jax.tree.map(lambda a: a[i], stacked), one, **EXACT64)


@pytest.mark.parametrize("activation, loss", [("tanh", "squared_error"),
                                              ("softplus", "softmax_cross_entropy"),
                                              ("logistic", "binary_cross_entropy")])
def test_backprop_is_differentiable_jacfwd_equals_hessian(activation, loss):
    net = hbp.MLP((2, 3, 2), activation=activation, loss=loss, l2=0.1)
    params, x, y = make_problem(net, 3)
    flat, unravel = ravel_pytree(params)
    hand_grad = lambda v: ravel_pytree(hbp.backprop(net, unravel(v), x, y))[0]  # noqa: E731
    hessian = jax.jit(jax.hessian(lambda v: hbp.loss(net, unravel(v), x, y)))(flat)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(hand_grad))(flat), hessian, **EXACT64)
    np.testing.assert_allclose(jax.jit(jax.jacrev(hand_grad))(flat), hessian, **EXACT64)


def test_relu_kink_has_zero_derivative():
    # Choose x and W so that S^(1) is exactly 0 at one hidden node: g'(0) = 0, as jax.nn.relu.
    net = hbp.MLP((2, 2, 1), activation="relu", bias=False)
    params = ({"w": jnp.array([[1.0, 1.0], [-1.0, 1.0]])}, {"w": jnp.array([[2.0], [3.0]])})
    x, y = jnp.array([[1.0, 1.0]]), jnp.array([[0.0]])
    s1 = hbp.forward_cache(net, params, x).ss[0]
    assert s1[0, 0] == 0.0  # the kink is hit exactly
    d1 = hbp.deltas(net, params, x, y)[0]
    assert d1[0, 0] == 0.0 and d1[0, 1] != 0.0
    assert_trees_close(hbp.backprop(net, params, x, y), jax.grad(hbp.loss, argnums=1)(net, params, x, y),
                       rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("loss", ["binary_cross_entropy", "softmax_cross_entropy"])
def test_extreme_logits_give_finite_loss_and_gradient(loss, dtype):
    net = hbp.MLP((2, 3), activation="relu", loss=loss, bias=False)
    params = ({"w": jnp.array([[1e4, -1e4, 0.0], [0.0, 0.0, 1e4]], dtype)},)
    x = jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype)  # logits of +-1e4 and 0
    y = jnp.array([1, 0]) if loss == "softmax_cross_entropy" else jnp.array([[0.0, 0.0, 1.0]] * 2, dtype)
    value, grads = hbp.value_and_backprop(net, params, x, y)
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # Confidently wrong logits of 1e4 cost about 1e4 and saturate the delta at -1 or +1.
    assert 1e3 < float(value) < 3e4
    assert_trees_close(grads, jax.grad(hbp.loss, argnums=1)(net, params, x, y), rtol=1e-6, atol=0)


def test_softmax_cross_entropy_accepts_integer_and_probability_labels():
    net = hbp.MLP((3, 4, 3), loss="softmax_cross_entropy")
    params, x, classes = make_problem(net, 5)
    onehot = jax.nn.one_hot(classes, 3, dtype=jnp.float64)
    assert_trees_close(hbp.backprop(net, params, x, onehot), hbp.backprop(net, params, x, classes),
                       **EXACT64)
    soft = jax.nn.softmax(jax.random.normal(jax.random.key(9), (5, 3), jnp.float64))
    assert_trees_close(hbp.backprop(net, params, x, soft), jax.grad(hbp.loss, argnums=1)(net, params, x, soft),
                       **EXACT64)


def test_sum_reduction_is_batch_size_times_mean():
    mean_net = hbp.MLP((3, 4, 2), activation="tanh")
    sum_net = hbp.MLP((3, 4, 2), activation="tanh", reduction="sum")
    params, x, y = make_problem(mean_net, 7)
    assert_trees_close(hbp.backprop(sum_net, params, x, y),
                       jax.tree.map(lambda g: 7 * g, hbp.backprop(mean_net, params, x, y)), **EXACT64)


def test_naive_forward_differences_agree_to_first_order():
    # The note's one-sided difference errs by h |f''| / 2 + eps |f| / h ~ 1e-7 for h = 1e-7:
    # agreement to 1e-5 confirms the reference's O(n^2) method that the benchmarks time.
    net = hbp.MLP((3, 4, 2), activation="logistic", output_activation="logistic")
    params, x, y = make_problem(net, 4)
    numeric = ref_fd.forward_difference_gradient(
        lambda p: ref.loss(p, x, y, **_reference_args(net)), params, h=1e-7)
    assert_trees_close(hbp.backprop(net, params, x, y), numeric, rtol=1e-5, atol=1e-6)


def test_gradients_keep_mixed_parameter_dtypes():
    """A float32 layer and a bfloat16 layer: each gradient leaf keeps its parameter's dtype
    (before, all came back float32). The computation runs in float32 either way (bfloat16
    promotes exactly), so the values are those of the float32 parameters cast leaf by leaf."""
    net = hbp.MLP((3, 4, 2), activation="tanh", loss="softmax_cross_entropy", l2=0.1)
    params, x, y = make_problem(net, 5)
    mixed = (jax.tree.map(lambda a: a.astype(jnp.float32), params[0]),
             jax.tree.map(lambda a: a.astype(jnp.bfloat16), params[1]))
    wide = jax.tree.map(lambda a: a.astype(jnp.float32), mixed)
    dtypes = jax.tree.map(lambda a: a.dtype, mixed)
    mesh = hbp.data_parallel_mesh(1)
    both = jax.jit(lambda p: (hbp.value_and_backprop(net, p, x, y)[1],  # one compile each
                              hbp.sharded_backprop(net, p, x, y, mesh)))
    for got, want in zip(both(mixed), both(wide)):
        assert jax.tree.map(lambda a: a.dtype, got) == dtypes
        assert_trees_close(got, jax.tree.map(lambda w, d: w.astype(d), want, dtypes),
                           rtol=0, atol=0)


def test_weighted_sums_are_the_subset_and_finish_reduces_once():
    """batch_sums with 0/1 weights is the sum over the chosen examples, even when an unchosen
    one is NaN (weight 0 adds exactly 0); finish divides by the reduction's divisor and adds
    l2 W once, giving backprop of the chosen examples."""
    net = hbp.MLP((3, 4, 2), activation="tanh", l2=0.1)
    params, x, y = make_problem(net, 6, seed=3)
    w = jnp.array([1, 0, 1, 1, 0, 1])
    chosen = np.flatnonzero(np.asarray(w))
    sums = jax.jit(backprop_module.batch_sums, static_argnums=0)(
        net, params, x.at[1].set(jnp.nan), y, w)
    alone = jax.jit(lambda x, y: (backprop_module.batch_sums(net, params, x, y),
                                  hbp.backprop(net, params, x, y)))
    want, grads = alone(x[chosen], y[chosen])
    assert_trees_close(sums, want, **EXACT64)
    finished = backprop_module.finish(net, params, sums.grads, len(chosen))
    assert_trees_close(finished, grads, **EXACT64)
