"""verify_gradient and check_backprop: every planted bug caught at the right leaf, no false alarm."""

import importlib
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import covering
from hypothesis import given, settings
from hypothesis import strategies as st

import handbackprop as hbp
from handbackprop.activations import ACTIVATIONS

DTYPES = (jnp.float32, jnp.float64)
backprop_module = importlib.import_module("handbackprop.backprop")

# Two same-shape square layers (2 and 3) for the transposition and swap bugs; L2 for the missing term.
NET = hbp.MLP((5, 6, 6, 6, 3), activation="tanh", l2=0.1)


def _setup(net, dtype, batch=8, seed=0):
    """Glorot-scaled weights, small nonzero biases, normal inputs, labels for the loss; drawn by
    NumPy (jax.random would compile anew for every shape hypothesis tries)."""
    rng = np.random.default_rng(seed)
    params = tuple(
        {"w": rng.normal(0, np.sqrt(2 / (a + b)), (a, b)), **({"b": rng.normal(0, 0.1, b)} if net.bias else {})}
        for a, b in zip(net.sizes[:-1], net.sizes[1:]))
    k = net.sizes[-1]
    y = {"squared_error": lambda: rng.normal(size=(batch, k)),
         "binary_cross_entropy": lambda: rng.integers(0, 2, (batch, k)).astype(float),
         "softmax_cross_entropy": lambda: rng.integers(0, k, batch)}[net.loss]()
    cast = lambda a: jnp.asarray(a, dtype if a.dtype.kind == "f" else jnp.int32)  # noqa: E731
    return jax.tree.map(cast, params), cast(rng.normal(size=(batch, net.sizes[0]))), cast(y)


def _loss(p, x, y):
    return hbp.loss(NET, p, x, y)


def _grad(p, x, y):
    return hbp.backprop(NET, p, x, y)


def _with(grads, layer, key, value):
    grads = [dict(g) for g in grads]
    grads[layer][key] = value
    return tuple(grads)


def _sign_flip(p, x, y):
    g = _grad(p, x, y)
    return _with(g, 1, "w", -g[1]["w"])


def _missing_mean(p, x, y):
    return hbp.backprop(hbp.MLP(NET.sizes, "tanh", l2=0.1, reduction="sum"), p, x, y)


def _transposed(p, x, y):
    g = _grad(p, x, y)
    return _with(g, 1, "w", g[1]["w"].T)


def _swapped(p, x, y):
    g = _grad(p, x, y)
    return _with(_with(g, 1, "w", g[2]["w"]), 2, "w", g[1]["w"])


def _wrong_derivative(p, x, y):  # tanh' written 1 - x instead of 1 - x^2
    return hbp.backprop(hbp.MLP(NET.sizes, (jnp.tanh, lambda s: 1 - jnp.tanh(s)), l2=0.1), p, x, y)


def _one_element(p, x, y):  # the largest entry of layer 1's w, off by 1e-3 relative
    g = _grad(p, x, y)
    w = g[0]["w"].ravel()
    i = jnp.argmax(jnp.abs(w))
    return _with(g, 0, "w", w.at[i].multiply(1 + 1e-3).reshape(g[0]["w"].shape))


def _missing_l2(p, x, y):
    return hbp.backprop(hbp.MLP(NET.sizes, "tanh"), p, x, y)


def _bias_not_summed(p, x, y):  # dE/db^(1) left as the (B, d1) scaled deltas
    return _with(_grad(p, x, y), 0, "b", hbp.deltas(NET, p, x, y)[0] / x.shape[0])


W = [f"[{l}]['w']" for l in range(4)]
B = [f"[{l}]['b']" for l in range(4)]
PLANTED = {
    "sign flip": (_sign_flip, {W[1]}),
    "missing 1/B": (_missing_mean, set(W + B)),
    "transposed square w": (_transposed, {W[1]}),
    "swapped layers": (_swapped, {W[1], W[2]}),
    "wrong g'": (_wrong_derivative, set(W[:3] + B[:3])),
    "one element 1e-3": (_one_element, {W[0]}),
    "missing L2": (_missing_l2, set(W)),
    "bias not summed": (_bias_not_summed, {B[0]}),
}


