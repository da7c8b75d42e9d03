"""Activation functions g and their first and second derivatives g', g'', side by side.

Each activation is an :class:`Activation` pair in the optax style: ``fn(S)`` gives
``x = g(S)`` and ``deriv`` gives ``g'(S)`` elementwise; ``second`` gives ``g''(S)``, which
only the Hessian-based curvature (:mod:`handbackprop.curvature`) needs. Where a derivative is
cheaper from the layer's output (logistic: ``x (1 - x)``; tanh: ``1 - x^2``) ``uses_output``
is true and ``deriv`` and ``second`` are called with ``x`` instead of ``S``. A user's own
``(g, g')`` pair has no ``g''``: the Gauss-Newton quantities still work with it, the Hessian
ones raise.

Kinks follow ``jax.nn``: ``relu'(0) = 0`` (the note writes ``g'(s) = 1 for s >= 0``, but
defines ``g(0) = 0`` on the left piece; we take the left derivative, as ``jax.grad`` does),
``leaky_relu'(0) = 1`` and ``elu'(0) = 1``; second derivatives take the same sides
(``relu'' = leaky_relu'' = 0``, ``elu''(0) = alpha``). Leaky ReLU's slope is 0.01, ELU's alpha 1.0.

Softmax is not elementwise: it is only valid as the output activation, where the loss
module applies its Jacobian (see :func:`handbackprop.losses.output_delta`).
"""

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

LEAKY_SLOPE = 0.01  # as jax.nn.leaky_relu
ELU_ALPHA = 1.0  # as jax.nn.elu


class Activation(NamedTuple):
    """An activation g and its derivatives g' and g''.

    Attributes:
      name: a readable name.
      fn: ``S -> g(S)``, elementwise, any shape.
      deriv: ``g'`` elementwise; called with ``x = g(S)`` if ``uses_output`` else with ``S``.
      uses_output: whether ``deriv`` and ``second`` take the output rather than the pre-activation.
      elementwise: false only for softmax, whose derivative is a Jacobian, not a vector.
      second: ``g''`` elementwise, called like ``deriv``; ``None`` where unknown (a user pair).
    """

    name: str
    fn: Callable
    deriv: Callable | None
    uses_output: bool = False
    elementwise: bool = True
    second: Callable | None = None

    def derivative(self, s, x):
        """g'(S) for pre-activations ``s`` and outputs ``x = g(s)`` of the same shape."""
        return self.deriv(x if self.uses_output else s)

    def second_derivative(self, s, x):
        """g''(S) for pre-activations ``s`` and outputs ``x = g(s)`` of the same shape.

        Raises:
          ValueError: if the activation has no ``second`` (a user ``(g, g')`` pair).
        """
        if self.second is None:
            raise ValueError(
                f"activation {self.name!r} has no second derivative g''; Hessian-based curvature "
                "needs an Activation(name, g, g', second=g'') (the Gauss-Newton ones do not)"
            )
        return self.second(x if self.uses_output else s)


def _ones(s):
    return jnp.ones_like(s)


def _step(s):  # relu'(S): 1 where S > 0, 0 at and below the kink
    return (s > 0).astype(s.dtype)


def _leaky_step(s):  # leaky_relu'(S), as jax.nn.leaky_relu (which uses S >= 0)
    return jnp.where(s >= 0, 1.0, LEAKY_SLOPE).astype(s.dtype)


def _elu_deriv(s):  # elu'(S) = 1 for S > 0, alpha e^S otherwise
    return jnp.where(s > 0, 1.0, ELU_ALPHA * jnp.exp(jnp.minimum(s, 0))).astype(s.dtype)


def _zeros(s):
    return jnp.zeros_like(s)


def _elu_second(s):  # elu''(S) = 0 for S > 0, alpha e^S otherwise (the side jax.grad takes at 0)
    return jnp.where(s > 0, 0.0, ELU_ALPHA * jnp.exp(jnp.minimum(s, 0))).astype(s.dtype)


def _elu(s):
    return jax.nn.elu(s, ELU_ALPHA)


def _leaky_relu(s):
    return jax.nn.leaky_relu(s, LEAKY_SLOPE)


identity = Activation("identity", lambda s: s, _ones, second=_zeros)
logistic = Activation("logistic", jax.nn.sigmoid, lambda x: x * (1 - x), uses_output=True,
                      second=lambda x: x * (1 - x) * (1 - 2 * x))
tanh = Activation("tanh", jnp.tanh, lambda x: 1 - x * x, uses_output=True,
                  second=lambda x: -2 * x * (1 - x * x))
relu = Activation("relu", jax.nn.relu, _step, second=_zeros)
leaky_relu = Activation("leaky_relu", _leaky_relu, _leaky_step, second=_zeros)
softplus = Activation("softplus", jax.nn.softplus, jax.nn.sigmoid,
                      second=lambda s: jax.nn.sigmoid(s) * jax.nn.sigmoid(-s))
elu = Activation("elu", _elu, _elu_deriv, second=_elu_second)
softmax = Activation(
    "softmax", lambda s: jax.nn.softmax(s, axis=-1), None, uses_output=True, elementwise=False
)

ACTIVATIONS = {
    a.name: a for a in (identity, logistic, tanh, relu, leaky_relu, softplus, elu, softmax)
}
RELU_LIKE = frozenset({"relu", "leaky_relu", "elu"})  # these get He initialisation


def get(spec, where="activation"):
    """Resolve an activation name, :class:`Activation`, or user ``(g, g')`` pair.

    A user pair's ``g'`` is called with the pre-activation ``S``.

    Raises:
      ValueError: for an unknown name (the message lists the valid ones).
      TypeError: for anything else that is not a name or a pair of callables.
    """
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        if spec not in ACTIVATIONS:
            raise ValueError(
                f"{where}: unknown activation {spec!r}; valid names are {sorted(ACTIVATIONS)}"
            )
        return ACTIVATIONS[spec]
    if isinstance(spec, tuple) and len(spec) == 2 and all(callable(f) for f in spec):
        g, dg = spec
        return Activation(getattr(g, "__name__", "custom"), g, dg)
    raise TypeError(
        f"{where}: expected an activation name, an Activation or a (g, g') pair of callables, "
        f"got {spec!r}"
    )
