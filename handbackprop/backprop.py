"""The delta recursion: classic backpropagation, written by hand.

With ``delta_j^(l) = de/dS_j^(l)`` (the note's 3.3), for a batch of row vectors:

    base case       (3.4)  delta^(L)   = de/do * g_L'(S^(L))        (fused for canonical pairs)
    inductive step  (3.5)  delta^(l-1) = (delta^(l) W^(l)T) * g_{l-1}'(S^(l-1))
    gradient        (3.6)  dE/dW^(l)   = x^(l-1)T delta^(l),   dE/db^(l) = sum_b delta_b^(l)

each gradient scaled by the reduction (1/B for a mean), plus ``lambda W`` for L2. No autodiff
is used: ``jax.grad`` appears only in tests, as an oracle. The recursion is made of
differentiable jnp operations, so it can itself be differentiated (Hessians, HVPs).
"""

import jax.numpy as jnp

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
      delta: ``delta^(L)``, (..., B, d_L); leading axes (say K columns of a factor of the
        loss's Hessian) are carried through unchanged.

    Returns:
      A tuple of L arrays, ``delta^(l)`` of shape (..., B, d_l).
    """
    gs = net.activations
    xs, ss = cache
    ds = [delta]
    for l in range(net.num_layers - 1, 0, -1):  # layer l+1 -> l, 0-based: params[l] is W^(l+1)
        # Inductive step (3.5): delta_i^(l) = g_l'(S_i^(l)) * sum_j w_ij^(l+1) delta_j^(l+1).
        delta = (delta @ params[l]["w"].T) * gs[l - 1].derivative(ss[l - 1], xs[l])
        ds.append(delta)
    return tuple(reversed(ds))


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
    cache = forward_cache(net, params, x)
    return delta_recursion(net, params, cache, check_y(net, cache.xs[0], y))


def _reduce(net, per_example):
    return jnp.mean(per_example) if net.reduction == "mean" else jnp.sum(per_example)


def l2_penalty(net: MLP, params):
    """``(l2 / 2) sum_l ||W^(l)||^2``, biases excluded; ``0.0`` without L2."""
    if not net.l2:
        return 0.0
    return 0.5 * net.l2 * sum(jnp.sum(layer["w"] ** 2) for layer in params)


def add_l2_gradient(net: MLP, params, grads):
    """``grads`` plus the penalty's gradient ``l2 W`` on each weight: for gradients formed
    without it (per shard, or clipped and noised), since it does not depend on the data."""
    if not net.l2:
        return grads
    return tuple({**g, "w": g["w"] + net.l2 * p["w"]} for g, p in zip(grads, params))


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
    return _loss_from_cache(net, params, cache, check_y(net, cache.xs[0], y))


def _loss_from_cache(net, params, cache, y):
    per_example = net.loss_fn.value(cache.ss[-1], cache.xs[-1], y)
    return _reduce(net, per_example) + l2_penalty(net, params)


def value_and_backprop(net: MLP, params, x, y):
    """The loss and its gradient from one forward and one backward pass.

    Returns:
      ``(loss, grads)``: a scalar, and a tuple like ``params`` (same structure, shapes and
      dtypes) holding dloss/dW and dloss/db.
    """
    cache = forward_cache(net, params, x)
    y = check_y(net, cache.xs[0], y)
    scale = 1.0 / cache.xs[0].shape[0] if net.reduction == "mean" else 1.0
    ds = delta_recursion(net, params, cache, y, scale)
    grads = []
    for layer, x_prev, delta in zip(params, cache.xs[:-1], ds):
        # Gradient (3.6): de/dw_ij^(l) = x_i^(l-1) delta_j^(l), summed over the batch.
        g = {"w": x_prev.T @ delta + net.l2 * layer["w"] if net.l2 else x_prev.T @ delta}
        if net.bias:
            g["b"] = jnp.sum(delta, axis=0)  # dS_j/db_j = 1
        grads.append(g)
    return _loss_from_cache(net, params, cache, y), tuple(grads)


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
