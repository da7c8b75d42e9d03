"""Curvature by the recursion against autodiff: jax.jvp(jax.grad), jax.hessian, and the GGN
assembled from jax.jacobian of the map to S^(L) (handbackprop.curvature_check's oracles).

Tolerances (float64): the hand recursion and autodiff sum the same products in other orders,
so they differ by round-off: a few hundred ulps (RTOL = 256 u ~ 6e-14) of the quantity's
largest entry, the size of the terms summed into any entry (see curvature_check).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ACTIVATIONS, make_problem
from jax.flatten_util import ravel_pytree

import handbackprop as hbp
from handbackprop import curvature
from handbackprop import curvature_check as cc

EPS = float(jnp.finfo(jnp.float64).eps)
RTOL = cc.RTOL_ULPS * EPS
# (loss, output activation): every loss, and squared error with logistic and softmax outputs.
HEADS = (("squared_error", None), ("binary_cross_entropy", None), ("softmax_cross_entropy", None),
         ("squared_error", "logistic"), ("squared_error", "softmax"))


def _cases(n, seed):
    """n cases over the grid: activation, head, depth (1-4) and batch (1-7) cycle, so that each
    appears in the first seven; bias, l2 and the reduction are drawn at random."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        loss, out_act = HEADS[i % len(HEADS)]
        out.append(dict(activation=ACTIVATIONS[i % len(ACTIVATIONS)], loss=loss, output_activation=out_act,
                        bias=bool(rng.integers(2)), l2=float(rng.choice([0.0, 0.3])),
                        reduction=str(rng.choice(["mean", "sum"])), depth=1 + i % 4,
                        batch=1 + 3 * i % 7, seed=i))
    return out


def _net(case):
    depth = case["depth"]
    sizes = (3,) + (4, 5, 3)[: depth - 1] + (3,)
    return hbp.MLP(sizes, activation=case["activation"], output_activation=case["output_activation"],
                   loss=case["loss"], bias=case["bias"], l2=case["l2"], reduction=case["reduction"])


@functools.partial(jax.jit, static_argnums=0)
def _quantities(net, params, x, y, v):
    """Every deterministic quantity in one jitted call (one compile per network)."""
    return {
        "ggn_vector_product": hbp.ggn_vector_product(net, params, x, y, v),
        "hessian_vector_product": hbp.hessian_vector_product(net, params, x, y, v),
        "diag_ggn": hbp.diag_ggn(net, params, x, y),
        "per_example_diag_ggn": hbp.per_example_diag_ggn(net, params, x, y),
        "kfac_factors": hbp.kfac_factors(net, params, x, y),
        "diag_hessian": hbp.diag_hessian(net, params, x, y),
    }


def _close(actual, expected, what):
    """``|a - e| <= RTOL max|e|`` over the whole quantity (the size of its summed terms)."""
    scale = max(float(jnp.max(jnp.abs(e))) for e in jax.tree.leaves(expected))
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, what
        np.testing.assert_allclose(a, e, rtol=0, atol=RTOL * scale, err_msg=what)


def _check_case(case):
    net = _net(case)
    params, x, y = make_problem(net, case["batch"], seed=case["seed"])
    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(jax.random.key(case["seed"] + 100), flat.shape, flat.dtype))
    got = _quantities(net, params, x, y, v)
    expected = cc.oracles(net, params, x, y, v)
    for name, oracle in expected.items():
        _close(got[name], oracle, f"{case} {name}")
    # Per-example diagonals reduce to the batch diagonal without L2.
    reduce = jnp.mean if net.reduction == "mean" else jnp.sum
    l2 = unravel(cc._l2_diagonal(net, params))
    summed = jax.tree.map(lambda p, c: reduce(p, axis=0) + c, got["per_example_diag_ggn"], l2)
    _close(summed, got["diag_ggn"], f"{case} per-example sum")


@pytest.mark.parametrize("case", _cases(5, 0), ids=lambda c: f"{c['activation']}-{c['loss']}-{c['output_activation']}")
def test_every_quantity_against_autodiff(case):
    _check_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases(13, 1)[5:], ids=lambda c: f"{c['activation']}-{c['loss']}-{c['output_activation']}")
def test_every_quantity_against_autodiff_more(case):
    _check_case(case)


