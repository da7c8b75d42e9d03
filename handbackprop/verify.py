"""Gradient verification: any gradient against ``jax.grad`` and finite differences, leaf by leaf.

:func:`verify_gradient` checks a gradient of any scalar function of a pytree;
:func:`check_backprop` checks the library's own backward pass and diagnoses each layer. Each
leaf gets three comparisons, each passing when error / tolerance <= 1: against ``jax.grad``
entry by entry at a round-off tolerance, along random directions (the dot-product test,
O(directions) evaluations at any size) and coordinate by coordinate (exhaustive, 4 evaluations
per parameter, on by default up to 4096 parameters). The error model of each tolerance is in
:mod:`handbackprop.error_model`; the records and their text in :mod:`handbackprop.report`; the
layer diagnosis in :mod:`handbackprop.layer_check`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from handbackprop import error_model, layer_check
from handbackprop import finite_diff as fd
from handbackprop.backprop import backprop
from handbackprop.backprop import loss as net_loss
from handbackprop.error_model import EXHAUSTIVE_MAX  # noqa: F401  (its documented home was here)
from handbackprop.mlp import MLP
from handbackprop.report import GradientReport, LayerReport, LeafReport  # noqa: F401  (public records)


def verify_gradient(loss_fn, grad_fn, params, *args, key=None, num_directions=8, exhaustive=None,
                    rtol=None, atol=None) -> GradientReport:
    """Check ``grad_fn`` against ``jax.grad(loss_fn)`` and against finite differences.

    Works for any scalar function of any pytree of floating arrays. The tolerances, and why,
    are in :mod:`handbackprop.error_model` and in ``report.tolerances``.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``, JAX-traceable. The checks compile once
        per ``loss_fn`` (static under ``jax.jit``) and shapes: pass the same function object
        (or an equal one) to verify again without compiling again.
      grad_fn: ``grad_fn(params, *args)``, the gradient under test: a pytree like ``params``
        (same structure, shapes, dtypes). Called once, as is (it need not be traceable).
      params: a pytree of floating arrays, n entries in all.
      *args: further arguments of both functions, held fixed.
      key: a ``jax.random`` key for the directions; default ``jax.random.key(0)``.
      num_directions: random directions per leaf, at least 1.
      exhaustive: check every coordinate (4n evaluations); default when n <= ``EXHAUSTIVE_MAX``
        (4096).
      rtol: the autodiff comparison's tolerance relative to the leaf's largest ``|autodiff|``;
        default ``64 u``.
      atol: an absolute allowance added to it; default the dtype's smallest normal number.

    Returns:
      A :class:`GradientReport`.

    Raises:
      TypeError: for a non-floating leaf or a ``loss_fn`` that does not return a floating scalar.
      ValueError: for ``grad_fn`` returning another tree structure, a loss that is not finite at
        ``params``, or ``num_directions < 1``.

    Example:
      >>> import jax.numpy as jnp, handbackprop as hbp
      >>> f = lambda p: jnp.sum(jnp.sin(p["a"]) * p["b"])
      >>> wrong = lambda p: {"a": jnp.cos(p["a"]), "b": jnp.sin(p["a"])}  # forgot * b
      >>> p = {"a": jnp.linspace(0.0, 1.0, 3), "b": jnp.array([1.0, 2.0, 3.0])}
      >>> report = hbp.verify_gradient(f, wrong, p)
      >>> report.ok, [leaf.ok for leaf in report.leaves]
      (False, [False, True])
      >>> report.leaves[0].index
      (2,)
    """
    if not (isinstance(num_directions, int) and num_directions >= 1):
        raise ValueError(f"num_directions: expected an int >= 1, got {num_directions!r}")
    params = fd.as_params(params)
    fd.check_scalar_output(loss_fn, params, args, "loss_fn")
    key = jax.random.key(0) if key is None else key
    yours = grad_fn(params, *args)
    if jax.tree.structure(yours) != jax.tree.structure(params):
        raise ValueError(f"grad_fn: returned a pytree of structure {jax.tree.structure(yours)}, "
                         f"expected that of params, {jax.tree.structure(params)}")
    return error_model.check_leaves(loss_fn, yours, params, args, key=key, num_directions=num_directions,
                                    exhaustive=exhaustive, rtol=rtol, atol=atol)


def check_backprop(net: MLP, params, x, y, *, key=None, num_directions=8, exhaustive=None,
                   rtol=None, atol=None) -> GradientReport:
    """:func:`verify_gradient` for the library's :func:`~handbackprop.backprop`, plus each layer.

    Layer l's deltas (:func:`~handbackprop.deltas`) are compared with ``jax.grad`` of the summed
    per-example losses with respect to ``S^(l)`` (the forward pass continued from ``S^(l)``),
    and ``g_l'`` with ``jax``'s derivative of ``g_l``. The highest wrong layer is the fault:
    in ``g'`` if its ``g'`` is wrong, else in the base case (3.4) or the inductive step (3.5);
    layers below inherit it. Right deltas with a wrong gradient point at the gradient step (3.6).

    Args:
      net, params, x, y: as for :func:`~handbackprop.backprop`.
      key, num_directions, exhaustive, rtol, atol: as for :func:`verify_gradient`.

    Returns:
      A :class:`GradientReport` with leaves named ``layer l w`` / ``layer l b`` and ``layers``.

    Example:
      >>> import jax, handbackprop as hbp
      >>> net = hbp.MLP((3, 4, 2), activation="tanh")
      >>> params = hbp.init_params(jax.random.key(0), net)
      >>> x, y = jax.numpy.ones((5, 3)), jax.numpy.zeros((5, 2))
      >>> hbp.check_backprop(net, params, x, y).ok
      True
    """
    report = verify_gradient(_NetLoss(net), functools.partial(_jit_backprop, net), params, x, y, key=key,
                             num_directions=num_directions, exhaustive=exhaustive, rtol=rtol, atol=atol)
    leaves = tuple(dataclasses.replace(leaf, name=layer_check.layer_name(leaf.name)) for leaf in report.leaves)
    u = fd.unit_roundoff(jnp.result_type(params[0]["w"]))
    rtol = error_model.AUTODIFF_ULPS * u if rtol is None else rtol
    atol = float(jnp.finfo(jnp.result_type(params[0]["w"])).tiny) if atol is None else atol
    layers = layer_check.layer_reports(net, layer_check.layer_values(net, params, x, y), rtol, atol)
    return dataclasses.replace(report, leaves=leaves, layers=layers)


@functools.partial(jax.jit, static_argnums=0)
def _jit_backprop(net, params, x, y):
    return backprop(net, params, x, y)


@dataclasses.dataclass(frozen=True)
class _NetLoss:
    """``net``'s loss as ``f(params, x, y)``; equal for equal networks, so that the jitted
    checks (static in the loss function) compile once per network, not once per call."""

    net: MLP

    def __call__(self, params, x, y):
        return net_loss(self.net, params, x, y)
