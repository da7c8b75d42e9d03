"""numerical_grad: within its error model of the exact gradient, and equal to reference/'s loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handbackprop as hbp
from handbackprop import finite_diff
from reference import backprop as ref
from reference import finite_diff as ref_fd

DTYPES = (jnp.float32, jnp.float64)


def _cubic(p, a):
    """f = sum a_i θ_i^3 + sum sin(b): f''' = 6 a_i along θ_i, -cos along b."""
    return jnp.sum(a * p["t"] ** 3) + jnp.sum(jnp.sin(p["b"]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["central", "forward"])
def test_within_error_model(dtype, method):
    # Truncation: h^2 |f'''| / 6 (central), h |f''| / 2 (forward), f''' and f'' known here;
    # round-off: the difference of two evaluations, each off by at most ~n u sum|terms|,
    # divided by the step; allow 4x the model.
    key_t, key_a = jax.random.split(jax.random.key(0))
    p = {"t": jax.random.uniform(key_t, (7,), dtype, -3, 3), "b": jnp.linspace(-2, 2, 5, dtype=dtype)}
    a = jax.random.normal(key_a, (7,), dtype)
    u = float(jnp.finfo(dtype).eps)
    num = hbp.numerical_grad(_cubic, p, a, method=method)
    exact = jax.grad(_cubic)(p, a)
    assert jax.tree.map(lambda x: x.dtype, num) == jax.tree.map(lambda x: x.dtype, p)
    terms = float(jnp.sum(jnp.abs(a * p["t"] ** 3)) + 5)
    for name, d2, d3 in (("t", 6 * a * p["t"], 6 * a), ("b", -jnp.sin(p["b"]), -jnp.cos(p["b"]))):
        h = u ** finite_diff.ORDER[method] * jnp.maximum(1, jnp.abs(p[name]))
        trunc = h**2 * jnp.abs(d3) / 6 if method == "central" else h * jnp.abs(d2) / 2 + h**2 * jnp.abs(d3) / 6
        bound = 4 * (trunc + 12 * u * terms / h)
        assert jnp.all(jnp.abs(num[name] - exact[name]) <= bound), (name, num[name] - exact[name], bound)


def test_float32_beats_a_fixed_step():
    # check_grads' fixed 1e-4 step in float32 leaves round-off of ~u|f|/1e-4 ~ 1e-3 |f|;
    # the cbrt(u) step keeps the error near u^(2/3) ~ 2e-5.
    p = {"t": jnp.linspace(0.5, 1.5, 6, dtype=jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    a = jnp.full((6,), 10.0, jnp.float32)
    exact = jax.grad(_cubic)(p, a)["t"]
    ours = hbp.numerical_grad(_cubic, p, a)["t"]
    fixed = hbp.numerical_grad(_cubic, p, a, eps=1e-4)["t"]
    err = lambda g: float(jnp.max(jnp.abs(g - exact) / jnp.abs(exact)))  # noqa: E731
    assert err(ours) < 1e-4 < err(fixed)


NET_CASES = [
    (dict(sizes=(3, 4, 2), activation="tanh"), "squared_error"),
    (dict(sizes=(2, 3, 3, 4), activation=("relu", "elu"), loss="softmax_cross_entropy", l2=0.1), None),
    (dict(sizes=(3, 2), loss="binary_cross_entropy", bias=False, reduction="sum"), None),
]


def _net_case(spec):
    kwargs, _ = spec
    net = hbp.MLP(**kwargs)
    kp, kx, ky = jax.random.split(jax.random.key(3), 3)
    params = hbp.init_params(kp, net, jnp.float64)
    params = jax.tree.map(lambda w: w + 0.1, params)  # nonzero biases too
    x = jax.random.normal(kx, (5, net.sizes[0]), jnp.float64)
    k = net.sizes[-1]
    y = {"squared_error": jax.random.normal(ky, (5, k), jnp.float64),
         "binary_cross_entropy": jax.random.bernoulli(ky, 0.5, (5, k)).astype(jnp.float64),
         "softmax_cross_entropy": jax.random.randint(ky, (5,), 0, k)}[net.loss]
    acts = [g.name for g in net.activations]
    ref_loss = lambda p: ref.loss(p, x, y, acts, net.loss, net.bias, net.l2, net.reduction)  # noqa: E731
    return net, params, x, y, ref_loss


@pytest.mark.parametrize("spec", NET_CASES, ids=lambda s: "-".join(map(str, s[0]["sizes"])))
def test_reproduces_reference_central(spec):
    # Same steps, same divisor (the step taken); only the two loss implementations' round-off
    # differs: each evaluation is off by a few u |f|, so D by a few u |f| / h.
    net, params, x, y, ref_loss = _net_case(spec)
    ours = hbp.numerical_grad(lambda p: hbp.loss(net, p, x, y), params)
    theirs = ref_fd.central_difference_gradient(ref_loss, params)
    f = abs(ref_loss(params))
    u = float(jnp.finfo(jnp.float64).eps)
    for o, t, p in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), jax.tree.leaves(params)):
        h = np.cbrt(u) * np.maximum(1, np.abs(np.asarray(p)))
        np.testing.assert_array_less(np.abs(np.asarray(o) - t), 64 * u * max(f, 1) / h)


@pytest.mark.parametrize("spec", NET_CASES[:2], ids=lambda s: "-".join(map(str, s[0]["sizes"])))
def test_reproduces_reference_forward(spec):
    # The note's formula with h = 1e-7 (|θ| < 1 here, so the relative step is the step).
    net, params, x, y, ref_loss = _net_case(spec)
    params = jax.tree.map(lambda w: jnp.clip(w, -0.9, 0.9), params)
    ours = hbp.numerical_grad(lambda p: hbp.loss(net, p, x, y), params, method="forward", eps=1e-7)
    theirs = ref_fd.forward_difference_gradient(ref_loss, params, h=1e-7)
    u = float(jnp.finfo(jnp.float64).eps)
    for o, t in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_less(np.abs(np.asarray(o) - t), 64 * u * max(abs(ref_loss(params)), 1) / 1e-7)


def test_chunked_map_equals_one_chunk(monkeypatch):
    f = lambda p: jnp.sum(jnp.tanh(p["w"]) ** 2) + jnp.sum(p["v"] ** 3)  # noqa: E731
    p = {"w": jnp.linspace(-1, 1, 13).reshape(13, 1), "v": jnp.arange(4.0)}
    whole = hbp.numerical_grad(f, p)
    monkeypatch.setattr(finite_diff, "CHUNK_ELEMENTS", 40)  # 40 // (17 * 2) = 1 coordinate a chunk
    chunked = hbp.numerical_grad(lambda q: f(q), p)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_array_equal(a, b)


def test_any_pytree_and_args():
    f = lambda p, c: c * (p[0] ** 2).sum() + p[1]["z"].prod()  # noqa: E731
    p = (jnp.array([[1.0, 2.0]]), {"z": jnp.array([3.0, 4.0])})
    g = hbp.numerical_grad(f, p, 2.0)
    np.testing.assert_allclose(g[0], [[4.0, 8.0]], rtol=1e-9)
    np.testing.assert_allclose(g[1]["z"], [4.0, 3.0], rtol=1e-9)


def test_errors_name_the_argument():
    p = {"a": jnp.ones(3)}
    with pytest.raises(ValueError, match="method"):
        hbp.numerical_grad(jnp.sum, p, method="backward")
    with pytest.raises(ValueError, match="eps"):
        hbp.numerical_grad(lambda q: jnp.sum(q["a"]), p, eps=0.0)
    with pytest.raises(TypeError, match="f: expected a function returning a floating scalar"):
        hbp.numerical_grad(lambda q: q["a"], p)
    with pytest.raises(TypeError, match=r"params\['i'\]: dtype int"):
        hbp.numerical_grad(lambda q: jnp.sum(q["i"]), {"i": jnp.arange(3)})


def test_warns_when_float64_is_asked_without_x64():
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.warns(UserWarning, match="jax_enable_x64 is off"):
            hbp.numerical_grad(lambda q: jnp.sum(q["a"] ** 2), {"a": np.ones(2, np.float64)})
    finally:
        jax.config.update("jax_enable_x64", True)


def test_no_constant_folding_alarm_at_100k_parameters():
    # The directions' leaf masks were a jnp.repeat that XLA constant-folded for seconds, with
    # error-level slow_operation_alarm lines on stderr (1.4 s at 68k parameters, 12 s at 670k);
    # XLA prints the alarm past 1 s of folding. 101,130 parameters, one direction per leaf.
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp, handbackprop as hbp\n"
        "net = hbp.MLP((384, 256, 10))\n"
        "p = hbp.init_params(jax.random.key(0), net)\n"
        "r = hbp.check_backprop(net, p, jnp.ones((2, 384)), jnp.zeros((2, 10)), num_directions=1)\n"
        "print(r.ok, r.exhaustive)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]
    assert "slow_operation_alarm" not in out.stderr and "Constant folding" not in out.stderr, out.stderr
