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


def _bce(s, o, y):
    return jnp.sum(jax.nn.softplus(s) - y * s, axis=-1)


def _bce_delta(s, o, y):
    return jax.nn.sigmoid(s) - y


def _onehot(s, y):
    """Integer labels (B,) to one-hot rows (B, K); probability rows pass through."""
    if jnp.issubdtype(y.dtype, jnp.integer):
        return jax.nn.one_hot(y, s.shape[-1], dtype=s.dtype)
    return y


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
