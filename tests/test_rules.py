"""verify_vjp, verify_jvp, verify_rule on realistic rules: every correct rule passes (at kinks,
at magnitudes 1e6 and 1e-6), every planted bug is caught and named at its block."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handbackprop as hbp
from handbackprop import testing


def _failing(report):
    return [row.name for row in report.leaves if not row.ok]


def _x(shape, seed=0, scale=1.0, dtype=jnp.float64):
    return scale * jax.random.normal(jax.random.key(seed), shape, dtype)


# -- a layer norm with a hand VJP (custom_vjp) -------------------------------------------------


def _ln(x, g, b):
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    r = 1 / jnp.sqrt((xc**2).mean(-1, keepdims=True) + 1e-5)
    return xc * r * g[None, :] + b[None, :]


def _ln_bwd_parts(x, g, dy, drop_term=False, axis=0):
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    r = 1 / jnp.sqrt((xc**2).mean(-1, keepdims=True) + 1e-5)
    xh = xc * r
    dxh = dy * g[None, :]
    # dx = r (dxh - mean(dxh) - xh mean(dxh xh)): the last term is the variance's
    dx = r * (dxh - dxh.mean(-1, keepdims=True) - (0 if drop_term else xh * (dxh * xh).mean(-1, keepdims=True)))
    return dx, (dy * xh).sum(axis), dy.sum(0)


def _layer_norm(**bug):
    ln = jax.custom_vjp(_ln)  # one primal for every variant: the checks compile once
    ln.defvjp(lambda x, g, b: (_ln(x, g, b), (x, g)), lambda res, dy: _ln_bwd_parts(*res, dy, **bug))
    return ln


LN_PRIMALS = (_x((16, 16)), 1 + 0.1 * _x((16,), 1), 0.1 * _x((16,), 2))


def test_layer_norm_rule_passes_and_planted_bugs_are_named():
    assert hbp.verify_rule(_layer_norm(), *LN_PRIMALS).ok
    assert _failing(hbp.verify_rule(_layer_norm(drop_term=True), *LN_PRIMALS)) == ["arg0 -> out"]
    assert _failing(hbp.verify_rule(_layer_norm(axis=1), *LN_PRIMALS)) == ["arg1 -> out"]  # sum over the wrong axis


# -- softmax cross-entropy with integer labels: a held-fixed argument ------------------------


def _xent(logits, labels):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0])


def _xent_rule(sign=1.0):
    xent = jax.custom_vjp(_xent)

    def bwd(res, g):
        logits, labels = res
        p = jax.nn.softmax(logits)
        return (sign * g * (p - jax.nn.one_hot(labels, logits.shape[-1], dtype=p.dtype)) / logits.shape[0], None)

    xent.defvjp(lambda lg, lb: (_xent(lg, lb), (lg, lb)), bwd)
    return xent


@pytest.mark.slow
def test_softmax_cross_entropy_integer_labels_held_fixed():
    logits, labels = _x((8, 10)), jnp.arange(8) % 10
    report = hbp.verify_rule(_xent_rule(), logits, labels)
    assert report.ok and [row.name for row in report.leaves] == ["arg0 -> out", "out (forward rule's output)"]
    assert _failing(hbp.verify_rule(_xent_rule(-1.0), logits, labels)) == ["arg0 -> out"]  # wrong sign
    with pytest.raises(TypeError, match="argnums: primal 1 has non-floating leaves"):
        hbp.verify_rule(_xent_rule(), logits, labels, argnums=(0, 1))


# -- attention with q, k, v and a hand VJP (verify_vjp) ----------------------------------------


def _attention(q, k, v):
    return jax.nn.softmax(q @ k.T / np.sqrt(q.shape[-1])) @ v


def _attention_vjp(primals, do, transpose_bug=False):
    q, k, v = primals
    c = 1 / np.sqrt(q.shape[-1])
    p = jax.nn.softmax(q @ k.T * c)
    dv = p.T @ do
    dp = do @ v.T
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = ds @ k * c
    dk = (ds if transpose_bug else ds.T) @ q * c  # the bug: ds for ds.T (square: same shape)
    return dq, dk, dv


@pytest.mark.slow
def test_attention_vjp_and_a_missing_transpose():
    q, k, v = _x((8, 8), 0), _x((8, 8), 1), _x((8, 4), 2)
    assert hbp.verify_vjp(_attention, _attention_vjp, q, k, v).ok
    bad = functools.partial(_attention_vjp, transpose_bug=True)
    assert _failing(hbp.verify_vjp(_attention, bad, q, k, v)) == ["arg1 -> out"]


# -- a 1-D convolution through lax.conv_general_dilated, and a short RNN --------------------


def _conv(x, w):  # x (N, C, W), w (O, C, K)
    return jax.lax.conv_general_dilated(x, w, (1,), "VALID")


@pytest.mark.slow
def test_conv1d_vjp_by_hand_and_a_wrong_residual():
    x, w = _x((2, 3, 12), 0), _x((4, 3, 5), 1)

    def vjp(primals, g, bug=False):
        x, w = primals
        _, pull = jax.vjp(_conv, x if not bug else 2 * x, w)  # the bug: a wrong saved input
        return pull(g)

    assert hbp.verify_vjp(_conv, vjp, x, w).ok
    assert _failing(hbp.verify_vjp(_conv, functools.partial(vjp, bug=True), x, w)) == ["arg1 -> out"]


def _rnn(h0, w, xs):
    h = h0
    for x in xs:
        h = jnp.tanh(h @ w + x)
    return h


def _rnn_vjp(primals, g, drop=False):
    h0, w, xs = primals
    hs = [h0]
    for x in xs:
        hs.append(jnp.tanh(hs[-1] @ w + x))
    dw, dxs, dh = jnp.zeros_like(w), [], g
    for t in range(len(xs) - 1, -1, -1):  # backpropagation through time
        ds = dh * (1 - hs[t + 1] ** 2)
        dw = dw + hs[t].T @ ds
        dxs.append(ds)
        dh = ds @ w.T if not (drop and t == 0) else 0 * dh  # the bug: the last step back dropped
    return dh, dw, jnp.stack(dxs[::-1])


@pytest.mark.slow
def test_rnn_unrolled_hand_vjp_and_a_dropped_term():
    h0, w, xs = _x((2, 6), 0), 0.5 * _x((6, 6), 1), _x((4, 2, 6), 2)
    assert hbp.verify_vjp(_rnn, _rnn_vjp, h0, w, xs).ok
    assert _failing(hbp.verify_vjp(_rnn, functools.partial(_rnn_vjp, drop=True), h0, w, xs)) == ["arg0 -> out"]


# -- custom_jvp: logsumexp, a norm with a kink at 0, JAX's own rules ------------------------


def _lse(x):
    m = jax.lax.stop_gradient(x.max(-1, keepdims=True))
    return jnp.log(jnp.exp(x - m).sum(-1)) + m[..., 0]


def _lse_rule(bug=False):
    lse = jax.custom_jvp(_lse)

    @lse.defjvp
    def _(primals, tangents):
        (x,), (t,) = primals, tangents
        p = jax.nn.softmax(x if not bug else 2 * x)
        return lse(x), (p * t).sum(-1)

    return lse


@pytest.mark.slow
def test_logsumexp_custom_jvp_at_large_and_small_magnitudes():
    for scale in (1e-6, 1.0, 1e6):
        assert hbp.verify_rule(_lse_rule(), _x((4, 8), scale=scale)).ok, scale
    assert _failing(hbp.verify_rule(_lse_rule(bug=True), _x((4, 8)))) == ["arg0 -> out"]
    # the rule as a jvp_fn: verify_jvp also checks its primal output
    f = _lse_rule()
    rule = lambda p, t: (f(*p), jax.jvp(f, p, t)[1])  # noqa: E731
    assert hbp.verify_jvp(f, rule, _x((4, 8))).ok
    off = lambda p, t: (f(*p) + 1e-3, jax.jvp(f, p, t)[1])  # noqa: E731
    assert _failing(hbp.verify_jvp(f, off, _x((4, 8)))) == ["out (jvp_fn's primal output)"]
    affine = lambda p, t: (f(*p), jax.jvp(f, p, t)[1] + 1e-3)  # noqa: E731  (not linear in t)
    assert _failing(hbp.verify_jvp(f, affine, _x((4, 8)))) == ["out (jvp_fn's tangent of zero tangents)"]


@jax.custom_jvp
def _safe_norm(x):
    return jnp.sqrt(jnp.sum(x**2))


@_safe_norm.defjvp
def _safe_norm_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    n = _safe_norm(x)
    return n, jnp.where(n > 0, jnp.vdot(x, t) / jnp.where(n > 0, n, 1), 0.0)


@pytest.mark.slow
def test_kinks_are_no_false_alarm():
    # at 0 the norm's primal autodiff is NaN and every direction crosses the kink: skipped
    assert hbp.verify_rule(_safe_norm, jnp.zeros(5)).ok
    assert hbp.verify_rule(_safe_norm, _x((5,))).ok
    x = jnp.array([-1.0, -1e-9, 0.0, 1e-9, 0.5, 2.0])  # relu's kink at and near 0
    assert hbp.verify_rule(jax.nn.relu, x).ok
    assert hbp.verify_rule(jnp.logaddexp, _x((6,)), _x((6,), 1)).ok


# -- planted: one entry off by 1e-3, a uniform 1 + 1e-5 scale, a forward rule off -------------


def _tanh_rule(scale=1.0, entry=None, fwd_off=0.0):
    f = jax.custom_vjp(jnp.tanh)

    def bwd(x, g):
        d = g * (1 - jnp.tanh(x) ** 2) * scale
        return ((d if entry is None else d.at[entry].multiply(1 + 1e-3)),)

    f.defvjp(lambda x: (jnp.tanh(x) + fwd_off, x), bwd)
    return f


def test_one_entry_a_uniform_scale_and_a_forward_rule_are_caught():
    x = _x((32, 32))
    assert hbp.verify_rule(_tanh_rule(), x).ok
    report = hbp.verify_rule(_tanh_rule(entry=(3, 7)), x)
    assert _failing(report) == ["arg0 -> out"] and report.leaves[0].index == (3, 7)
    assert _failing(hbp.verify_rule(_tanh_rule(scale=1 + 1e-5), x)) == ["arg0 -> out"]  # float64
    assert _failing(hbp.verify_rule(_tanh_rule(fwd_off=1e-6), x)) == ["out (forward rule's output)"]


# -- order 2, several outputs, the report's text and JSON, the testing helpers ---------------


@pytest.mark.slow
def test_order_two_checks_the_vjp_derivative():
    cube = jax.custom_vjp(lambda x: x**3)
    cube.defvjp(lambda x: (x**3, x), lambda x, g: (3 * x**2 * g,))
    assert hbp.verify_rule(cube, _x((6,)), order=2).ok
    # right at first order, but the residual is cut off from differentiation: d(VJP)/dx = 0
    frozen = jax.custom_vjp(lambda x: x**3)
    frozen.defvjp(lambda x: (x**3, x), lambda x, g: (3 * jax.lax.stop_gradient(x**2) * g,))
    report = hbp.verify_rule(frozen, _x((6,)), order=2)
    assert _failing(report) == ["order 2: arg0 -> out[0]"]


def test_several_outputs_name_each_block_and_report_text_json():
    f = lambda x, w: {"y": jnp.sin(x) @ w, "z": jnp.cos(x).sum()}  # noqa: E731

    def vjp(primals, g):
        x, w = primals
        return (jnp.cos(x) * (g["y"] @ w.T) - jnp.sin(x) * g["z"], jnp.sin(x).T @ g["y"] * (1 + 1e-3))

    report = hbp.verify_vjp(f, vjp, _x((3, 4)), _x((4, 2), 1))
    assert _failing(report) == ["arg1 -> out['y']"]
    assert [row.name for row in report.leaves] == ["arg0 -> out['y']", "arg1 -> out['y']",
                                                   "arg0 -> out['z']", "arg1 -> out['z']"]
    text = str(report)
    assert text.startswith("vjp check: 4 blocks") and "FAIL: 1 of 4 blocks" in text and "arg1 -> out['y']" in text
    assert json.loads(json.dumps(report.to_dict()))["ok"] is False
    with pytest.raises(AssertionError, match=r"arg1 -> out\['y'\]") as e:
        testing.assert_vjp(f, vjp, _x((3, 4)), _x((4, 2), 1))
    assert str(e.value) == text


@pytest.mark.slow
def test_testing_helpers_pass_and_fail():
    x = _x((5,))
    testing.assert_rule(_tanh_rule(), x)
    testing.assert_jvp(jnp.sin, lambda p, t: (jnp.sin(p[0]), jnp.cos(p[0]) * t[0]), x)
    testing.assert_gradient(lambda p: jnp.sum(p**3), lambda p: 3 * p**2, x)
    with pytest.raises(AssertionError, match="FAIL"):
        testing.assert_gradient(lambda p: jnp.sum(p**3), lambda p: 2 * p**2, x)
    with pytest.raises(AssertionError, match="arg0 -> out"):
        testing.assert_rule(_tanh_rule(scale=-1.0), x)


# -- low precision: a bfloat16 matmul-plus-activation kernel with a float32 reference ---------


def _mm_act(x, w):
    return jax.nn.gelu(x @ w)


def _bf16_kernel(block_error=0.0):
    k = jax.custom_vjp(_mm_act)

    def bwd(res, g):
        x, w = res
        _, pull = jax.vjp(_mm_act, x, w)
        dx, dw = pull(g)
        return dx, dw * (1 + block_error)

    k.defvjp(lambda x, w: (_mm_act(x, w), (x, w)), bwd)
    return k


@pytest.mark.slow
def test_bfloat16_kernel_against_a_reference():
    x, w = _x((16, 32), 0, dtype=jnp.bfloat16), _x((32, 16), 1, 0.2, dtype=jnp.bfloat16)
    # plain jnp, in whatever dtype it is given: float64 here (x64 on), float32 without x64
    report = hbp.verify_rule(_bf16_kernel(), x, w, reference=_mm_act)
    assert report.ok, report
    assert "reference mode" in report.notes[0]
    bad = hbp.verify_rule(_bf16_kernel(0.02), x, w, reference=_mm_act)
    assert _failing(bad) == ["arg1 -> out"]  # a 2% error in one block
    upcast = hbp.verify_rule(_bf16_kernel(), x, w)  # no reference: checked upcast
    assert upcast.ok and "upcast to float64" in upcast.notes[0]


# -- a Pallas kernel (interpret=True) wrapped in custom_vjp: no autodiff oracle -----------------


def _pallas_square(x):
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] * x_ref[...]

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x)


@pytest.mark.slow
def test_pallas_kernel_rule_by_finite_differences():
    def rule(c):
        sq = jax.custom_vjp(_pallas_square)
        sq.defvjp(lambda x: (_pallas_square(x), x), lambda x, g: (c * x * g,))
        return sq

    x = _x((8,))
    report = hbp.verify_rule(rule(2.0), x)
    assert report.ok, report
    assert _failing(hbp.verify_rule(rule(-2.0), x)) == ["arg0 -> out"]


@pytest.mark.slow
def test_one_wrong_entry_among_1e5_outputs():
    x = _x((100, 1000))
    assert hbp.verify_rule(_tanh_rule(), x).ok
    report = hbp.verify_rule(_tanh_rule(entry=(42, 137)), x)
    assert _failing(report) == ["arg0 -> out"] and report.leaves[0].index == (42, 137)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="order: expected 1 or 2"):
        hbp.verify_rule(jnp.sin, jnp.ones(3), order=3)
    with pytest.raises(ValueError, match="num_directions"):
        hbp.verify_rule(jnp.sin, jnp.ones(3), num_directions=0)
    with pytest.raises(ValueError, match="argnums: expected positions in"):
        hbp.verify_rule(jnp.sin, jnp.ones(3), argnums=2)
    with pytest.raises(ValueError, match="vjp_fn: expected a tuple of 1 cotangents"):
        hbp.verify_vjp(jnp.sin, lambda p, g: g, jnp.ones(3))
    with pytest.raises(TypeError, match="f: expected a function returning a pytree of floating"):
        hbp.verify_rule(lambda x: (x > 0), jnp.ones(3))


# -- the cases benchmarks/verifier.py runs through both verify_rule and check_grads ------------


def as_rule(f, vjp_fn):
    """``f`` with ``vjp_fn`` as its custom_vjp rule, so that any rule checker sees the hand VJP."""
    rule = jax.custom_vjp(f)
    rule.defvjp(lambda *p: (f(*p), p), lambda p, g: tuple(vjp_fn(p, g)))
    return rule


def cases():
    """``{name: (f, primals, planted bug?)}``: the rules above, right and with their bugs, each
    a function of floating primals only (integer arguments closed over)."""
    labels = jnp.arange(8) % 10
    xent = lambda r: lambda lg: r(lg, labels)  # noqa: E731
    qkv = (_x((8, 8), 0), _x((8, 8), 1), _x((8, 4), 2))
    conv = (_x((2, 3, 12), 0), _x((4, 3, 5), 1))

    def conv_vjp(bug):
        return lambda p, g: jax.vjp(_conv, 2 * p[0] if bug else p[0], p[1])[1](g)

    rnn = (_x((2, 6), 0), 0.5 * _x((6, 6), 1), _x((4, 2, 6), 2))
    x32 = _x((32, 32))
    bf = (_x((16, 32), 0, dtype=jnp.bfloat16), _x((32, 16), 1, 0.2, dtype=jnp.bfloat16))
    return {
        "layer norm": (_layer_norm(), LN_PRIMALS, False),
        "layer norm, dropped term": (_layer_norm(drop_term=True), LN_PRIMALS, True),
        "layer norm, sum over the wrong axis": (_layer_norm(axis=1), LN_PRIMALS, True),
        "softmax cross-entropy": (xent(_xent_rule()), (_x((8, 10)),), False),
        "softmax cross-entropy, wrong sign": (xent(_xent_rule(-1.0)), (_x((8, 10)),), True),
        "attention": (as_rule(_attention, _attention_vjp), qkv, False),
        "attention, missing transpose": (
            as_rule(_attention, functools.partial(_attention_vjp, transpose_bug=True)), qkv, True),
        "conv1d": (as_rule(_conv, conv_vjp(False)), conv, False),
        "conv1d, wrong residual": (as_rule(_conv, conv_vjp(True)), conv, True),
        "rnn": (as_rule(_rnn, _rnn_vjp), rnn, False),
        "rnn, dropped term": (as_rule(_rnn, functools.partial(_rnn_vjp, drop=True)), rnn, True),
        "logsumexp custom_jvp": (_lse_rule(), (_x((4, 8)),), False),
        "logsumexp at 1e6": (_lse_rule(), (_x((4, 8), scale=1e6),), False),
        "logsumexp at 1e-6": (_lse_rule(), (_x((4, 8), scale=1e-6),), False),
        "logsumexp, wrong residual": (_lse_rule(bug=True), (_x((4, 8)),), True),
        "norm at its kink (0)": (_safe_norm, (jnp.zeros(5),), False),
        "relu at and near 0": (jax.nn.relu, (jnp.array([-1.0, -1e-9, 0.0, 1e-9, 0.5, 2.0]),), False),
        "logaddexp": (jnp.logaddexp, (_x((6,)), _x((6,), 1)), False),
        "tanh": (_tanh_rule(), (x32,), False),
        "tanh, one entry 1e-3": (_tanh_rule(entry=(3, 7)), (x32,), True),
        "tanh, uniform 1 + 1e-5 (float64)": (_tanh_rule(scale=1 + 1e-5), (x32,), True),
        "tanh, forward rule off by 1e-6": (_tanh_rule(fwd_off=1e-6), (x32,), True),
        "bfloat16 matmul + gelu": (_bf16_kernel(), bf, False),
        "bfloat16 matmul + gelu, 2% in dW": (_bf16_kernel(0.02), bf, True),
    }


# -- exhaustive: the worst (output index, input index) entry of the Jacobian -------------------


def test_exhaustive_names_the_worst_jacobian_entry():
    x, w = _x((6, 5)), _x((5, 4), seed=1)
    f = lambda x, w: (jnp.tanh(x @ w), jnp.sum(x**3, axis=1))  # noqa: E731

    def vjp(primals, g, bug=False):
        x, w = primals
        d = g[0] * (1 - jnp.tanh(x @ w) ** 2)
        dx = d @ w.T + 3 * x**2 * g[1][:, None]
        if bug:  # d out[1][4] / d x[4, 2] off by 1e-3: far above float64's ~1e-10 tolerances
            dx = dx.at[4, 2].add(1e-3 * g[1][4])
        return dx, x.T @ d

    good = hbp.verify_vjp(f, vjp, x, w)
    assert good.ok, good
    assert all(row.output_index is not None for row in good.leaves)
    report = hbp.verify_vjp(f, functools.partial(vjp, bug=True), x, w)
    assert _failing(report) == ["arg0 -> out[1]"]
    row = next(r for r in report.leaves if not r.ok)
    assert (row.output_index, row.index) == ((4,), (4, 2))
    # the entry's values: the rule's off by exactly the planted 1e-3 from autodiff and from
    # finite differences (those agree to float64's truncation, ~1e-10 at h = cbrt(u))
    assert abs(row.yours - row.autodiff - 1e-3) < 1e-12 and abs(row.finite_diff - row.autodiff) < 1e-8
    assert "arg0 -> out[1]: worst at out[1][4] / arg0[4, 2]: yours" in str(report)


def test_exhaustive_rule_check_names_the_pair_and_gradient_text_is_unchanged():
    x = _x((8, 8))
    report = hbp.verify_rule(_tanh_rule(entry=(3, 7)), x)
    assert _failing(report) == ["arg0 -> out"]
    assert (report.leaves[0].output_index, report.leaves[0].index) == ((3, 7), (3, 7))
    assert "arg0 -> out: worst at out[3, 7] / arg0[3, 7]:" in str(report)
    # a scalar loss has no output index: verify_gradient's rows carry none
    grad = hbp.verify_gradient(lambda p: jnp.sum(jnp.tanh(p) ** 2), lambda p: 0.0 * p, x)
    assert not grad.ok and all(r.output_index is None for r in grad.leaves)
    assert "worst at (" in str(grad)
