"""Per-example gradients, their norms and statistics, straight from the delta recursion.

The batched backward pass already holds, for every example b, the layer inputs ``x_b^(l-1)``
and deltas ``delta_b^(l) = d e_b / d S_b^(l)``. Example b's own gradient (3.6) is their outer
product, so every per-example quantity is one cheap expression of the two:

    per-example gradient   g_b(W^(l)) = x_b^(l-1) delta_b^(l)T,     g_b(b^(l)) = delta_b^(l)
    squared norm           ||g_b||^2  = sum_l ||delta_b^(l)||^2 (||x_b^(l-1)||^2 + 1)   (+1: bias)
    clipped sum            sum_b c_b g_b(W^(l)) = X^(l-1)T (c * D^(l))
    sum of squares         sum_b g_b(W^(l))^2   = (X^(l-1) * X^(l-1))T (D^(l) * D^(l))

Only :func:`per_example_grads` forms the B gradients; the others need the activations and
deltas of a plain backward pass plus O(B) numbers per layer. Per-example gradients are those
of each example's own loss e_b: unreduced (no 1/B, whatever ``net.reduction``) and without
the L2 term, which is data-independent. ``mean(g_b) + l2 W`` is the batch gradient of a
``reduction="mean"`` network.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from handbackprop.backprop import backprop, delta_recursion
from handbackprop.checks import check_scalar
from handbackprop.mlp import MLP, check_x, check_y, forward_cache

METHODS = ("outer", "vmap")


def _inputs_and_deltas(net: MLP, params, x, y):
    """One forward and one backward pass: ``(x^(0..L-1), delta^(1..L))``, each (B, d).

    The deltas are per example: scale 1, so ``delta_b`` is d e_b / d S_b, not of the mean.
    """
    cache = forward_cache(net, params, x)
    ds = delta_recursion(net, params, cache, check_y(net, cache.xs[0], y))
    return cache.xs[:-1], ds


def _batch_sums(net: MLP, xs, ds):
    """Per layer ``X^T D`` and ``sum_b D_b``: the gradient (3.6) summed over the batch."""
    out = []
    for a, d in zip(xs, ds):
        out.append({"w": a.T @ d, "b": jnp.sum(d, axis=0)} if net.bias else {"w": a.T @ d})
    return tuple(out)


def _safe_sqrt(sq):
    # sqrt'(0) is infinite; the inner where keeps jax.grad finite through a zero norm.
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1)), 0)


def _norms(net: MLP, xs, ds):
    """||g_b|| = sqrt(sum_l ||delta_b^(l)||^2 (||x_b^(l-1)||^2 + [bias])), shape (B,)."""
    sq = sum(
        jnp.sum(d * d, axis=1) * (jnp.sum(a * a, axis=1) + (1.0 if net.bias else 0.0))
        for a, d in zip(xs, ds)
    )
    return _safe_sqrt(sq)


def per_example_grads(net: MLP, params, x, y, method: str = "outer"):
    """Each example's gradient of its own loss e_b: unreduced, without L2.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs, (B, d0).
      y: labels for ``net.loss`` (see :func:`handbackprop.loss`).
      method: ``"outer"``, the closed form ``g_b(W^(l)) = x_b^(l-1) delta_b^(l)T`` from one
        batched backward pass; or ``"vmap"``, ``jax.vmap`` of the hand-written backprop of
        one example (a cross-check; XLA compiles both to much the same program).

    Returns:
      A tuple like ``params`` whose leaves have a leading batch axis: ``w`` of layer l is
      (B, d_{l-1}, d_l), ``b`` is (B, d_l). This holds B gradients: for the norms, a clipped
      sum or statistics use the functions below, which never form it.

    Raises:
      ValueError: for an unknown ``method``; ValueError or TypeError for bad ``params``,
        ``x`` or ``y``.

    Example:
      >>> import jax, jax.numpy as jnp, handbackprop as hbp
      >>> net = hbp.MLP((3, 4, 2))
      >>> params = hbp.init_params(jax.random.key(0), net)
      >>> g = hbp.per_example_grads(net, params, jnp.ones((5, 3)), jnp.zeros((5, 2)))
      >>> jax.tree.map(jnp.shape, g)
      ({'b': (5, 4), 'w': (5, 3, 4)}, {'b': (5, 2), 'w': (5, 4, 2)})
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "vmap":
        x = check_x(net, params, x)
        y = check_y(net, x, y)
        # One example's loss, alone: a sum over a batch of one, without the L2 term.
        single = dataclasses.replace(net, l2=0.0, reduction="sum")
        return jax.vmap(lambda xb, yb: backprop(single, params, xb[None], yb[None]))(x, y)
    xs, ds = _inputs_and_deltas(net, params, x, y)
    out = []
    for a, d in zip(xs, ds):
        w = jnp.einsum("bi,bj->bij", a, d)  # (3.6) per example: x_i^(l-1) delta_j^(l)
        out.append({"w": w, "b": d} if net.bias else {"w": w})
    return tuple(out)