# Fast: each bug and each dtype once; the full suite plants every bug in both.
@pytest.mark.parametrize("bug, dtype", covering(itertools.product(sorted(PLANTED), DTYPES), 1,
                                                ids=lambda bug, dtype: f"{bug}-{dtype.__name__}"))
def test_planted_bug_is_caught_at_its_leaf(bug, dtype):
    fn, culprits = PLANTED[bug]
    params, x, y = _setup(NET, dtype)
    report = hbp.verify_gradient(_loss, fn, params, x, y)
    assert not report.ok
    assert {leaf.name for leaf in report.leaves if not leaf.ok} == culprits, str(report)
    with pytest.raises(AssertionError) as raised:
        report.raise_if_failed()
    assert str(raised.value) == str(report)
    assert all(c in str(report).split("\n\n")[-1] for c in culprits)  # the verdict names them


def test_report_names_the_element_and_its_three_values():
    params, x, y = _setup(NET, jnp.float64)
    report = hbp.verify_gradient(_loss, _one_element, params, x, y)
    leaf = report.leaves[1]  # [0]['w'] (leaves: b before w)
    right = _grad(params, x, y)[0]["w"]
    assert leaf.index == np.unravel_index(int(jnp.argmax(jnp.abs(right))), right.shape)
    np.testing.assert_allclose(leaf.yours, float(right[leaf.index]) * (1 + 1e-3), rtol=1e-12)
    np.testing.assert_allclose(leaf.autodiff, float(right[leaf.index]), rtol=1e-12)
    np.testing.assert_allclose(leaf.finite_diff, float(right[leaf.index]), rtol=1e-7)
    assert leaf.autodiff_ratio > 1 and leaf.coords_ratio > 1  # float64 FD sees 1e-3 too


def test_shape_problem_is_reported_not_raised():
    params, x, y = _setup(NET, jnp.float32)
    leaf = hbp.verify_gradient(_loss, _bias_not_summed, params, x, y).leaves[0]
    assert leaf.problem == "shape (8, 6), expected (6,)"


def test_correct_gradient_passes_and_report_is_json_ready():
    params, x, y = _setup(NET, jnp.float64)
    report = hbp.verify_gradient(_loss, _grad, params, x, y)
    assert report.ok, str(report)
    report.raise_if_failed()
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ok"] is True and len(d["leaves"]) == 8 and d["exhaustive"] is True
    assert d["evaluations"] == 1 + 12 * 8 * 8 + 4 * NET.num_params
    assert "PASS" in str(report) and "tolerances:" in str(report)


def test_directions_only_when_not_exhaustive():
    params, x, y = _setup(NET, jnp.float64)
    report = hbp.verify_gradient(_loss, _transposed, params, x, y, exhaustive=False, num_directions=4)
    assert report.evaluations == 1 + 12 * 4 * 8
    assert all(leaf.coords_ratio is None and leaf.finite_diff is None for leaf in report.leaves)
    bad = [leaf for leaf in report.leaves if not leaf.ok]
    assert [leaf.name for leaf in bad] == [W[1]]
    assert bad[0].directions_ratio > 1  # the dot-product test sees it too