def _block_indices(net, params, l):
    """Flat indices of layer l's ``[W; b]`` entries, row-major, as ravel_pytree orders them."""
    _, unravel = ravel_pytree(params)
    idx = unravel(jnp.arange(sum(p.size for p in jax.tree.leaves(params)), dtype=jnp.float64))[l]
    rows = [idx["w"], idx["b"][None, :]] if net.bias else [idx["w"]]
    return jnp.concatenate(rows).astype(int).ravel()


@pytest.mark.parametrize("loss,out_act,bias", [("softmax_cross_entropy", None, True),
                                               pytest.param("squared_error", "tanh", False,
                                                            marks=pytest.mark.slow)])
def test_kflr_at_batch_one_is_the_ggn_block(loss, out_act, bias):
    net = hbp.MLP((3, 4, 3), activation="softplus", output_activation=out_act, loss=loss, bias=bias,
                  reduction="sum")
    params, x, y = make_problem(net, 1)
    ggn = cc.ggn_matrix(net, params, x, y)
    factors = jax.jit(hbp.kfac_factors, static_argnums=0)(net, params, x, y)
    for l, (a, g) in enumerate(factors):
        idx = _block_indices(net, params, l)
        block = ggn[jnp.ix_(idx, idx)]
        np.testing.assert_allclose(jnp.kron(a, g), block, rtol=0, atol=RTOL * float(jnp.max(jnp.abs(block))))


def _mc_bound(draws, exact, z=5.0):
    """The mean of N i.i.d. draws is within z standard errors (estimated from the draws) of
    its expectation, entry by entry, but with probability ~6e-7 each at z = 5; plus float64
    rounding of the sums."""
    for d, e in zip(jax.tree.leaves(draws), jax.tree.leaves(exact)):
        n = d.shape[0]
        mean, sd = jnp.mean(d, 0), jnp.std(d, 0, ddof=1)
        err = jnp.abs(mean - e)
        assert bool(jnp.all(err <= z * sd / math.sqrt(n) + 1e3 * EPS * (jnp.abs(e) + 1))), (
            float(jnp.max(err - z * sd / math.sqrt(n))))


@pytest.mark.parametrize("loss,out_act", [h if h[0] == "softmax_cross_entropy" else pytest.param(*h, marks=pytest.mark.slow)
                                          for h in HEADS])
def test_monte_carlo_diagonal_and_kfac_are_unbiased(loss, out_act):
    net = hbp.MLP((3, 4, 3), activation="tanh", output_activation=out_act, loss=loss, l2=0.2)
    params, x, y = make_problem(net, 3)
    keys = jax.random.split(jax.random.key(7), 2000)
    mc = jax.jit(jax.vmap(lambda k: hbp.diag_ggn(net, params, x, y, method="mc", key=k)))(keys)
    _mc_bound(mc, hbp.diag_ggn(net, params, x, y))
    kfac = jax.jit(jax.vmap(lambda k: hbp.kfac_factors(net, params, x, y, kind="kfac", key=k)))(keys)
    kflr = hbp.kfac_factors(net, params, x, y)
    _mc_bound([f.g for f in kfac], [f.g for f in kflr])
    # The L2 term is exact in every draw, never sampled: zero-variance draws of the bias-free part.
    np.testing.assert_array_less(0.2 - 1e-12, mc[0]["w"].min())
    # samples=S averages S draws: the same bound with S draws inside one call.
    many = hbp.diag_ggn(net, params, x, y, method="mc", key=keys[0], samples=2000)
    one_sd = jax.tree.map(lambda d: jnp.std(d, 0, ddof=1), mc)
    for m, e, sd in zip(jax.tree.leaves(many), jax.tree.leaves(hbp.diag_ggn(net, params, x, y)),
                        jax.tree.leaves(one_sd)):
        assert bool(jnp.all(jnp.abs(m - e) <= 5 * sd / math.sqrt(2000) + 1e3 * EPS * (jnp.abs(e) + 1)))


