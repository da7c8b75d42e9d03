"""Curvature by the delta recursion: Gauss-Newton and Hessian products, diagonals, Kronecker factors.

Write ``H_b`` for the Hessian of example b's loss e_b with respect to the top pre-activation
``S_b^(L)`` (K x K), and ``J_b = dS_b^(L)/dparams``. For the canonical pairs

    identity + squared error              H = I
    logistic + binary cross-entropy       H = diag(sigma (1 - sigma))
    softmax + softmax cross-entropy       H = r (diag(p) - p p^T),   r = the label row's sum (1)

and for squared error with any other output activation the Hessian is taken with respect to
the output o (``I``) and ``g_L'`` goes into J (``J_b = do_b/dparams``). The generalised Gauss-
Newton matrix is ``G = r_B sum_b J_b^T H_b J_b`` (``r_B = 1/B`` for the mean, 1 for the sum)
plus ``l2`` on the weight entries. Each ``H_b`` is written in S-space as ``F_b F_b^T`` with K
factor columns (``F = diag(sqrt p) - p sqrt(p)^T`` for softmax), and a column of F is sent down
the network exactly like a delta, by the inductive step (3.5)
(:func:`handbackprop.backprop.backward`, the K columns as a leading axis); the vector
products need no columns and apply H_b to the tangent directly (:func:`loss_hessian_product`):

    G v            R{S^(l)} = R{x^(l-1)} W + x^(l-1) V + R{b},  R{x^(l)} = g'(S^(l)) R{S^(l)}
                   (a tangent forward pass), then H R{S^(L)} backwards by (3.5) and (3.6)
    H v            the tangent of the backward pass too (Pearlmutter's R-operator):
                   R{delta^(l-1)} = (R{delta} W^T + delta V^T) g'(S) + (delta W^T) g''(S) R{S},
                   R{dE/dW} = R{x}^T delta + x^T R{delta}
    diag(G)        sum_k (x^(l-1))^2T (D_k^(l))^2 over the factor columns D_k
    KFLR / KFAC    a = x_aug^T x_aug / B,  g = r_B sum_b sum_k D_bk^T D_bk
    diag(Hessian)  the same columns plus, at every hidden layer, the residual
                   diag(g''(S) (delta W^T)) as signed columns (Hessian backpropagation)

The Monte Carlo variants replace F by one column per sample: the gradient of the loss at a
label drawn from the model's own predictive distribution (categorical, Bernoulli, or
``y ~ N(o, I)``), whose outer product has expectation ``H``. No autodiff is used;
:mod:`handbackprop.curvature_check` checks every quantity against it.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from handbackprop.activations import ACTIVATIONS
from handbackprop.backprop import add_l2_gradient, backward, batch_outer, delta_recursion, gradient_sums
from handbackprop.checks import check_int, check_key, check_like
from handbackprop.losses import _onehot
from handbackprop.mlp import MLP, Cache, check_y, forward_cache

METHODS = ("exact", "mc")
KINDS = ("kflr", "kfac")


class KronFactors(NamedTuple):
    """One layer's Kronecker factors: its GGN block is approximated by ``kron(a, g)``.

    Attributes:
      a: the second moment of the layer's inputs, with a column of ones appended when the
        network has a bias: ``(1/B) sum_b [x_b, 1][x_b, 1]^T``, (d_in + 1, d_in + 1)
        ((d_in, d_in) without bias).
      g: the second moment of the backpropagated factor columns, ``r_B sum_b sum_k D_bk D_bk^T``,
        (d_out, d_out), with ``r_B`` = 1/B for the mean reduction and 1 for the sum.
    """

    a: jax.Array
    g: jax.Array


# -- the loss's side: H of each loss in S^(L), its factor, labels sampled from the model -----


def _is_canonical(net: MLP) -> bool:
    return net.activations[-1] == ACTIVATIONS[net.loss_fn.canonical]


def _output_jacobian_rows(net: MLP, s, o):
    """Rows of ``do/dS^(L)`` as columns ``(K, B, K)``: entry ``[c, b]`` is ``d o_bc / d S_b``."""
    act, eye = net.activations[-1], jnp.eye(s.shape[-1], dtype=s.dtype)
    if not act.elementwise:  # softmax: d o_c / dS = o_c (e_c - o)
        return jnp.moveaxis(o[:, :, None] * (eye[None] - o[:, None, :]), 1, 0)
    return eye[:, None, :] * act.derivative(s, o)[None]


def output_factor(net: MLP, s, o, y):
    """A symmetric factor of ``H_b``, per example: ``H_b = sum_c F[c, b] F[c, b]^T``.

    Args:
      net: the network.
      s, o: the top pre-activations and outputs, (B, K).
      y: checked labels.

    Returns:
      ``F``, (K, B, K): K columns (leading axis) in S-space, per example.
    """
    k = s.shape[-1]
    if net.loss == "softmax_cross_entropy":
        # H = r (diag(p) - p p^T) = F F^T with column c = sqrt(r p_c) (e_c - p), as sum(p) = 1.
        r = jnp.sum(_onehot(s, y), axis=-1, keepdims=True)
        eye = jnp.eye(k, dtype=s.dtype)
        return jnp.moveaxis(jnp.sqrt(r * o)[:, :, None] * (eye[None] - o[:, None, :]), 1, 0)
    if net.loss == "binary_cross_entropy":  # H = diag(sigma (1 - sigma))
        return jnp.eye(k, dtype=s.dtype)[:, None, :] * jnp.sqrt(o * (1 - o))[None]
    # Squared error: H = I in o, so F = (do/dS)^T in S (I for the identity output).
    return _output_jacobian_rows(net, s, o)


def sampled_factor(net: MLP, s, o, y, key, samples: int):
    """Monte Carlo factor columns: ``E[sum_c F[c, b] F[c, b]^T] = H_b``.

    Each column is ``de/dS^(L)`` at a label drawn from the model's predictive distribution:
    a class ``c ~ softmax(S)`` (column ``sqrt(r) (p - e_c)``, r the label row's sum: unbiased for
    any row sum, rows summing to 1 included), ``y ~ Bernoulli(sigma(S))`` (column
    ``sigma - y``), or for squared error ``y ~ N(o, I)`` (column ``(do/dS)^T (o - y)``).

    Returns:
      ``(samples, B, K)``, scaled by ``1/sqrt(samples)`` so that the columns' outer products sum
      to the average over the draws.
    """
    shape = (samples,) + s.shape
    if net.loss == "softmax_cross_entropy":
        c = jax.random.categorical(key, s, axis=-1, shape=shape[:-1])
        r = jnp.sum(_onehot(s, y), axis=-1, keepdims=True)
        cols = jnp.sqrt(r)[None] * (o[None] - jax.nn.one_hot(c, s.shape[-1], dtype=s.dtype))
    elif net.loss == "binary_cross_entropy":
        cols = o[None] - jax.random.bernoulli(key, jnp.broadcast_to(o, shape)).astype(s.dtype)
    else:
        eps = jax.random.normal(key, shape, s.dtype)  # o - y for y ~ N(o, I)
        cols = jnp.einsum("cbk,sbc->sbk", _output_jacobian_rows(net, s, o), eps)
    return cols / jnp.sqrt(jnp.asarray(samples, s.dtype))


def output_residual(net: MLP, s, o, y):
    """``d^2 e / dS^2 - H``: the Hessian's part that the Gauss-Newton matrix leaves out at the top.

    Zero for the canonical pairs (``None``); for squared error with output activation g and
    residual ``r = o - y``: ``diag(r g''(S))`` elementwise, and for softmax
    ``diag(a) - o a^T - a o^T`` with ``a = o (r - <o, r>)``, written as
    ``diag(a) - (o+a)(o+a)^T / 2 + (o-a)(o-a)^T / 2``.

    Returns:
      ``None`` or signed columns ``(cols, signs)``: residual ``= sum_c signs[c, b] cols[c, b] cols[c, b]^T``.
    """
    if _is_canonical(net):
        return None
    if net.activations[-1].elementwise:
        return _diagonal_columns(_output_residual_diagonal(net, s, o, y))
    a = _softmax_residual_vector(o, y)
    cols, signs = _diagonal_columns(a)
    half = jnp.sqrt(jnp.asarray(0.5, s.dtype))
    ones = jnp.ones((1,) + s.shape[:1], s.dtype)
    return (jnp.concatenate([cols, half * (o + a)[None], half * (o - a)[None]]),
            jnp.concatenate([signs, -ones, ones]))


def _softmax_residual_vector(o, y):
    """Squared error through a softmax output: ``a = o (r - <o, r>)``, ``r = o - y``, (B, K)."""
    r = o - y
    return o * (r - jnp.sum(o * r, axis=-1, keepdims=True))


def _output_residual_diagonal(net: MLP, s, o, y):
    """Squared error's residual for an elementwise output activation: ``rho = (o - y) g''(S)``."""
    return (o - y) * net.activations[-1].second_derivative(s, o)


