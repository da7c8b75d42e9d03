"""Configuration, initialisation, the forward pass, and the input checks."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_problem

import handbackprop as hbp
from reference import backprop as ref


def test_config_is_hashable_and_normalised():
    a = hbp.MLP([4, 8, 3], activation=["relu"], loss="softmax_cross_entropy")
    b = hbp.MLP((4, 8, 3), activation=("relu",), loss="softmax_cross_entropy")
    assert a == b and hash(a) == hash(b) and a.sizes == (4, 8, 3)
    assert a.output_activation == "softmax" and a.num_layers == 2
    assert a.num_params == 4 * 8 + 8 + 8 * 3 + 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.l2 = 1.0


@pytest.mark.parametrize("loss, canonical", [("squared_error", "identity"),
                                             ("binary_cross_entropy", "logistic"),
                                             ("softmax_cross_entropy", "softmax")])
def test_output_activation_defaults_to_the_loss_canonical_one(loss, canonical):
    assert hbp.MLP((2, 3), loss=loss).output_activation == canonical


def test_forward_equals_reference():
    net = hbp.MLP((3, 5, 4, 2), activation=("tanh", "elu"), output_activation="logistic")
    params, x, _ = make_problem(net, 4)
    xs, _ = ref.forward(params, x, ["tanh", "elu", "logistic"])
    # Both float64, same sums in another order: a few ulps.
    np.testing.assert_allclose(hbp.forward(net, params, x), [xb[-1] for xb in xs], rtol=1e-12)


@pytest.mark.parametrize("activation, he", [("relu", True), ("leaky_relu", True), ("elu", True),
                                            ("tanh", False), ("logistic", False)])
def test_init_scales(activation, he):
    net = hbp.MLP((400, 300, 10), activation=activation, output_activation="identity")
    params = hbp.init_params(jax.random.key(0), net)
    w = params[0]["w"]
    want = math.sqrt(2 / 400) if he else math.sqrt(2 / 700)
    # 120000 normal draws: the sample std is within 1% of the target with overwhelming odds
    # (its relative standard error is 1/sqrt(2 n) ~ 0.2%).
    assert abs(float(jnp.std(w)) / want - 1) < 0.01
    assert w.dtype == jnp.float32 and params[0]["b"].shape == (300,) and not params[0]["b"].any()
    assert hbp.init_params(jax.random.key(0), hbp.MLP((2, 3), bias=False), jnp.float64)[0].keys() == {"w"}


# -- bad input: clear errors naming the argument, expected and received ------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sizes=()), ValueError, r"sizes: expected .* at least two"),
    (dict(sizes=(3,)), ValueError, r"sizes"),
    (dict(sizes=(3, 0, 2)), ValueError, r"sizes: .*positive.*\(3, 0, 2\)"),
    (dict(sizes=None), TypeError, r"sizes: expected a sequence of ints, got None"),
    (dict(sizes=(3, 4, 2), activation="swish"), ValueError, r"unknown activation 'swish'.*'elu'.*'tanh'"),
    (dict(sizes=(3, 4, 2), activation=("relu", "tanh")), ValueError, r"activation: expected one name or one per hidden layer \(1\), got 2"),
    (dict(sizes=(3, 4, 2), activation="softmax"), ValueError, r"layer 1: softmax is only valid as output_activation"),
    (dict(sizes=(3, 2), loss="hinge"), ValueError, r"loss: unknown loss 'hinge'.*'squared_error'"),
    (dict(sizes=(3, 2), loss="binary_cross_entropy", output_activation="tanh"), ValueError, r"output_activation: binary_cross_entropy .* logits .*'logistic'.*got 'tanh'"),
    (dict(sizes=(3, 2), output_activation="nope"), ValueError, r"output_activation: unknown activation 'nope'"),
    (dict(sizes=(3, 2), activation=3), TypeError, r"activation: expected an activation name"),
    (dict(sizes=(3, 2), l2=-1.0), ValueError, r"l2: expected a finite number >= 0, got -1.0"),
    (dict(sizes=(3, 2), reduction="max"), ValueError, r"reduction: expected one of \('mean', 'sum'\), got 'max'"),
    (dict(sizes=(3, 2), bias=1), TypeError, r"bias: expected True or False"),
    # int() would make these (3, 4, 2) and (3, 4, 2) without a word.
    (dict(sizes=(3, 4.5, 2)), TypeError, r"sizes: expected a sequence of ints, got \(3, 4.5, 2\)"),
    (dict(sizes="342"), TypeError, r"sizes: expected a sequence of ints, got '342'"),
    (dict(sizes=(3, True)), TypeError, r"sizes: expected a sequence of ints"),
    (dict(sizes=(3, 2), l2="0.1"), TypeError, r"l2: expected a finite number >= 0, got '0.1'"),
    (dict(sizes=(3, 2), l2=np.float32(np.nan)), ValueError, r"l2: expected a finite number >= 0"),
])
def test_bad_configuration(kwargs, error, match):
    with pytest.raises(error, match=match):
        hbp.MLP(**kwargs)


NET = hbp.MLP((3, 4, 2), activation="tanh")


def _good():
    params, x, y = make_problem(NET, 5)
    return params, x, y


@pytest.mark.parametrize("fn", [hbp.backprop, hbp.loss, hbp.deltas, hbp.value_and_backprop])
@pytest.mark.parametrize("mutate, error, match", [
    (lambda p, x, y: (p, x[:, :2], y), ValueError, r"x: expected shape \(B, 3\), got \(5, 2\)"),
    (lambda p, x, y: (p, x[0], y), ValueError, r"x: expected shape \(B, 3\), got \(3,\)"),
    (lambda p, x, y: (p, x.astype(jnp.int32), y), TypeError, r"x: expected a floating dtype, got int32"),
    (lambda p, x, y: (p, x, y[:, :1]), ValueError, r"y: squared_error expects floating targets of shape \(5, 2\), got shape \(5, 1\)"),
    (lambda p, x, y: (p, x, y[:4]), ValueError, r"y: .*\(5, 2\), got shape \(4, 2\)"),
    (lambda p, x, y: (p[:1], x, y), ValueError, r"params: expected a tuple of 2 layers, got 1"),
    (lambda p, x, y: ((p[0], {"w": p[1]["w"]}), x, y), ValueError, r"params: layer 2: expected keys \['b', 'w'\], got \['w'\]"),
    (lambda p, x, y: ((p[0], {"w": p[1]["w"].T, "b": p[1]["b"]}), x, y), ValueError, r"params: layer 2: w has shape \(2, 4\), expected \(4, 2\)"),
    (lambda p, x, y: (({"w": p[0]["w"], "b": p[0]["b"][:3]}, p[1]), x, y), ValueError, r"params: layer 1: b has shape \(3,\), expected \(4,\)"),
])
def test_bad_input_is_rejected_before_computation(fn, mutate, error, match):
    params, x, y = mutate(*_good())
    with pytest.raises(error, match=match):
        fn(NET, params, x, y)
    with pytest.raises(error, match=match):  # at trace time under jit too, not an XLA trace
        jax.jit(fn, static_argnums=0)(NET, params, x, y)


def test_bad_labels_for_classification():
    net = hbp.MLP((3, 4), loss="softmax_cross_entropy")
    params, x, _ = make_problem(net, 5)
    with pytest.raises(ValueError, match=r"y: integer class labels must have shape \(5,\), got \(5, 1\)"):
        hbp.loss(net, params, x, jnp.zeros((5, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"integer classes of shape \(5,\) or probability rows of shape \(5, 4\)"):
        hbp.loss(net, params, x, jnp.zeros((5, 3)))
    bce = hbp.MLP((3, 4), loss="binary_cross_entropy")
    with pytest.raises(ValueError, match=r"y: binary_cross_entropy expects floating targets .* dtype int"):
        hbp.loss(bce, params, x, jnp.zeros((5, 4), jnp.int32))


def test_forward_checks_too():
    params, x, _ = _good()
    with pytest.raises(ValueError, match=r"x: expected shape \(B, 3\)"):
        hbp.forward(NET, params, x[:, :1])


def test_a_loss_object_is_stored_by_name():
    """Code compares ``net.loss`` with names: a built-in Loss object must behave as its name."""
    net = hbp.MLP((3, 4), loss=hbp.losses.softmax_cross_entropy)
    assert net.loss == "softmax_cross_entropy" and net == hbp.MLP((3, 4), loss="softmax_cross_entropy")
    assert hbp.train.metric_name(net) == "accuracy"


def test_numpy_scalars_are_accepted_where_python_numbers_are():
    net = hbp.MLP(np.array([3, 4, 2]), l2=np.float32(0.5), bias=np.bool_(True))
    assert net == hbp.MLP((3, 4, 2), l2=0.5) and type(net.l2) is float and type(net.bias) is bool
    assert all(type(d) is int for d in net.sizes)


@pytest.mark.parametrize("args, match", [
    ((0, NET), r"key: expected one jax.random key"),
    ((jax.random.key(0), (3, 4, 2)), r"net: expected an MLP, got tuple \(3, 4, 2\); build one with MLP\(\(3, 4, 2\)\)"),
])
def test_init_params_refuses_a_wrong_key_or_net(args, match):
    with pytest.raises(TypeError, match=match):
        hbp.init_params(*args)


def test_nested_lists_are_taken_as_arrays():
    params, x, y = _good()
    f = jax.jit(hbp.loss, static_argnums=0)
    np.testing.assert_allclose(hbp.loss(NET, params, x.tolist(), y.tolist()), f(NET, params, x, y),
                               rtol=1e-14)
    with pytest.raises(ValueError, match=r"x: expected a rectangular array .* ragged"):
        hbp.loss(NET, params, [[1.0, 2.0, 3.0], [1.0]], y)  # ragged: refused, not an object array


@pytest.mark.parametrize("fn", [hbp.backprop, hbp.loss, hbp.forward, hbp.evaluate,
                                lambda *a: hbp.clipped_grad(*a, 1.0), hbp.gradient_stats,
                                lambda *a: hbp.dp_grad(*a, jax.random.key(0), 1.0, 1.0)])
def test_an_empty_batch_is_refused_naming_x(fn):
    """A mean over no examples is 0/0: NaN or ZeroDivisionError before; now a clear error."""
    params, x, y = _good()
    args = (NET, params, x[:0]) if fn is hbp.forward else (NET, params, x[:0], y[:0])
    with pytest.raises(ValueError, match=r"x: expected at least one example, got an empty batch"):
        fn(*args)