def per_example_grad_norms(net: MLP, params, x, y):
    """The L2 norm of each example's whole gradient (all layers), without forming it.

    ``||g_b||^2 = sum_l ||delta_b^(l)||^2 (||x_b^(l-1)||^2 + 1)`` (the ``+ 1`` is the bias,
    if any), since the Frobenius norm of an outer product is the product of the norms.
    Beyond a backward pass, this needs O(B) numbers per layer and skips the weight-gradient
    matrix products. Differentiable, with a zero (not NaN) gradient where a norm is 0.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs, (B, d0).
      y: labels for ``net.loss``.

    Returns:
      Shape (B,), the parameters' dtype: ``||g_b||`` for the unreduced, unregularised e_b.

    Example:
      >>> import jax, jax.numpy as jnp, handbackprop as hbp
      >>> net = hbp.MLP((3, 4, 2))
      >>> params = hbp.init_params(jax.random.key(0), net)
      >>> x = jnp.arange(6.0).reshape(2, 3)
      >>> hbp.per_example_grad_norms(net, params, x, jnp.zeros((2, 2))).shape
      (2,)
    """
    return _norms(net, *_inputs_and_deltas(net, params, x, y))


class ClippedGrad(NamedTuple):
    """The result of :func:`clipped_grad`.

    Attributes:
      sum: ``sum_b c_b g_b``, a tuple like ``params``.
      mean: ``sum / B``, a tuple like ``params``. Neither includes the L2 term.
      norms: ``||g_b||`` before clipping, shape (B,), e.g. to monitor how often it clips.
    """

    sum: Any
    mean: Any
    norms: Any