def _diagonal_columns(rho):
    """``diag(rho_b)`` as signed columns: ``sqrt|rho_bi| e_i`` with ``sign(rho_bi)``; (d, B, d), (d, B)."""
    eye = jnp.eye(rho.shape[-1], dtype=rho.dtype)
    return eye[:, None, :] * jnp.sqrt(jnp.abs(rho))[None], jnp.sign(rho).T


def _output_jvp(net: MLP, s, o, u):
    """``(do/dS^(L)) u`` per example, (B, K); the Jacobian is symmetric (``diag(o) - o o^T`` for softmax)."""
    act = net.activations[-1]
    if act.elementwise:
        return act.derivative(s, o) * u
    return o * (u - jnp.sum(o * u, axis=-1, keepdims=True))


def loss_hessian_product(net: MLP, s, o, y, u):
    """``H_b u_b`` per example, (B, K): H of :func:`output_factor`, applied without its K columns.

    For the cross-entropies H is the output activation's Jacobian (``diag(p) - p p^T`` times the
    row sum r, ``sigma (1 - sigma)``); for squared error it is ``J^T J`` with ``J = do/dS``.
    """
    ju = _output_jvp(net, s, o, u)
    if net.loss == "squared_error":
        return _output_jvp(net, s, o, ju)
    if net.loss == "softmax_cross_entropy":
        return jnp.sum(_onehot(s, y), axis=-1, keepdims=True) * ju
    return ju