def test_any_pytree_quadratic_form_and_conv():
    # A quadratic form: the gradient of x^T A x / 2 is (A + A^T) x / 2, not A x.
    a = jax.random.normal(jax.random.key(1), (5, 5))
    f = lambda p: 0.5 * p["x"] @ a @ p["x"]  # noqa: E731
    p = {"x": jnp.linspace(-1.0, 1.0, 5)}
    assert hbp.verify_gradient(f, lambda q: {"x": 0.5 * (a + a.T) @ q["x"]}, p).ok
    assert not hbp.verify_gradient(f, lambda q: {"x": a @ q["x"]}, p).ok
    # A one-filter 1-D convolution with a hand-written (correlation) gradient, in NumPy.
    sig, target = np.sin(np.arange(12.0)), np.cos(np.arange(10.0))
    conv = lambda p: 0.5 * jnp.sum((jnp.convolve(sig, p[0], mode="valid") - target) ** 2)  # noqa: E731

    def conv_grad(p):
        r = np.convolve(sig, np.asarray(p[0]), mode="valid") - target
        return [np.correlate(sig, r, mode="valid")[::-1].copy()]

    assert hbp.verify_gradient(conv, conv_grad, [jnp.array([0.3, -0.2, 0.1])]).ok
    assert not hbp.verify_gradient(conv, lambda p: [conv_grad(p)[0][::-1].copy()],
                                   [jnp.array([0.3, -0.2, 0.1])]).ok


def test_kinks_are_skipped_not_failed():
    # relu at exactly 0 and within one step of it: central differences are wrong there by O(1).
    f = lambda p: jnp.sum(jax.nn.relu(p["a"])) + 0.5 * jnp.sum(p["a"] ** 2)  # noqa: E731
    p = {"a": jnp.array([0.0, 1e-7, -1e-7, 2e-6, 0.7, -0.3])}
    report = hbp.verify_gradient(f, lambda q: {"a": (q["a"] > 0) + q["a"]}, p)
    leaf = report.leaves[0]
    assert report.ok, str(report)
    assert leaf.coords_unreliable >= 3
    # Exactly at the kink the derivative is a convention, not judged; beside it, an error is caught.
    assert hbp.verify_gradient(f, lambda q: {"a": (q["a"] >= 0) + q["a"]}, p).ok  # relu'(0) = 1
    report = hbp.verify_gradient(f, lambda q: {"a": (q["a"] > 1e-6) + q["a"]}, p)
    assert not report.ok and report.leaves[0].index in {(1,), (3,)}


def test_errors_name_the_argument():
    params, x, y = _setup(NET, jnp.float64)
    with pytest.raises(ValueError, match="grad_fn: returned a pytree"):
        hbp.verify_gradient(_loss, lambda p, x, y: list(_grad(p, x, y)), params, x, y)
    with pytest.raises(ValueError, match="num_directions"):
        hbp.verify_gradient(_loss, _grad, params, x, y, num_directions=0)
    with pytest.raises(TypeError, match="loss_fn: expected a function returning a floating scalar"):
        hbp.verify_gradient(lambda p, x, y: hbp.forward(NET, p, x), _grad, params, x, y)
    with pytest.raises(ValueError, match="loss_fn: the loss at params is"):
        hbp.verify_gradient(lambda p: jnp.log(-jnp.sum(p["a"] ** 2)), lambda p: p, {"a": jnp.ones(2)})


def test_warns_when_float64_is_asked_without_x64():
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.warns(UserWarning, match="jax_enable_x64 is off"):
            report = hbp.verify_gradient(lambda p: jnp.sum(p["a"] ** 2), lambda p: {"a": 2 * p["a"]},
                                         {"a": np.linspace(0, 1, 4)})
        assert report.ok and report.leaves[0].dtype == "float32"
    finally:
        jax.config.update("jax_enable_x64", True)


# -- check_backprop: the layer and the part of the recursion ---------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_check_backprop_passes_and_names_layers(dtype):
    net = hbp.MLP((4, 5, 3), activation="logistic", loss="softmax_cross_entropy")
    params, x, y = _setup(net, dtype)
    report = hbp.check_backprop(net, params, x, y)
    assert report.ok, str(report)
    assert [leaf.name for leaf in report.leaves] == ["layer 1 b", "layer 1 w", "layer 2 b", "layer 2 w"]
    assert [(r.layer, r.activation, r.diagnosis) for r in report.layers] == [
        (1, "logistic", "ok"), (2, "softmax", "ok")]
    assert report.layers[1].deriv_error is None  # softmax: not elementwise