def clipped_grad(net: MLP, params, x, y, clip_norm, weights=None) -> ClippedGrad:
    """The sum and mean of per-example gradients, each first scaled to norm <= ``clip_norm``.

    Each example's gradient is scaled by ``c_b = clip_norm / max(||g_b||, clip_norm)``
    (``= min(1, clip_norm / ||g_b||)``, with no division by zero at ``g_b = 0``); the scaled
    sum is formed in the same pass as ``X^(l-1)T (c * D^(l))`` per layer: no second backward
    pass and no per-example gradients in memory. ``net.reduction`` does not apply (both sum
    and mean are returned), nor does ``net.l2``: the L2 gradient ``l2 W`` is data-independent,
    so it is added after clipping (and after noise, in DP-SGD), not clipped.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs, (B, d0).
      y: labels for ``net.loss``.
      clip_norm: the bound C > 0, a scalar. Checked at trace time when concrete; when traced
        (a non-static argument of a jitted caller) only its shape and dtype are checked: pass
        it as static to have its value checked.
      weights: optional, shape (B,): example b's clipped gradient counts ``weights[b]`` times
        in the sum, e.g. a boolean mask of the real examples in a padded batch. The mean still
        divides by B.

    Returns:
      A :class:`ClippedGrad` ``(sum, mean, norms)``, in the parameters' dtype.

    Raises:
      ValueError: ``clip_norm: expected a positive finite number, got -1.0``, and the checks
        of ``params``, ``x`` and ``y``, all before any computation.

    Example:
      >>> import jax, jax.numpy as jnp, handbackprop as hbp
      >>> net = hbp.MLP((3, 4, 2))
      >>> params = hbp.init_params(jax.random.key(0), net)
      >>> x, y = jnp.arange(15.0).reshape(5, 3), jnp.zeros((5, 2))
      >>> g = hbp.clipped_grad(net, params, x, y, clip_norm=1.0)
      >>> bool(jnp.all(g.norms > 1.0))  # every example was clipped
      True
      >>> float(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g.sum))) ** 0.5 <= 5.0
      True
    """
    check_scalar("clip_norm", clip_norm)
    batch = np.shape(x)[:1]
    if weights is not None and np.shape(weights) != batch:
        raise ValueError(f"weights: expected shape {batch}, one per example of x, "
                         f"got shape {np.shape(weights)}")
    xs, ds = _inputs_and_deltas(net, params, x, y)
    norms = _norms(net, xs, ds)
    clip = jnp.asarray(clip_norm, norms.dtype)
    c = clip / jnp.maximum(norms, clip)  # min(1, C / ||g_b||), safe where ||g_b|| = 0
    if weights is not None:
        c = c * jnp.asarray(weights, c.dtype)
    total = _batch_sums(net, xs, tuple(c[:, None] * d for d in ds))  # X^T (c * D)
    mean = jax.tree.map(lambda g: g / xs[0].shape[0], total)
    return ClippedGrad(total, mean, norms)


class GradientStats(NamedTuple):
    """Per-parameter statistics of the per-example gradients g_b over a batch of B.

    Attributes:
      mean: ``(1/B) sum_b g_b``, a tuple like ``params`` (no L2 term).
      sum_squares: ``sum_b g_b^2``, elementwise, a tuple like ``params``.
      variance: ``sum_squares / B - mean^2``, the population variance (divisor B), clamped
        at 0 against rounding. A one-pass formula: when ``|mean|`` greatly exceeds the
        standard deviation it loses relative accuracy, as in float32 with nearly equal g_b.
    """

    mean: Any
    sum_squares: Any
    variance: Any


def gradient_stats(net: MLP, params, x, y) -> GradientStats:
    """Mean, sum of squares and variance of per-example gradients, without forming them.

    Elementwise ``sum_b g_b(W)^2 = (X * X)^T (D * D)``, since ``g_b(W)_ij = x_bi delta_bj``;
    ``sum_b g_b(b)^2 = sum_b D_b * D_b``. One forward and one backward pass. (This is
    BackPACK's ``SumGradSquared`` and ``Variance``.)

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs, (B, d0).
      y: labels for ``net.loss``.

    Returns:
      A :class:`GradientStats` ``(mean, sum_squares, variance)``, each a tuple like ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, handbackprop as hbp
      >>> net = hbp.MLP((3, 4, 2))
      >>> params = hbp.init_params(jax.random.key(0), net)
      >>> x, y = jnp.ones((5, 3)), jnp.zeros((5, 2))
      >>> stats = hbp.gradient_stats(net, params, x, y)  # five equal examples: no variance
      >>> bool(jnp.allclose(stats.variance[1]["w"], 0.0, atol=1e-5))  # up to float32 rounding
      True
    """
    xs, ds = _inputs_and_deltas(net, params, x, y)
    n = xs[0].shape[0]
    mean = _batch_sums(net, xs, tuple(d / n for d in ds))
    sum_squares = _batch_sums(net, tuple(a * a for a in xs), tuple(d * d for d in ds))
    variance = jax.tree.map(lambda s, m: jnp.maximum(s / n - m * m, 0), sum_squares, mean)
    return GradientStats(mean, sum_squares, variance)