def residual_product(net: MLP, s, o, y, u):
    """``(d^2 e / dS^2 - H) u`` per example, (B, K): :func:`output_residual` applied; 0 if canonical."""
    if _is_canonical(net):
        return jnp.zeros_like(u)
    if net.activations[-1].elementwise:
        return _output_residual_diagonal(net, s, o, y) * u
    a = _softmax_residual_vector(o, y)  # softmax output: (diag(a) - o a^T - a o^T) u
    return a * u - o * jnp.sum(a * u, axis=-1, keepdims=True) - a * jnp.sum(o * u, axis=-1, keepdims=True)


UNROLL_COLUMNS = 64  # up to this many factor columns, their squares are summed slice by slice


def _signed_squares(d, signs=None):
    """``sum_c signs[c, b] d[c, b, :]^2``, (B, d): the diagonal of a factored matrix.

    XLA's CPU reduction over the leading (column) axis is several times slower than adding
    the C slices (measured: 5 ms against 1 ms for (10, 128, 256) float32), so a few columns
    are added one by one.
    """
    sq = d * d if signs is None else signs[:, :, None] * d * d
    if d.shape[0] <= UNROLL_COLUMNS:
        return sum((sq[c] for c in range(1, d.shape[0])), sq[0])
    return jnp.sum(sq, axis=0)


# -- argument checks, before any work --------------------------------------------------------


def _prepare(net: MLP, params, x, y):
    cache = forward_cache(net, params, x)
    return cache, check_y(net, cache.xs[0], y)


def _batch_scale(net: MLP, cache) -> float:
    return 1.0 / cache.xs[0].shape[0] if net.reduction == "mean" else 1.0


def _check_like(params, v):
    """``v`` checked to be like ``params``, in the parameters' dtypes."""
    check_like("v", v, params)
    return jax.tree.map(lambda t, p: jnp.asarray(t, p.dtype), v, params)


