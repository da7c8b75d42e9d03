"""The delta recursion: classic backpropagation, written by hand, and the one gradient path.

With ``delta_j^(l) = de/dS_j^(l)`` (the note's 3.3), for a batch of row vectors:

    base case       (3.4)  delta^(L)   = de/do * g_L'(S^(L))        (fused for canonical pairs)
    inductive step  (3.5)  delta^(l-1) = (delta^(l) W^(l)T) * g_{l-1}'(S^(l-1))
    gradient        (3.6)  dE/dW^(l)   = x^(l-1)T delta^(l),   dE/db^(l) = sum_b delta_b^(l)

Every gradient of the library takes one path: per-batch sums first, then one finish.

    sums     :func:`batch_sums` (or ``per_example.clipped_sums``): ``sum_b w_b e_b`` and
             ``sum_b w_b c_b g_b``, by (3.6) in :func:`gradient_sums` on deltas scaled per
             example (clipping factors ``c_b``, weights ``w_b``);
    shard    ``parallel.sharded_sums``: the same sums per device, one ``psum``;
    finish   :func:`finish`: ``(sum + noise) / batch + l2 W``, in the parameters' dtypes.

Where nothing is added to the sums (:func:`value_and_backprop`), the mean's 1/B is put on
delta^(L) instead (``batch_sums(..., scale=1/B)``, ``finish(..., 1)``), as ``jax.grad`` puts it
on its cotangent: (B, d_L) multiplications rather than a pass over all P gradient entries.

One home for each rule: (3.4)-(3.5) in :func:`delta_recursion` and :func:`backward`, (3.6)
in :func:`gradient_sums`, the mean/sum reduction in :func:`divisor`, the L2 term in
:func:`l2_penalty` and :func:`add_l2_gradient`, the gradients' dtypes in
:func:`like_params`; clipping and norms in ``per_example``, the noise in ``dp``, the
sharding in ``parallel``. No autodiff is used: ``jax.grad`` appears only in tests, as an
oracle. The recursion is made of differentiable jnp operations, so it can itself be
differentiated (Hessians, HVPs).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from handbackprop.losses import output_delta
from handbackprop.mlp import MLP, check_y, forward_cache


def delta_recursion(net: MLP, params, cache, y, scale=1.0):
    """The deltas of every layer from a forward cache: ``(delta^(1), ..., delta^(L))``.

    Args:
      net: the network.
      params: its parameters.
      cache: ``forward_cache(net, params, x)``.
      y: checked labels.
      scale: a factor applied to the base case and so, by linearity, to every delta
        (the reduction's 1/B, applied once to the narrowest array rather than to each gradient).

    Returns:
      A tuple of L arrays, ``delta^(l)`` of shape (B, d_l).
    """
    xs, ss = cache
    # Base case (3.4): delta^(L) = de/dS^(L).
    return backward(net, params, cache, scale * output_delta(net.loss_fn, net.activations[-1],
                                                             ss[-1], xs[-1], y))


def backward(net: MLP, params, cache, delta):
    """The inductive step (3.5) from a given top delta: ``(delta^(1), ..., delta^(L))``.

    Args:
      net: the network.
      params: its parameters.
      cache: ``forward_cache(net, params, x)`` for a batch of B.
      delta: ``delta^(L)``, (B, d_L); for several at once (say the K columns of a factor of
        the loss's Hessian) map over them with ``jax.vmap``.

    Returns:
      A tuple of L arrays, ``delta^(l)`` of shape (B, d_l).
    """
    gs = net.activations
    xs, ss = cache
    ds = [delta]
    for l in range(net.num_layers - 1, 0, -1):  # layer l+1 -> l, 0-based: params[l] is W^(l+1)
        # Inductive step (3.5): delta_i^(l) = g_l'(S_i^(l)) * sum_j w_ij^(l+1) delta_j^(l+1).
        delta = (delta @ params[l]["w"].T) * gs[l - 1].derivative(ss[l - 1], xs[l])
        ds.append(delta)
    return tuple(reversed(ds))


def forward_backward(net: MLP, params, x, y, scale=1.0):
    """One forward and one backward pass of a batch: ``(cache, y, deltas)``.

    Returns:
      ``forward_cache(net, params, x)``, the checked labels, and the per-example deltas
      ``(delta^(1), ..., delta^(L))``, each (B, d_l), times ``scale``: with the default 1,
      ``delta_b`` is d e_b / d S_b (of example b's own loss, not of the mean).
    """
    cache = forward_cache(net, params, x)
    y = check_y(net, cache.xs[0], y)
    return cache, y, delta_recursion(net, params, cache, y, scale)


def deltas(net: MLP, params, x, y):
    """Per-example deltas ``delta_b^(l) = d e_b / d S_b^(l)``, unreduced and without L2.

    Args:
      net: the network.
      params: its parameters.
      x: inputs, (B, d0).
      y: labels (see :func:`handbackprop.loss`).

    Returns:
      A tuple ``(delta^(1), ..., delta^(L))``, each of shape (B, d_l).
    """
    return forward_backward(net, params, x, y)[2]


def gradient_sums(net: MLP, xs, ds):
    """Gradient (3.6) summed over the batch, per layer: ``X^(l-1)T D^(l)`` and ``sum_b D_b^(l)``.

    Args:
      net: the network (for its bias).
      xs: the layer inputs ``(x^(0), ..., x^(L-1))``, each (B, d_{l-1}).
      ds: the deltas ``(delta^(1), ..., delta^(L))``, each (B, d_l), possibly scaled per
        example (by clipping factors or weights) beforehand.

    Returns:
      A tuple like ``params``, in the computation's dtype.
    """
    out = []
    for a, d in zip(xs, ds):
        # Gradient (3.6): de/dw_ij^(l) = x_i^(l-1) delta_j^(l), summed over the batch;
        # dS_j/db_j = 1.
        out.append({"w": batch_outer(a, d), "b": jnp.sum(d, axis=0)} if net.bias else {"w": batch_outer(a, d)})
    return tuple(out)


def batch_outer(a, d):
    """``sum_b a_b d_b^T = a^T d``: (B, m), (B, n) -> (m, n), the batch sum of (3.6)'s outer products.

    For one column (n = 1, a scalar output) XLA's CPU backend rewrites ``a.T @ d`` as a strided
    reduction over the batch, several times slower than the product ``(d.T @ a).T`` it keeps.
    """
    return (d.T @ a).T if d.shape[-1] == 1 else a.T @ d


class Sums(NamedTuple):
    """A batch's sums: everything data-dependent in a gradient, before :func:`finish`.

    Sums over disjoint parts of a batch add up to the whole batch's (``loss``, ``grads`` and
    ``dropped``; ``norms`` concatenate), which is what sharding relies on.

    Attributes:
      loss: ``sum_b w_b e_b``, a scalar, without L2.
      grads: ``sum_b w_b c_b g_b`` (``c_b`` the clipping factor, 1 unclipped), a tuple like
        ``params``, in the computation's dtype (that of the first layer's ``w``).
      norms: ``||g_b||`` before clipping, (B,), NaN for a non-finite ``g_b``; ``None``
        unclipped.
      dropped: how many examples with ``w_b > 0`` had a non-finite gradient and so add
        nothing to ``grads`` (an int32 scalar); ``None`` unclipped.
    """

    loss: Any
    grads: Any
    norms: Any = None
    dropped: Any = None


def example_losses(net: MLP, cache, y):
    """Each example's loss ``e_b`` from a forward cache, (B,)."""
    return net.loss_fn.value(cache.ss[-1], cache.xs[-1], y)


def weighted_sum(e, weights):
    """``sum_b w_b e_b``; an example of weight 0 adds exactly 0, even if ``e_b`` is not finite."""
    if weights is None:
        return jnp.sum(e)
    return jnp.sum(jnp.where(weights != 0, weights * e, 0))


def check_weights(weights, x, unit=False):
    """Check per-example ``weights`` against the batch ``x``; return them as an array (or None).

    Args:
      weights: ``None``, or shape (B,), real or boolean.
      x: the batch, (B, d0).
      unit: require ``0 <= w <= 1`` (as clipping's sensitivity bound does) of concrete
        weights. Traced weights (non-static arguments of a jitted caller) have no value at
        trace time: there, a weight outside [0, 1] or NaN makes the result NaN instead.

    Raises:
      ValueError, TypeError: naming ``weights``, with what was expected and received.
    """
    if weights is None:
        return None
    batch = tuple(np.shape(x)[:1])
    if tuple(np.shape(weights)) != batch:
        raise ValueError(f"weights: expected shape {batch}, one per example of x, "
                         f"got shape {np.shape(weights)}")
    dtype = jnp.result_type(weights)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
            or dtype == jnp.bool_):
        raise TypeError(f"weights: expected real or boolean weights, got dtype {dtype}")
    if unit:
        try:
            w = np.asarray(weights, np.float64)
        except jax.errors.TracerArrayConversionError:  # traced: checked where it is used
            return jnp.asarray(weights)
        bad = np.flatnonzero(~((w >= 0) & (w <= 1)))  # NaN fails both
        if bad.size:
            raise ValueError(f"weights: expected numbers in [0, 1], got {float(w[bad[0]])!r} "
                             f"at index {bad[0]}")
    return jnp.asarray(weights)


