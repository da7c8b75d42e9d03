"""check_backprop's layer diagnosis: each layer's delta and g' against autodiff, and where a
fault sits in the recursion (the base case 3.4, the inductive step 3.5, or g')."""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from handbackprop.backprop import deltas
from handbackprop.mlp import MLP, check_y, forward_cache
from handbackprop.report import LayerReport


class LayerValues(NamedTuple):
    """One layer's quantities, by hand and by autodiff."""

    delta: jax.Array  # delta^(l) from the hand recursion, (B, d_l)
    delta_autodiff: jax.Array  # jax.grad of the summed losses with respect to S^(l)
    deriv: jax.Array | None  # the hand g_l'(S^(l)); None for softmax (not elementwise)
    deriv_autodiff: jax.Array | None  # jax's derivative of g_l at S^(l)


def _continue(net, params, l, s, y):
    """The summed per-example losses as a function of ``S`` of layer l + 1 (0-based l): the
    forward pass of the layers above, as the sub-network they form."""
    x = net.activations[l].fn(s)
    if l + 1 < net.num_layers:
        above = dataclasses.replace(net, sizes=net.sizes[l + 1:], activation=net.hidden_activations[l + 1:],
                                    output_activation=net.activations[-1])
        cache = forward_cache(above, params[l + 1:], x)
        s, x = cache.ss[-1], cache.xs[-1]
    return jnp.sum(net.loss_fn.value(s, x, y))


@functools.partial(jax.jit, static_argnums=0)
def layer_values(net, params, x, y) -> list:
    """Per layer, a :class:`LayerValues`."""
    cache = forward_cache(net, params, x)
    yy = check_y(net, cache.xs[0], y)
    hand = deltas(net, params, x, y)
    out = []
    for l, (g, s, xl) in enumerate(zip(net.activations, cache.ss, cache.xs[1:])):
        auto = jax.grad(functools.partial(_continue, net, params, l))(s, yy)
        if g.elementwise:
            out.append(LayerValues(hand[l], auto, g.derivative(s, xl), jax.jvp(g.fn, (s,), (jnp.ones_like(s),))[1]))
        else:
            out.append(LayerValues(hand[l], auto, None, None))
    return out


def _ratio(hand, auto, rtol, atol):
    hand, auto = np.asarray(hand, np.float64), np.asarray(auto, np.float64)
    err = float(np.max(np.abs(hand - auto), initial=0.0))
    tol = atol + rtol * float(np.max(np.abs(auto), initial=0.0))
    return err, (0.0 if err == 0 else err / tol if np.isfinite(err) else math.inf)


def layer_reports(net, values, rtol, atol) -> tuple:
    """One :class:`LayerReport` per layer, the highest wrong layer named as the fault."""
    rows = []
    for l, (g, v) in enumerate(zip(net.activations, values), start=1):
        d_err, d_ratio = _ratio(v.delta, v.delta_autodiff, rtol, atol)
        g_err, g_ratio = _ratio(v.deriv, v.deriv_autodiff, rtol, atol) if v.deriv is not None else (None, None)
        rows.append(LayerReport(l, g.name, d_err, d_ratio, g_err, g_ratio))
    top = len(rows)
    for k in range(top - 1, -1, -1):  # from the output layer down
        row = rows[k]
        if row.delta_ratio <= 1 and row.ok:
            continue
        if row.deriv_ratio is not None and row.deriv_ratio > 1:
            why = f"g' of layer {row.layer} ({row.activation}) disagrees with jax's derivative of g"
        elif k + 1 < top and rows[k + 1].delta_ratio > 1:
            why = f"inherits the error of layer {row.layer + 1}"
        elif k + 1 == top:
            why = "base case (3.4): the output delta is wrong"
        else:
            why = f"inductive step (3.5) from layer {row.layer + 1} to {row.layer} is wrong"
        rows[k] = dataclasses.replace(row, diagnosis=why)
    return tuple(rows)


def layer_name(path):  # "[0]['w']" -> "layer 1 w"
    index, key = path[1:].split("]", 1)
    return f"layer {int(index) + 1} {key.strip(chr(39) + '[]')}"