def _check_sampling(name: str, value, choices, sampled: str, key, samples):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    check_int("samples", samples, 1)
    if value == sampled:
        if key is None:
            raise ValueError(f"key: {name}={sampled!r} samples labels and needs a jax.random key, got None")
        check_key(key)


def _check_second(net: MLP, where: str):
    """The Hessian needs g'' of every hidden layer, and of the output for squared error's residual."""
    acts = net.hidden_activations
    if not _is_canonical(net) and net.activations[-1].elementwise:
        acts = net.activations
    for l, act in enumerate(acts, 1):
        if act.second is None:
            raise ValueError(f"{where}: layer {l}: activation {act.name!r} has no second derivative "
                             "g''; pass Activation(name, g, g', second=g'') (the Gauss-Newton "
                             "quantities work without it)")


# -- the recursion's side ----------------------------------------------------------------------


def _tangent_forward(net: MLP, params, cache, v):
    """The forward pass's tangent along v: ``(R{x^(0..L-1)}, R{S^(1..L)})``, R{x^(0)} = 0."""
    xs, ss = cache
    rxs, rss = [jnp.zeros_like(xs[0])], []
    for l, (layer, t, g) in enumerate(zip(params, v, net.activations)):
        # R{S^(l)} = R{x^(l-1)} W^(l) + x^(l-1) V^(l) + R{b^(l)}; the input has no tangent.
        rs = xs[l] @ t["w"] if l == 0 else rxs[l] @ layer["w"] + xs[l] @ t["w"]
        rss.append(rs + t["b"][None, :] if net.bias else rs)
        if l < net.num_layers - 1:  # R{x^(l)} = g_l'(S^(l)) R{S^(l)}
            rxs.append(g.derivative(ss[l], xs[l + 1]) * rss[-1])
    return rxs, rss


def _layer_diagonals(net: MLP, xs, squares, scale, per_example=False):
    """From each layer's ``sum_c D_c^2`` (B, d_l): ``diag`` for W (x^2 against it) and for b."""
    out = []
    for x, sq in zip(xs, squares):
        if per_example:
            layer = {"w": (x * x)[:, :, None] * sq[:, None, :], "b": sq}
        else:
            # scale on x^2, which is formed anyway: no pass over the (d_{l-1}, d_l) diagonal
            layer = {"w": batch_outer(scale * x * x, sq), "b": scale * jnp.sum(sq, axis=0)}
        out.append(layer if net.bias else {"w": layer["w"]})
    return tuple(out)


def _add_l2_diagonal(net: MLP, diag):
    if not net.l2:
        return diag
    return tuple({**d, "w": d["w"] + net.l2} for d in diag)


def _truncated(net: MLP, m: int) -> MLP:
    """The network's first m layers (their activations g_1..g_m), for the inductive step from S^(m)."""
    hidden = tuple(net.hidden_activations[:m - 1]) or "identity"
    return MLP(net.sizes[:m + 1], activation=hidden, output_activation=net.activations[m - 1],
               loss="squared_error", bias=net.bias)


def _backward_columns(net: MLP, params, cache, cols):
    """(3.5) for every factor column: ``(C, B, d_L) -> (D^(1), ..., D^(L))``, each (C, B, d_l).

    Mapped over the columns so that g'(S) is formed once and no array is broadcast by rank.
    """
    return jax.vmap(lambda d: backward(net, params, cache, d))(cols)


def _factor_deltas(net: MLP, params, cache, y, method, key, samples):
    """Each layer's factor columns D^(l), (C, B, d_l), from the exact or sampled factor of H."""
    s, o = cache.ss[-1], cache.xs[-1]
    if method in ("exact", "kflr"):
        cols = output_factor(net, s, o, y)
    else:
        cols = sampled_factor(net, s, o, y, key, samples)
    return _backward_columns(net, params, cache, cols)


# -- the public functions ------------------------------------------------------------------