def batch_sums(net: MLP, params, x, y, weights=None, scale=1.0) -> Sums:
    """A batch's loss and gradient sums, unclipped: ``sum_b w_b e_b`` and ``scale sum_b w_b g_b``.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs, (B, d0).
      y: labels for ``net.loss``.
      weights: optional (B,): example b counts ``weights[b]`` times (e.g. a boolean mask of
        the real examples of a padded batch); an example of weight 0 adds exactly nothing.
      scale: a factor on the gradient sums (not the loss), applied to the base case
        delta^(L), (B, d_L), and so to every delta: the reduction's 1/B there costs no pass
        over the P gradient entries (:func:`value_and_backprop`).

    Returns:
      :class:`Sums` ``(loss, grads, None, None)``; :func:`finish` makes the gradient.
    """
    weights = check_weights(weights, x)
    cache, y, ds = forward_backward(net, params, x, y, scale)
    xs = cache.xs[:-1]
    if weights is not None:
        w = weights[:, None]
        keep = w != 0  # 0 * inf would be NaN: a weight-0 row is zeroed, not multiplied
        xs = tuple(jnp.where(keep, a, 0) for a in xs)
        ds = tuple(jnp.where(keep, w * d, 0) for d in ds)
    return Sums(weighted_sum(example_losses(net, cache, y), weights), gradient_sums(net, xs, ds))