@pytest.mark.parametrize("loss,out_act", HEADS + (("softmax_cross_entropy", "rows"),))
def test_loss_hessian_products_equal_the_factor_columns(loss, out_act):
    """The H products the vector products use and the factor columns the diagonals use hold the
    same matrices: ``H u = sum_c F_c <F_c, u>`` and the residual likewise, per example. Entries
    are O(1) sums of K = 4 products: a few ulps apart, so 64 eps of float64 is tight yet safe."""
    net = hbp.MLP((2, 4), activation="tanh", output_activation=None if out_act == "rows" else out_act, loss=loss)
    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    s, u = jax.random.normal(k1, (5, 4)), jax.random.normal(k2, (5, 4))
    o = net.activations[-1].fn(s)
    y = make_problem(net, 5)[2] if out_act != "rows" else jax.nn.softmax(jax.random.normal(k3, (5, 4)))
    y = hbp.mlp.check_y(net, s, y)

    def apply(cols, signs=None):
        coef = jnp.einsum("cbk,bk->cb", cols, u)
        return jnp.einsum("cb,cbk->bk", coef if signs is None else signs * coef, cols)

    np.testing.assert_allclose(curvature.loss_hessian_product(net, s, o, y, u),
                               apply(curvature.output_factor(net, s, o, y)), rtol=0, atol=64 * EPS)
    residual = curvature.output_residual(net, s, o, y)
    expected = jnp.zeros_like(u) if residual is None else apply(*residual)
    np.testing.assert_allclose(curvature.residual_product(net, s, o, y, u), expected, rtol=0, atol=64 * EPS)


def test_softmax_probability_rows():
    net = hbp.MLP((3, 4, 3), activation="tanh", loss="softmax_cross_entropy")
    params, x, _ = make_problem(net, 4)
    rows = jax.nn.softmax(jax.random.normal(jax.random.key(3), (4, 3)))
    report = hbp.check_curvature(net, params, x, rows)
    assert report.ok, str(report)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtypes_follow_the_parameters(dtype):
    net = hbp.MLP((3, 4, 2), activation="elu", loss="binary_cross_entropy")
    p64, x64, y64 = make_problem(net, 2)
    params, x, y = jax.tree.map(lambda a: a.astype(dtype), (p64, x64, y64))
    got = _quantities(net, params, x, y, params)
    got["mc"] = hbp.diag_ggn(net, params, x, y, method="mc", key=jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(got)} == {jnp.dtype(dtype)}
    if dtype == jnp.float32:  # float32 against the float64 run: a few hundred float32 ulps
        ref = _quantities(net, p64, x64, y64, p64)
        del got["mc"]
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_allclose(a, e, rtol=0, atol=256 * float(jnp.finfo(dtype).eps) * (1 + float(jnp.max(jnp.abs(e)))))


def test_check_curvature_names_the_quantity_and_layer_at_fault(monkeypatch):
    net = hbp.MLP((3, 4, 4, 2), activation="tanh", loss="softmax_cross_entropy", l2=0.1)
    params, x, y = make_problem(net, 3)
    assert hbp.check_curvature(net, params, x, y).ok
    good = hbp.curvature.diag_hessian

    def planted(*args):  # a slip in layer 2's weights only, far above round-off
        d = good(*args)
        return (d[0], {**d[1], "w": d[1]["w"].at[0, 1].add(1e-9)}, d[2])

    monkeypatch.setattr(hbp.curvature, "diag_hessian", planted)
    report = hbp.check_curvature(net, params, x, y)
    assert [(c.quantity, c.layer, c.leaf) for c in report.failures] == [("diag_hessian", 2, "w")]
    assert "FAIL diag_hessian layer 2 w" in str(report)


def test_bad_input_is_a_clear_error():
    net = hbp.MLP((3, 4, 2), loss="softmax_cross_entropy")
    params, x, y = make_problem(net, 2)
    with pytest.raises(ValueError, match="v: expected a pytree like params"):
        hbp.ggn_vector_product(net, params, x, y, params[:1])
    with pytest.raises(ValueError, match=r"v: \[1\]\['w'\] has shape \(2, 4\), expected \(4, 2\)"):
        hbp.hessian_vector_product(net, params, x, y, (params[0], {**params[1], "w": params[1]["w"].T}))
    with pytest.raises(ValueError, match="samples: expected an int >= 1, got 0"):
        hbp.diag_ggn(net, params, x, y, method="mc", key=jax.random.key(0), samples=0)
    with pytest.raises(ValueError, match="key: method='mc' samples labels and needs a jax.random key"):
        hbp.per_example_diag_ggn(net, params, x, y, method="mc")
    with pytest.raises(ValueError, match="key: kind='kfac'"):
        hbp.kfac_factors(net, params, x, y, kind="kfac")
    with pytest.raises(TypeError, match="key: expected one jax.random key"):
        hbp.diag_ggn(net, params, x, y, method="mc", key=3)
    with pytest.raises(ValueError, match=r"method: expected one of \('exact', 'mc'\), got 'fisher'"):
        hbp.diag_ggn(net, params, x, y, method="fisher")
    with pytest.raises(ValueError, match=r"kind: expected one of \('kflr', 'kfac'\), got 'exact'"):
        hbp.kfac_factors(net, params, x, y, kind="exact")
    with pytest.raises(ValueError, match="net: check_curvature forms P x P"):
        big = hbp.MLP((100, 50, 2))
        hbp.check_curvature(big, hbp.init_params(jax.random.key(0), big), jnp.ones((1, 100)), jnp.ones((1, 2)))