def ggn_vector_product(net: MLP, params, x, y, v):
    """The generalised Gauss-Newton matrix times v: ``G v``, G of :func:`handbackprop.loss`.

    ``G = r_B sum_b J_b^T H_b J_b + l2 I_weights`` with ``J_b = dS_b^(L)/dparams`` and H_b the
    loss's Hessian in ``S_b^(L)`` (for squared error with a non-identity output activation,
    ``J_b = do_b/dparams`` and ``H_b = I``); see the module docstring. One tangent forward pass,
    one backward pass.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs, (B, d0).
      y: labels (see :func:`handbackprop.loss`).
      v: a pytree like ``params``.

    Returns:
      ``G v``, a pytree like ``params``, in the parameters' dtype.

    Raises:
      ValueError: if ``v`` does not have the structure and shapes of ``params``.
    """
    cache, y = _prepare(net, params, x, y)
    v = _check_like(params, v)
    _, rss = _tangent_forward(net, params, cache, v)
    top = loss_hessian_product(net, cache.ss[-1], cache.xs[-1], y, rss[-1])
    ds = backward(net, params, cache, _batch_scale(net, cache) * top)
    return add_l2_gradient(net, v, gradient_sums(net, cache.xs[:-1], ds))


def hessian_vector_product(net: MLP, params, x, y, v):
    """The Hessian of :func:`handbackprop.loss` times v, exactly: Pearlmutter's R-operator.

    The tangent of the forward pass, then the tangent of the backward pass, which includes
    the ``g''`` terms and the backward pass's dependence on W (see the module docstring).

    Args:
      net: the network (static under ``jax.jit``); every activation the Hessian meets needs g''.
      params, x, y: as for :func:`handbackprop.loss`.
      v: a pytree like ``params``.

    Returns:
      ``H v``, a pytree like ``params``, in the parameters' dtype.

    Raises:
      ValueError: for a ``v`` unlike ``params``, or an activation without g'' (a user pair).
    """
    _check_second(net, "hessian_vector_product")
    cache, y = _prepare(net, params, x, y)
    v = _check_like(params, v)
    xs, ss = cache
    scale = _batch_scale(net, cache)
    rxs, rss = _tangent_forward(net, params, cache, v)
    ds = delta_recursion(net, params, cache, y, scale)
    s, o = ss[-1], xs[-1]
    # R of the base case (3.4): R{delta^(L)} = d^2 e / dS^2 R{S^(L)} = (H + residual) R{S^(L)}.
    rds = [scale * (loss_hessian_product(net, s, o, y, rss[-1]) + residual_product(net, s, o, y, rss[-1]))]
    for l in range(net.num_layers - 1, 0, -1):  # params[l] is W^(l+1), 0-based
        w, g = params[l]["w"], net.activations[l - 1]
        back = ds[l] @ w.T
        # R of (3.5): R{delta^(l)} = (R{delta^(l+1)} W^T + delta^(l+1) V^T) g'(S^(l))
        #                          + (delta^(l+1) W^T) g''(S^(l)) R{S^(l)}
        rds.append((rds[-1] @ w.T + ds[l] @ v[l]["w"].T) * g.derivative(ss[l - 1], xs[l])
                   + back * g.second_derivative(ss[l - 1], xs[l]) * rss[l - 1])
    grads = gradient_sums(net, xs[:-1], rds[::-1])  # x^T R{delta}, sum_b R{delta}
    # R of (3.6): R{dE/dW} = R{x}^T delta + x^T R{delta} (R{x^(0)} = 0).
    grads = tuple({**gr, "w": gr["w"] + batch_outer(rx, d)} if l else gr
                  for l, (gr, rx, d) in enumerate(zip(grads, rxs, ds)))
    return add_l2_gradient(net, v, grads)