def divisor(net: MLP, batch):
    """The reduction: a batch's sums are divided by B for ``reduction="mean"``, 1 for ``"sum"``."""
    return batch if net.reduction == "mean" else 1


def l2_penalty(net: MLP, params):
    """``(l2 / 2) sum_l ||W^(l)||^2``, biases excluded; ``0.0`` without L2."""
    if not net.l2:
        return 0.0
    return 0.5 * net.l2 * sum(jnp.sum(layer["w"] ** 2) for layer in params)


def add_l2_gradient(net: MLP, params, grads):
    """``grads`` plus the penalty's gradient ``l2 W`` on each weight: added once, to a finished
    gradient, since it does not depend on the data (so it is never clipped nor noised)."""
    if not net.l2:
        return grads
    # l2 W in the gradient's (wider) dtype: a bfloat16 W must not round l2 W to bfloat16.
    return tuple({**g, "w": g["w"] + net.l2 * jnp.asarray(p["w"], g["w"].dtype)}
                 for g, p in zip(grads, params))


def like_params(tree, params):
    """Each leaf of a tree like ``params`` cast to its parameter's dtype (gradients keep the
    parameters' dtypes, also when they mix, e.g. float32 and bfloat16)."""
    return jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), tree, params)


def finish(net: MLP, params, grad_sum, batch, noise=None):
    """The gradient from a batch's sum: ``(grad_sum + noise) / batch + l2 W``.

    Args:
      net: the network (for its L2 term).
      params: its parameters.
      grad_sum: a gradient sum, a tuple like ``params`` (``Sums.grads``, reduced across
        devices or not).
      batch: the divisor: ``divisor(net, B)`` for the loss's gradient; B (or the expected B
        of a Poisson batch) for DP-SGD, whatever ``net.reduction``.
      noise: optional, a tuple like ``params`` added to the sum before the division (DP-SGD's
        Gaussian noise, calibrated to the sum).

    Returns:
      A tuple like ``params``: same structure, shapes and dtypes.
    """
    if noise is not None:
        grad_sum = jax.tree.map(lambda g, z: g + z.astype(g.dtype), grad_sum, noise)
    if not (isinstance(batch, int) and batch == 1):  # 1: the sums were scaled already
        grad_sum = jax.tree.map(lambda g: g / jnp.asarray(batch, g.dtype), grad_sum)
    return like_params(add_l2_gradient(net, params, grad_sum), params)


