"""Losses: each example's error e_b and the output-layer delta, the base case (3.4).

A :class:`Loss` pairs the per-example value with its fused output delta
``delta^(L) = de/dS^(L)`` for the canonical output activation, in the optax style.

- ``squared_error``: ``e = 1/2 sum_k (o_k - y_k)^2``; identity output gives ``delta = o - y``.
  Any other output activation uses the general base case ``delta = (o - y) * g'(S)``
  (the note's 3.4), or the softmax Jacobian for a softmax output.
- ``binary_cross_entropy``: ``e = -sum_k [y log o + (1 - y) log(1 - o)]`` with a logistic
  output, computed from the logits S as ``softplus(S) - y S``; ``delta = sigmoid(S) - y``.
- ``softmax_cross_entropy``: ``e = -sum_k p_k log softmax(S)_k``; ``delta = sum(p) softmax(S) - p``
  (``softmax(S) - p`` for probability rows). Labels are integer classes (B,) or rows (B, K).

Cross-entropies are defined on logits, so they require their canonical output activation:
that is what keeps logits of +-1e4 finite.

Labels outside a loss's domain (a class outside [0, K), a binary target outside [0, 1], a
probability row with a negative entry or not summing to 1) are one rule, :func:`labels_ok`.
Concrete labels are refused by :func:`handbackprop.mlp.check_y` with a ``ValueError``; labels
traced under ``jax.jit`` have no value to refuse, so the cross-entropies give that example a
NaN loss and NaN deltas (hence NaN gradients): a bad label never passes as a zero.
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from handbackprop.activations import ACTIVATIONS, Activation


class Loss(NamedTuple):
    """A per-example loss and its fused output delta.

    Attributes:
      name: the loss's name.
      canonical: the name of the output activation it fuses with.
      value: ``(S, o, y) -> e`` of shape (B,), one loss per example, unreduced.
      delta: ``(S, o, y) -> de/dS^(L)`` of shape (B, K) for the canonical output activation.
      dedo: ``(o, y) -> de/do`` of shape (B, K) for any other output activation, or ``None``
        where only the canonical one is allowed.
    """

    name: str
    canonical: str
    value: Callable
    delta: Callable
    dedo: Callable | None


def _squared_error(s, o, y):
    return 0.5 * jnp.sum((o - y) ** 2, axis=-1)


def _residual(o, y):
    return o - y


def row_sum_tolerance(k: int, dtype) -> float:
    """How far from 1 a probability row of ``k`` entries in ``dtype`` may sum: ``k * eps``.

    Each entry rounded to ``dtype`` is off by at most eps/2 relative (so the exact sum of the
    rounded row is within eps/2 of 1), and summing k entries adds at most (k - 1) eps/2 more:
    k eps/2 in all, which ``k * eps`` covers twice over. A row off by more is not a rounded
    probability row but a wrong one.
    """
    return k * float(jnp.finfo(dtype).eps)


def labels_ok(name: str, y, k: int, xp=jnp):
    """Which examples' labels lie in the loss's domain: a bool array of shape (B,).

    Args:
      name: the loss's name.
      y: labels as :func:`handbackprop.mlp.check_y` returns them: integer classes (B,), or
        floating targets or probability rows (B, k).
      k: the number of outputs.
      xp: ``jax.numpy`` (in the losses, where labels may be traced), or ``numpy`` (for
        concrete labels, checked on the host).

    Softmax cross-entropy: a class in [0, k), or a row with entries >= 0 summing to 1 within
    :func:`row_sum_tolerance`; binary cross-entropy: every target in [0, 1]; squared error:
    any target (non-finite ones included: they give NaN by themselves). NaN fails every test.
    """
    if name == "softmax_cross_entropy" and jnp.issubdtype(y.dtype, jnp.integer):
        return (y >= 0) & (y < k)
    if name == "softmax_cross_entropy":
        err = xp.abs(xp.sum(y, axis=-1) - 1)
        return xp.all(y >= 0, axis=-1) & (err <= row_sum_tolerance(k, y.dtype))
    if name == "binary_cross_entropy":
        return xp.all((y >= 0) & (y <= 1), axis=-1)
    return xp.ones(y.shape[:1], bool)


def _nan_where_bad(name, p, y, k):
    """``p`` (B, K) with the rows of examples whose labels are out of the domain set to NaN."""
    return jnp.where(labels_ok(name, y, k)[:, None], p, jnp.nan)


def _bce_targets(s, y):
    return _nan_where_bad("binary_cross_entropy", y, y, s.shape[-1])


def _bce(s, o, y):
    return jnp.sum(jax.nn.softplus(s) - _bce_targets(s, y) * s, axis=-1)


def _bce_delta(s, o, y):
    return jax.nn.sigmoid(s) - _bce_targets(s, y)


def _onehot(s, y):
    """Integer labels (B,) to one-hot rows (B, K); probability rows pass through; an
    example whose label is out of the domain gets a NaN row."""
    k = s.shape[-1]
    p = jax.nn.one_hot(y, k, dtype=s.dtype) if jnp.issubdtype(y.dtype, jnp.integer) else y
    return _nan_where_bad("softmax_cross_entropy", p, y, k)


def _softmax_ce(s, o, y):
    p = _onehot(s, y)
    return -jnp.sum(p * jax.nn.log_softmax(s, axis=-1), axis=-1)


def _softmax_ce_delta(s, o, y):
    p = _onehot(s, y)
    return jnp.sum(p, axis=-1, keepdims=True) * o - p


squared_error = Loss("squared_error", "identity", _squared_error, lambda s, o, y: o - y, _residual)
binary_cross_entropy = Loss("binary_cross_entropy", "logistic", _bce, _bce_delta, None)
softmax_cross_entropy = Loss(
    "softmax_cross_entropy", "softmax", _softmax_ce, _softmax_ce_delta, None
)

LOSSES = {f.name: f for f in (squared_error, binary_cross_entropy, softmax_cross_entropy)}


def get(name):
    """Resolve a loss name.

    Raises:
      ValueError: for an unknown name (the message lists the valid ones).
    """
    if isinstance(name, Loss):
        return name
    if name not in LOSSES:
        raise ValueError(f"loss: unknown loss {name!r}; valid names are {sorted(LOSSES)}")
    return LOSSES[name]


def output_delta(loss: Loss, act: Activation, s, o, y):
    """Base case (3.4): ``delta^(L) = de/dS^(L)``, shape (B, K), per example.

    Fused and stable for the canonical pair; otherwise ``de/do * g'(S)`` for an elementwise
    output activation, or ``J_softmax^T de/do = o * (de/do - <o, de/do>)`` for softmax.
    """
    if act == ACTIVATIONS[loss.canonical]:
        return loss.delta(s, o, y)
    dedo = loss.dedo(o, y)
    if not act.elementwise:  # softmax's Jacobian applied to de/do
        return o * (dedo - jnp.sum(o * dedo, axis=-1, keepdims=True))
    return dedo * act.derivative(s, o)