def diag_ggn(net: MLP, params, x, y, *, method="exact", key=None, samples=1):
    """The diagonal of the generalised Gauss-Newton matrix G (see :func:`ggn_vector_product`).

    Args:
      net: the network (static under ``jax.jit``).
      params, x, y: as for :func:`handbackprop.loss`.
      method: ``"exact"`` backpropagates the K columns of a factor of H_b; ``"mc"`` one column
        per sample, from labels drawn from the model's predictive distribution: unbiased for
        the exact diagonal (softmax label rows of any sum).
      key: a ``jax.random`` key, required for ``"mc"``.
      samples: draws averaged for ``"mc"``, >= 1.

    Returns:
      ``diag(G)`` like ``params``, ``l2`` added (exactly, never sampled) on the weight entries.

    Raises:
      ValueError, TypeError: for a bad ``method``, ``samples`` or ``key``.
    """
    _check_sampling("method", method, METHODS, "mc", key, samples)
    cache, y = _prepare(net, params, x, y)
    ds = _factor_deltas(net, params, cache, y, method, key, samples)
    squares = [_signed_squares(d) for d in ds]
    return _add_l2_diagonal(net, _layer_diagonals(net, cache.xs[:-1], squares, _batch_scale(net, cache)))


def per_example_diag_ggn(net: MLP, params, x, y, *, method="exact", key=None, samples=1):
    """Each example's own ``diag(J_b^T H_b J_b)``, of its unreduced, unregularised loss e_b.

    The convention of :func:`handbackprop.per_example_grads`: the mean (or sum) over the batch
    plus ``l2`` on the weights is :func:`diag_ggn`. Arguments as for :func:`diag_ggn`.

    Returns:
      A pytree like ``params`` whose leaves have a leading batch axis: ``w`` of layer l is
      (B, d_{l-1}, d_l), ``b`` is (B, d_l).
    """
    _check_sampling("method", method, METHODS, "mc", key, samples)
    cache, y = _prepare(net, params, x, y)
    ds = _factor_deltas(net, params, cache, y, method, key, samples)
    return _layer_diagonals(net, cache.xs[:-1], [_signed_squares(d) for d in ds], 1.0, per_example=True)


def kfac_factors(net: MLP, params, x, y, *, kind="kflr", key=None, samples=1):
    """Kronecker factors of each layer's GGN block: ``kron(a, g)`` for ``[W; b]`` flattened row-major.

    For one example and ``"kflr"`` the product is the layer's exact GGN block; for a batch,
    ``kron(a, g)`` approximates ``r (1/B) sum_b J_b^T H_b J_b`` (r = 1 for the mean, B for the
    sum, carried by g), as BackPACK's KFLR. No L2: a Kronecker product cannot hold it on the
    weights alone. Entry ``(i, j)`` of ``[W; b]`` (``W[i, j]``, or ``b[j]`` for ``i = d_in``)
    is index ``i * d_out + j`` (see the example).

    Args:
      net: the network (static under ``jax.jit``).
      params, x, y: as for :func:`handbackprop.loss`.
      kind: ``"kflr"`` (the exact factor of H_b) or ``"kfac"`` (sampled labels).
      key: a ``jax.random`` key, required for ``"kfac"``.
      samples: draws averaged for ``"kfac"``, >= 1.

    Returns:
      A tuple of one :class:`KronFactors` per layer.

    Example:
      >>> import jax, jax.numpy as jnp, handbackprop as hbp
      >>> net = hbp.MLP((3, 2), loss="softmax_cross_entropy")
      >>> params = hbp.init_params(jax.random.key(0), net)
      >>> x, y = jnp.ones((1, 3)), jnp.array([1])
      >>> (a, g), = hbp.kfac_factors(net, params, x, y)
      >>> a.shape, g.shape, jnp.kron(a, g).shape  # (d_in + 1) d_out = 8 entries of [W; b]
      ((4, 4), (2, 2), (8, 8))
      >>> d = hbp.diag_ggn(net, params, x, y)[0]
      >>> bool(jnp.allclose(jnp.diag(jnp.kron(a, g)), jnp.concatenate([d["w"], d["b"][None]]).ravel()))
      True
    """
    _check_sampling("kind", kind, KINDS, "kfac", key, samples)
    cache, y = _prepare(net, params, x, y)
    ds = _factor_deltas(net, params, cache, y, kind, key, samples)
    scale, batch = _batch_scale(net, cache), cache.xs[0].shape[0]
    out = []
    for x_prev, d in zip(cache.xs[:-1], ds):
        if net.bias:
            x_prev = jnp.concatenate([x_prev, jnp.ones_like(x_prev[:, :1])], axis=1)
        d = d.reshape(-1, d.shape[-1])  # (C B, d_out): the columns as rows of one matrix
        out.append(KronFactors(x_prev.T @ x_prev / batch, scale * (d.T @ d)))
    return tuple(out)