def test_check_backprop_compiles_once_per_network():
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    net = hbp.MLP((4, 7, 3), activation="elu", loss="binary_cross_entropy")
    params, x, y = _setup(net, jnp.float64)
    other = jax.tree.map(lambda a: 1.5 * a, params)  # other values, the same shapes
    first = hbp.check_backprop(net, params, x, y)
    assert compiles, "the listener saw no compilation"
    compiles.clear()
    # An equal network (another object): no new program.
    again = hbp.check_backprop(hbp.MLP((4, 7, 3), activation="elu", loss="binary_cross_entropy"),
                               other, x, y)
    assert compiles == [] and first.ok and again.ok and again.loss != first.loss


def test_check_backprop_blames_a_wrong_derivative():
    bad_tanh = (jnp.tanh, lambda s: 1 - jnp.tanh(s))
    net = hbp.MLP((3, 4, 4, 2), activation=("elu", bad_tanh))
    params, x, y = _setup(net, jnp.float64)
    report = hbp.check_backprop(net, params, x, y)
    assert [r.diagnosis for r in report.layers] == [
        "inherits the error of layer 2", "g' of layer 2 (tanh) disagrees with jax's derivative of g", "ok"]
    assert "layer 2: g' of layer 2" in str(report)


def test_check_backprop_blames_the_recursion(monkeypatch, fresh_jit_caches):
    right = backprop_module.delta_recursion

    def no_transpose(net, params, cache, y, scale=1.0):  # W where the note has W^T, layer 3 -> 2
        ds = list(right(net, params, cache, y, scale))
        ds[1] = (ds[2] @ params[2]["w"]) * net.activations[1].derivative(cache.ss[1], cache.xs[2])
        ds[0] = (ds[1] @ params[1]["w"].T) * net.activations[0].derivative(cache.ss[0], cache.xs[1])
        return tuple(ds)

    monkeypatch.setattr(backprop_module, "delta_recursion", no_transpose)
    net = hbp.MLP((3, 4, 4, 4), activation="softplus")
    params, x, y = _setup(net, jnp.float64)
    report = hbp.check_backprop(net, params, x, y)
    assert [r.diagnosis for r in report.layers] == [
        "inherits the error of layer 2", "inductive step (3.5) from layer 3 to 2 is wrong", "ok"]
    assert {leaf.name for leaf in report.leaves if not leaf.ok} == {
        "layer 1 w", "layer 1 b", "layer 2 w", "layer 2 b"}


def test_check_backprop_blames_the_gradient_step(monkeypatch, fresh_jit_caches):
    right = backprop_module.value_and_backprop

    def unsummed_bias(net, params, x, y):
        value, grads = right(net, params, x, y)
        return value, (dict(grads[0], b=2 * grads[0]["b"]),) + grads[1:]

    monkeypatch.setattr(backprop_module, "value_and_backprop", unsummed_bias)
    net = hbp.MLP((3, 4, 2), activation="tanh")
    params, x, y = _setup(net, jnp.float32)
    report = hbp.check_backprop(net, params, x, y)
    assert [leaf.name for leaf in report.leaves if not leaf.ok] == ["layer 1 b"]
    assert all(r.ok for r in report.layers)
    assert "the fault is in the gradient step (3.6)" in str(report)


# -- never a false alarm: random networks ----------------------------------------------------

ELEMENTWISE = sorted(name for name, a in ACTIVATIONS.items() if a.elementwise)