def finish_loss(net: MLP, params, loss_sum, batch):
    """The loss from a batch's sum: ``loss_sum / batch + (l2 / 2) sum ||W||^2``."""
    return loss_sum / batch + l2_penalty(net, params)


def loss(net: MLP, params, x, y):
    """The scalar loss: the reduced per-example losses plus ``(l2 / 2) sum ||W||^2``.

    Args:
      net: the network.
      params: its parameters.
      x: inputs, (B, d0), floating; cast to the parameters' dtype.
      y: squared error: targets (B, dL); binary cross-entropy: 0/1 targets (B, dL);
        softmax cross-entropy: integer classes (B,) or probability rows (B, dL).

    Returns:
      A scalar of the parameters' dtype.
    """
    cache = forward_cache(net, params, x)
    e = example_losses(net, cache, check_y(net, cache.xs[0], y))
    return finish_loss(net, params, jnp.sum(e), divisor(net, e.shape[0]))


def value_and_backprop(net: MLP, params, x, y):
    """The loss and its gradient from one forward and one backward pass.

    Returns:
      ``(loss, grads)``: a scalar, and a tuple like ``params`` (same structure, shapes and
      dtypes) holding dloss/dW and dloss/db.
    """
    n = divisor(net, np.shape(x)[0])
    # The mean's 1/B scales delta^(L), (B, d_L), as jax.grad's cotangent does: dividing the
    # finished sums instead is one more pass over all P gradient entries (10% of the time of
    # a 256-256-10 network at B = 32 on our CPU).
    sums = batch_sums(net, params, x, y, scale=1.0 / max(n, 1))  # B = 0: check_x says so
    return finish_loss(net, params, sums.loss, n), finish(net, params, sums.grads, 1)


def backprop(net: MLP, params, x, y):
    """The gradient of :func:`loss` with respect to ``params``, by the delta recursion alone.

    Example:
      >>> import jax, handbackprop as hbp
      >>> net = hbp.MLP((3, 4, 2))
      >>> params = hbp.init_params(jax.random.key(0), net)
      >>> x, y = jax.numpy.ones((5, 3)), jax.numpy.zeros((5, 2))
      >>> grads = jax.jit(hbp.backprop, static_argnums=0)(net, params, x, y)
      >>> jax.tree.map(jax.numpy.shape, grads)
      ({'b': (4,), 'w': (3, 4)}, {'b': (2,), 'w': (4, 2)})
    """
    return value_and_backprop(net, params, x, y)[1]