def _send_diagonal(net: MLP, params, cache, m: int, rho, squares):
    """Add a diagonal term ``diag(rho)`` of the Hessian in S^(m) (1-based) to every layer below.

    At layer m itself its diagonal is rho. One step down, the column ``sqrt|rho_i| e_i`` becomes
    ``sqrt|rho_i| W^(m)[:, i] g'(S^(m-1))``, so the signed squares sum in closed form to
    ``g'(S^(m-1))^2 (rho (W^(m) * W^(m))^T)``: O(B d^2), no columns. Further down the d_m
    columns are needed, and are sent on by (3.5).
    """
    xs, ss = cache
    squares[m - 1] = squares[m - 1] + rho
    if m == 1:
        return
    w, dg = params[m - 1]["w"], net.activations[m - 2].derivative(ss[m - 2], xs[m - 1])
    squares[m - 2] = squares[m - 2] + dg * dg * (rho @ (w * w).T)
    if m == 2:
        return
    cols, signs = _diagonal_columns(rho)
    cols = (cols @ w.T) * dg[None]  # one step of (3.5) for the d_m columns
    lower = _backward_columns(_truncated(net, m - 1), params[:m - 1], Cache(xs[:m], ss[:m - 1]), cols)
    for l, d in enumerate(lower[:-1]):  # the top, layer m - 1, is done above
        squares[l] = squares[l] + _signed_squares(d, signs)


def diag_hessian(net: MLP, params, x, y):
    """The exact diagonal of the Hessian of :func:`handbackprop.loss`, by Hessian backpropagation.

    The Hessian in ``S^(l-1)`` follows from the one in ``S^(l)``:

        d2e/dS^(l-1)2 = g'(S^(l-1)) W d2e/dS^(l)2 W^T g'(S^(l-1)) + diag(g''(S^(l-1)) (delta^(l) W^T))

    Each term is kept as signed factor columns: the top one's (the GGN's factor, plus squared
    error's residual for a non-identity output), sent down by (3.5), and at each hidden layer
    the residual ``diag(rho)`` as d_l columns ``sqrt|rho_i| e_i`` of sign ``sign(rho_i)``, sent
    down from there (the first step down in closed form). ``diag`` for ``W_ij^(l)`` is
    ``x_i^2 [d2e/dS^(l)2]_jj``; the Hessian is never formed. Below two hidden layers the
    columns grow with the widths above: costlier than :func:`diag_ggn`.

    Returns:
      The diagonal, like ``params``, ``l2`` added on the weight entries.

    Raises:
      ValueError: for an activation without g'' (a user pair).
    """
    _check_second(net, "diag_hessian")
    cache, y = _prepare(net, params, x, y)
    xs, ss = cache
    s, o = ss[-1], xs[-1]
    squares = [_signed_squares(d) for d in _backward_columns(net, params, cache, output_factor(net, s, o, y))]
    if not _is_canonical(net):  # squared error's residual at the top
        if net.activations[-1].elementwise:
            _send_diagonal(net, params, cache, net.num_layers, _output_residual_diagonal(net, s, o, y), squares)
        else:
            cols, signs = output_residual(net, s, o, y)
            for l, d in enumerate(_backward_columns(net, params, cache, cols)):
                squares[l] = squares[l] + _signed_squares(d, signs)
    ds = delta_recursion(net, params, cache, y)  # each example's own delta, unscaled
    for m in range(net.num_layers - 1, 0, -1):  # hidden layer m (1-based): S^(m) = ss[m - 1]
        # The residual at S^(m): rho = g_m''(S^(m)) (delta^(m+1) W^(m+1)T).
        rho = net.activations[m - 1].second_derivative(ss[m - 1], xs[m]) * (ds[m] @ params[m]["w"].T)
        _send_diagonal(net, params, cache, m, rho, squares)
    return _add_l2_diagonal(net, _layer_diagonals(net, xs[:-1], squares, _batch_scale(net, cache)))