@st.composite
def networks(draw):
    depth = draw(st.integers(1, 5))
    sizes = tuple(draw(st.lists(st.integers(1, 32), min_size=depth + 1, max_size=depth + 1)))
    loss = draw(st.sampled_from(["squared_error", "binary_cross_entropy", "softmax_cross_entropy"]))
    output = draw(st.sampled_from(ELEMENTWISE + ["softmax"])) if loss == "squared_error" else None
    net = hbp.MLP(sizes, activation=tuple(draw(st.sampled_from(ELEMENTWISE)) for _ in range(depth - 1)),
                  output_activation=output, loss=loss, bias=draw(st.booleans()),
                  l2=draw(st.sampled_from([0.0, 0.01])), reduction=draw(st.sampled_from(["mean", "sum"])))
    dtype = draw(st.sampled_from(DTYPES))
    params, x, y = _setup(net, dtype, batch=draw(st.integers(1, 16)), seed=draw(st.integers(0, 2**16)))
    return net, params, x, y


@pytest.mark.slow
@settings(max_examples=10, deadline=None, derandomize=True)
@given(networks())
def test_no_false_alarm_on_random_networks(case):
    net, params, x, y = case
    hbp.check_backprop(net, params, x, y, num_directions=4).raise_if_failed()


@pytest.mark.slow
@settings(max_examples=20, deadline=None, derandomize=True)
@given(networks())
def test_backprop_equals_jax_grad_on_random_networks(case):
    # Same sums in another order: agreement to 64 u of each leaf's largest entry.
    net, params, x, y = case
    hand = jax.jit(hbp.backprop, static_argnums=0)(net, params, x, y)
    auto = jax.jit(jax.grad(hbp.loss, argnums=1), static_argnums=0)(net, params, x, y)
    u = float(jnp.finfo(x.dtype).eps)
    for h, a in zip(jax.tree.leaves(hand), jax.tree.leaves(auto)):
        assert h.dtype == a.dtype and h.shape == a.shape
        assert float(jnp.max(jnp.abs(h - a))) <= 64 * u * float(jnp.max(jnp.abs(a))) + float(jnp.finfo(x.dtype).tiny)


# -- second order: the hand backward pass is itself differentiable ---------------------------


@pytest.mark.parametrize("acts, loss, dtype", covering([(a, l, d) for (a, l), d in itertools.product([
    (("tanh", "logistic"), "squared_error"),
    (("softplus", "elu"), "softmax_cross_entropy"),
    (("leaky_relu", "tanh"), "binary_cross_entropy"),
], DTYPES)], 1))
def test_hessian_vector_products_match(acts, loss, dtype):
    net = hbp.MLP((4, 5, 5, 3), activation=acts, loss=loss, l2=0.01)
    params, x, y = _setup(net, dtype)
    v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape, p.dtype), params)
    hvp = jax.jit(lambda g, p, v: jax.jvp(lambda q: g(net, q, x, y), (p,), (v,))[1], static_argnums=0)
    hand, auto = hvp(hbp.backprop, params, v), hvp(jax.grad(hbp.loss, argnums=1), params, v)
    u = float(jnp.finfo(dtype).eps)
    for h, a in zip(jax.tree.leaves(hand), jax.tree.leaves(auto)):
        assert float(jnp.max(jnp.abs(h - a))) <= 64 * u * float(jnp.max(jnp.abs(a)))


# -- the command -----------------------------------------------------------------------------


def test_cli_verify_prints_and_exits(capsys, monkeypatch, fresh_jit_caches):
    from handbackprop.cli import main

    args = ["verify", "--sizes", "3,4,2", "--activation", "relu", "--loss", "softmax_cross_entropy",
            "--batch", "4", "--directions", "2"]
    assert main(args + ["--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["ok"] is True and [row["name"] for row in d["leaves"]][:2] == ["layer 1 b", "layer 1 w"]
    right = backprop_module.value_and_backprop
    monkeypatch.setattr(backprop_module, "value_and_backprop",
                        lambda *a: (lambda v, g: (v, (dict(g[0], w=-g[0]["w"]),) + g[1:]))(*right(*a)))
    assert main(args + ["--dtype", "float32"]) == 1
    assert "FAIL: 1 of 4 leaves" in capsys.readouterr().out