def test_a_user_pair_works_for_the_ggn_and_is_refused_for_the_hessian():
    net = hbp.MLP((3, 4, 2), activation=(jnp.sin, jnp.cos), loss="binary_cross_entropy")
    params, x, y = make_problem(net, 3)
    report = hbp.check_curvature(net, params, x, y)  # the GGN quantities only
    assert report.ok and {c.quantity for c in report.checks} == {
        "ggn_vector_product", "diag_ggn", "per_example_diag_ggn", "kfac_factors"}
    for fn in (hbp.diag_hessian, lambda *a: hbp.hessian_vector_product(*a, params)):
        with pytest.raises(ValueError, match="layer 1: activation 'sin' has no second derivative"):
            fn(net, params, x, y)


# -- BackPACK (PyTorch), where it is installed: DiagGGNExact, DiagHessian, KFLR in float64 -----


# BackPACK's module hooks fire with no input requiring a gradient (ours is a constant x): torch
# says so; the extensions still see every layer's output gradient.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("act,loss", [("tanh", "softmax_cross_entropy"), ("logistic", "squared_error")])
def test_against_backpack(act, loss):
    torch = pytest.importorskip("torch")
    backpack = pytest.importorskip("backpack")
    from backpack import extend
    from backpack.extensions import KFLR, DiagGGNExact, DiagHessian

    net = hbp.MLP((4, 5, 3), activation=act, loss=loss)
    params, x, y = make_problem(net, 6)
    layers = []
    for p, g in zip(params, ("Tanh" if act == "tanh" else "Sigmoid", None)):
        lin = torch.nn.Linear(*p["w"].shape).double()
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(np.asarray(p["w"]).T))
            lin.bias.copy_(torch.tensor(np.asarray(p["b"])))
        layers += [lin] + ([getattr(torch.nn, g)()] if g else [])
    model = extend(torch.nn.Sequential(*layers))
    if loss == "softmax_cross_entropy":
        lossfn, target = extend(torch.nn.CrossEntropyLoss()), torch.tensor(np.asarray(y))
    else:  # BackPACK's MSELoss is sum (o - y)^2 / (B K): ours is 1/2 sum_k (o - y)^2 / B, so x K/2
        lossfn, target = extend(torch.nn.MSELoss()), torch.tensor(np.asarray(y))
    factor = 1.0 if loss == "softmax_cross_entropy" else net.sizes[-1] / 2
    out = lossfn(model(torch.tensor(np.asarray(x))), target)
    with backpack.backpack(DiagGGNExact(), DiagHessian(), KFLR()):
        out.backward()
    diag_g, diag_h = hbp.diag_ggn(net, params, x, y), hbp.diag_hessian(net, params, x, y)
    kflr = hbp.kfac_factors(net, params, x, y)
    lins = [m for m in model if isinstance(m, torch.nn.Linear)]
    for l, lin in enumerate(lins):
        for ours, theirs in ((diag_g[l]["w"].T, lin.weight.diag_ggn_exact), (diag_g[l]["b"], lin.bias.diag_ggn_exact),
                             (diag_h[l]["w"].T, lin.weight.diag_h), (diag_h[l]["b"], lin.bias.diag_h)):
            np.testing.assert_allclose(ours, factor * theirs.detach().numpy(), rtol=1e-12, atol=1e-14)
        # BackPACK's [G, A] for the weight in torch's (d_out, d_in) layout: kron(G, A) is ours
        # kron(a, g) (weights only: a without the ones column) with the two factors swapped.
        g_theirs, a_theirs = lin.weight.kflr
        np.testing.assert_allclose(jnp.kron(kflr[l].g, kflr[l].a[:-1, :-1]),
                                   factor * np.kron(g_theirs.detach().numpy(), a_theirs.detach().numpy()),
                                   rtol=1e-12, atol=1e-14)
