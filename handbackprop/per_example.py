"""Per-example gradients, their norms and statistics, straight from the delta recursion.

The batched backward pass already holds, for every example b, the layer inputs ``x_b^(l-1)``
and deltas ``delta_b^(l) = d e_b / d S_b^(l)``. Example b's own gradient (3.6) is their outer
product, so every per-example quantity is one cheap expression of the two:

    per-example gradient   g_b(W^(l)) = x_b^(l-1) delta_b^(l)T,     g_b(b^(l)) = delta_b^(l)
    squared norm           ||g_b||^2  = sum_l ||delta_b^(l)||^2 (||x_b^(l-1)||^2 + 1)   (+1: bias)
    clipped sum            sum_b c_b g_b(W^(l)) = X^(l-1)T (c * D^(l))
    sum of squares         sum_b g_b(W^(l))^2   = (X^(l-1) * X^(l-1))T (D^(l) * D^(l))

Only :func:`per_example_grads` forms the B gradients; the others need the activations and
deltas of a plain backward pass plus O(B) numbers per layer. Norms are computed with scaling
(a finite gradient beyond the square root of the float range is still measured and clipped);
an example whose gradient is not finite is left out of a clipped sum and counted.
:func:`clipped_sums` is the clipped form of :func:`handbackprop.backprop.batch_sums`, the
sums that :func:`handbackprop.backprop.finish` (and DP-SGD's noise) turn into a gradient.
Per-example gradients are those of each example's own loss e_b: unreduced (no 1/B, whatever
``net.reduction``) and without the L2 term, which is data-independent. ``mean(g_b) + l2 W``
is the batch gradient of a ``reduction="mean"`` network.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from handbackprop.backprop import (Sums, backprop, check_weights, example_losses,
                                   forward_backward, gradient_sums, like_params, weighted_sum)
from handbackprop.checks import check_scalar
from handbackprop.losses import labels_ok
from handbackprop.mlp import MLP, check_x, check_y

METHODS = ("outer", "vmap")


def _safe_sqrt(sq):
    # sqrt'(0) is infinite; the inner where keeps jax.grad finite through a zero norm.
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1)), 0)


def _scaled(v, one):
    """Per row, ``(m, u)`` with ``sqrt(||v_b||^2 + one) = m_b u_b`` and ``u_b`` in
    ``[1, sqrt(d + 1)]`` (or 0), so that neither overflows: ``m_b = max|v_b|`` (at least 1
    where ``one`` is 1). A NaN or Inf entry makes ``m_b`` non-finite."""
    m = jnp.max(jnp.abs(v), axis=1)
    if one:
        m = jnp.maximum(m, 1.0)
    safe = jnp.where(m > 0, m, 1)[:, None]
    return m, _safe_sqrt(jnp.sum((v / safe) ** 2, axis=1) + one / safe[:, 0] ** 2)


def _norm_parts(net: MLP, xs, ds):
    """``||g_b|| = S_b R_b`` from the closed form, without overflow, and whether g_b is finite.

    Per layer, ``||g_b(layer l)|| = ||delta_b^(l)|| sqrt(||x_b^(l-1)||^2 + [bias])``, each
    factor computed as (max entry) x (a bounded norm), as LAPACK's ``nrm2`` does: a finite
    gradient whose squared norm exceeds the float range (a norm above about 1.8e19 in
    float32) is still measured. ``S_b`` is the largest layer scale, ``R_b`` bounded.

    Returns:
      ``(S, R, finite)``, each (B,): ``finite`` is False where some entry of g_b (some
      ``x_bi delta_bj``, or ``delta_bj``) is NaN or Inf; S and R are meaningless there.
    """
    scales, rests = [], []
    for a, d in zip(xs, ds):
        md, ud = _scaled(d, 0.0)
        mx, ux = _scaled(a, 1.0 if net.bias else 0.0)
        scales.append(md * mx)  # the largest |x_bi delta_bj| (or |delta_bj|): Inf on overflow
        rests.append(ud * ux)
    scales = jnp.stack(scales)  # (L, B)
    s = jnp.max(scales, axis=0)  # NaN propagates
    safe = jnp.where(s > 0, s, 1)
    r = _safe_sqrt(sum((sl / safe * rl) ** 2 for sl, rl in zip(scales, rests)))
    return s, r, jnp.isfinite(s) & jnp.isfinite(r)


def _measure(net: MLP, xs, ds, clip=1.0, again=None):
    """``(norms, finite, c)``, each (B,): ``||g_b||`` (NaN where g_b is not finite), whether it
    is finite, and the clipping factor ``c_b = min(1, clip / ||g_b||)`` (0 where not finite).

    The plain squared norms ``sum_l ||delta_b^(l)||^2 (||x_b^(l-1)||^2 + [bias])``, unless one
    of them is not finite (an overflow, a NaN or an Inf): then, behind ``lax.cond`` so that
    the usual case pays nothing more, the scaled form of :func:`_norm_parts`. ``again``: a
    function giving ``(xs, ds)`` anew for that branch, so that a caller who needs nothing but
    the norms lets each delta go once it is summed (else the branch keeps them all alive).
    """
    sq = sum(jnp.sum(d * d, axis=1) * (jnp.sum(a * a, axis=1) + (1.0 if net.bias else 0.0))
             for a, d in zip(xs, ds))
    clip = jnp.asarray(clip, sq.dtype)

    def plain():
        norms = _safe_sqrt(sq)
        return norms, jnp.isfinite(sq), clip / jnp.maximum(norms, clip)  # all True here

    def scaled():
        s, r, finite = _norm_parts(net, *(again() if again else (xs, ds)))
        # min(1, C / (S R)) as (C / S) / R, so that a norm beyond the float range still clips.
        c = jnp.where(s > 0, jnp.minimum(1, clip / jnp.where(s > 0, s, 1) / jnp.maximum(r, 1)), 1)
        return jnp.where(finite, s * r, jnp.nan), finite, jnp.where(finite, c, 0)

    return jax.lax.cond(jnp.all(jnp.isfinite(sq)), plain, scaled)


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
    cache, _, ds = forward_backward(net, params, x, y)
    out = []
    for a, d in zip(cache.xs[:-1], ds):
        w = jnp.einsum("bi,bj->bij", a, d)  # (3.6) per example: x_i^(l-1) delta_j^(l)
        out.append({"w": w, "b": d} if net.bias else {"w": w})
    return like_params(tuple(out), params)


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
    def passes():
        cache, _, ds = forward_backward(net, params, x, y)
        return cache.xs[:-1], ds

    # The overflow-safe branch (rarely taken) redoes the passes rather than keep every delta
    # for it: 1.34x a backprop's temporaries instead of 1.66x (256-256-256-10, B 256, CPU). The
    # rest is the branch's own: its two passes over each array (the largest entry, then the
    # squares scaled by it) hold one more (B, d) array than the plain sum of squares.
    return _measure(net, *passes(), again=passes)[0]


class ClippedGrad(NamedTuple):
    """The result of :func:`clipped_grad`.

    Attributes:
      sum: ``sum_b c_b g_b``, a tuple like ``params``.
      mean: ``sum / B``, a tuple like ``params``. Neither includes the L2 term.
      norms: ``||g_b||`` before clipping, shape (B,), e.g. to monitor how often it clips;
        NaN for an example whose gradient is not finite.
      dropped: how many examples (of weight > 0) had a non-finite gradient (a NaN or Inf
        entry) and so contribute nothing, an int32 scalar.
    """

    sum: Any
    mean: Any
    norms: Any
    dropped: Any = None

    @classmethod
    def from_sums(cls, sums: Sums, params, batch: int) -> "ClippedGrad":
        """From clipped :class:`handbackprop.backprop.Sums` of a batch of ``batch``."""
        total = like_params(sums.grads, params)
        mean = like_params(jax.tree.map(lambda g: g / batch, sums.grads), params)
        return cls(total, mean, sums.norms, sums.dropped)


def clipped_sums(net: MLP, params, x, y, clip_norm, weights=None) -> Sums:
    """A batch's sums with each example's gradient clipped: ``sum_b w_b c_b g_b``.

    ``c_b = min(1, C / ||g_b||)`` (1 at ``g_b = 0``), applied to the deltas, so the clipped
    sum is ``X^(l-1)T (w c D^(l))`` per layer: one backward pass, no per-example gradients
    in memory. An example whose gradient is not finite gets ``c_b = 0``: it contributes
    nothing (rather than making the whole sum NaN) and is counted in ``dropped``; except for
    a traced label out of the loss's domain, whose NaN gradient makes the sum NaN, as a bad
    value does everywhere under ``jax.jit``.

    Args:
      net: the network (static under ``jax.jit``); neither ``reduction`` nor ``l2`` apply.
      params: its parameters.
      x: inputs, (B, d0).
      y: labels for ``net.loss``.
      clip_norm: the bound C > 0, a scalar (checked like :func:`clipped_grad`'s).
      weights: optional (B,) in [0, 1] (see :func:`clipped_grad`).

    Returns:
      :class:`handbackprop.backprop.Sums` ``(loss, grads, norms, dropped)``: ``loss`` is
      ``sum_b w_b e_b`` (unclipped, non-finite if an example's is), ``norms`` (B,).
    """
    check_scalar("clip_norm", clip_norm)
    weights = check_weights(weights, x, unit=True)
    cache, y, ds = forward_backward(net, params, x, y)
    xs = cache.xs[:-1]
    norms, finite, c = _measure(net, xs, ds, clip_norm)
    # A traced label out of the loss's domain is a bad value, not a fault of the data: its NaN
    # gradient must show in the sum (as everywhere else), so it is kept and not counted.
    bad_label = ~labels_ok(net.loss, y, net.sizes[-1])
    c = jnp.where(bad_label, jnp.nan, c)
    lost = ~finite & ~bad_label
    if weights is not None:
        w = weights.astype(c.dtype)
        # A traced weight outside [0, 1] (or NaN) would break the bound C: NaN, not a number.
        c = jnp.where((w >= 0) & (w <= 1), c * w, jnp.nan)
        lost = lost & (weights != 0)
    dropped = jnp.sum(lost, dtype=jnp.int32)
    keep = (finite | bad_label)[:, None]
    # Zero the rows of non-finite examples (0 * Inf would be NaN), then X^T (c * D).
    xs = tuple(jnp.where(keep, a, 0) for a in xs)
    ds = tuple(jnp.where(keep, c[:, None] * d, 0) for d in ds)
    loss = weighted_sum(example_losses(net, cache, y), weights)
    return Sums(loss, gradient_sums(net, xs, ds), norms, dropped)


def clipped_grad(net: MLP, params, x, y, clip_norm, weights=None) -> ClippedGrad:
    """The sum and mean of per-example gradients, each first scaled to norm <= ``clip_norm``.

    Each example's gradient is scaled by ``c_b = min(1, clip_norm / ||g_b||)`` (no division
    by zero at ``g_b = 0``; norms computed with scaling, so a huge finite gradient is clipped
    too); the scaled sum is formed in the same pass as ``X^(l-1)T (c * D^(l))`` per layer: no
    second backward pass and no per-example gradients in memory. An example whose gradient
    has a NaN or Inf entry contributes nothing and is counted in ``dropped``; its norm is
    NaN (a traced label out of the loss's domain, which cannot be refused, makes the sum NaN
    instead, as it does every gradient). ``net.reduction`` does not apply (both sum and mean are returned), nor does
    ``net.l2``: the L2 gradient ``l2 W`` is data-independent, so it is added after clipping
    (and after noise, in DP-SGD), not clipped.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs, (B, d0).
      y: labels for ``net.loss``.
      clip_norm: the bound C > 0, a scalar. Checked at trace time when concrete; when traced
        (a non-static argument of a jitted caller) only its shape and dtype are checked: pass
        it as static to have its value checked.
      weights: optional, shape (B,), each in [0, 1]: example b's clipped gradient counts
        ``weights[b]`` times in the sum, e.g. a boolean mask of the real examples in a
        padded batch (so one example still moves the sum by at most C). The mean still
        divides by B. Concrete weights are checked; traced ones outside [0, 1] or NaN make
        the result NaN.

    Returns:
      A :class:`ClippedGrad` ``(sum, mean, norms, dropped)``, ``sum`` and ``mean`` in the
      parameters' dtypes.

    Raises:
      ValueError: ``clip_norm: expected a positive finite number, got -1.0``,
        ``weights: expected numbers in [0, 1], got 2.0 at index 0``, and the checks of
        ``params``, ``x`` and ``y``, all before any computation.

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
      >>> int(g.dropped)
      0
    """
    sums = clipped_sums(net, params, x, y, clip_norm, weights)
    return ClippedGrad.from_sums(sums, params, np.shape(x)[0])


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
    cache, _, ds = forward_backward(net, params, x, y)
    xs, n = cache.xs[:-1], cache.xs[0].shape[0]
    mean = gradient_sums(net, xs, tuple(d / n for d in ds))
    sum_squares = gradient_sums(net, tuple(a * a for a in xs), tuple(d * d for d in ds))
    variance = jax.tree.map(lambda s, m: jnp.maximum(s / n - m * m, 0), sum_squares, mean)
    return GradientStats(*(like_params(t, params) for t in (mean, sum_squares, variance)))
