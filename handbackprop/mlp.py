"""The network: static configuration, parameter initialisation, the forward pass, checks.

    S^(l) = x^(l-1) W^(l) + b^(l),   x^(l) = g_l(S^(l)),   l = 1..L

with ``W^(l)`` of shape ``(d^(l-1), d^(l))``: ``W[i, j]`` links node i of layer l-1 to node j
of layer l, the note's ``w_ij^(l)``. Parameters are a tuple with one ``{"w", "b"}`` dict per
layer (``{"w"}`` alone without bias).
"""

import dataclasses
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from handbackprop import activations as _activations
from handbackprop import losses as _losses
from handbackprop.checks import check_key

REDUCTIONS = ("mean", "sum")


def _is_single_activation(spec):
    return (
        isinstance(spec, (str, _activations.Activation))
        or isinstance(spec, tuple) and len(spec) == 2 and all(callable(f) for f in spec)
    )


@dataclasses.dataclass(frozen=True)
class MLP:
    """A multilayer perceptron's static, hashable configuration.

    Args:
      sizes: ``(d0, d1, ..., dL)``, the input size then each layer's width; at least two.
      activation: the hidden layers' activation: a name (see
        ``handbackprop.activations.ACTIVATIONS``), a user ``(g, g')`` pair (``g'`` of S),
        or one of these per hidden layer.
      output_activation: the output layer's; ``None`` picks the loss's canonical one
        (identity for squared error, logistic for binary cross-entropy, softmax for softmax
        cross-entropy). Squared error accepts any other.
      loss: ``"squared_error"``, ``"binary_cross_entropy"`` or ``"softmax_cross_entropy"``.
      bias: whether each layer has a bias ``b``.
      l2: lambda of the penalty ``(lambda / 2) sum_l ||W^(l)||^2`` (weights, not biases).
      reduction: ``"mean"`` (default) or ``"sum"`` of the per-example losses.

    Raises:
      ValueError, TypeError: for any invalid field, naming it, raised here.

    Example:
      >>> MLP((4, 8, 3), loss="softmax_cross_entropy").output_activation
      'softmax'
    """

    sizes: tuple
    activation: Any = "relu"
    output_activation: Any = None
    loss: str = "squared_error"
    bias: bool = True
    l2: float = 0.0
    reduction: str = "mean"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        # Integers only: int() would turn 4.5 into 4 and "342" into (3, 4, 2) without a word.
        if not isinstance(self.sizes, (tuple, list, np.ndarray)) or not all(
                isinstance(d, numbers.Integral) and not isinstance(d, (bool, np.bool_))
                for d in self.sizes):
            raise TypeError(f"sizes: expected a sequence of ints, got {self.sizes!r}")
        sizes = tuple(int(d) for d in self.sizes)
        if len(sizes) < 2 or any(d <= 0 for d in sizes):
            raise ValueError(
                f"sizes: expected (d0, ..., dL) with at least two positive entries, got {self.sizes!r}"
            )
        set_("sizes", sizes)
        loss = _losses.get(self.loss)
        if _losses.LOSSES.get(loss.name) is loss:  # a built-in Loss: code compares names
            set_("loss", loss.name)
        hidden = len(sizes) - 2
        if _is_single_activation(self.activation) or not isinstance(self.activation, (tuple, list)):
            _activations.get(self.activation)
        else:
            acts = tuple(self.activation)
            if len(acts) != hidden:
                raise ValueError(
                    f"activation: expected one name or one per hidden layer ({hidden}), "
                    f"got {len(acts)}: {self.activation!r}"
                )
            set_("activation", acts)
        for i, spec in enumerate(self.hidden_activations, start=1):
            if not spec.elementwise:
                raise ValueError(f"activation: layer {i}: {spec.name} is only valid as output_activation")
        if self.output_activation is None:
            set_("output_activation", loss.canonical)
        out = _activations.get(self.output_activation, "output_activation")
        if out != _activations.ACTIVATIONS[loss.canonical] and loss.dedo is None:
            raise ValueError(
                f"output_activation: {loss.name} is computed from logits and needs "
                f"output_activation={loss.canonical!r} (or None), got {out.name!r}"
            )
        if not isinstance(self.bias, (bool, np.bool_)):
            raise TypeError(f"bias: expected True or False, got {self.bias!r}")
        set_("bias", bool(self.bias))
        if isinstance(self.l2, (bool, np.bool_)) or not isinstance(self.l2, numbers.Real):
            raise TypeError(f"l2: expected a finite number >= 0, got {self.l2!r}")
        if not (math.isfinite(self.l2) and self.l2 >= 0):
            raise ValueError(f"l2: expected a finite number >= 0, got {self.l2!r}")
        set_("l2", float(self.l2))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {self.reduction!r}")

    @property
    def num_layers(self) -> int:
        """L, the number of weight layers."""
        return len(self.sizes) - 1

    @property
    def hidden_activations(self) -> tuple:
        specs = self.activation if not _is_single_activation(self.activation) else (
            (self.activation,) * (len(self.sizes) - 2)
        )
        return tuple(_activations.get(a) for a in specs)

    @property
    def activations(self) -> tuple:
        """g_1, ..., g_L as :class:`~handbackprop.activations.Activation` pairs."""
        return self.hidden_activations + (_activations.get(self.output_activation),)

    @property
    def loss_fn(self) -> _losses.Loss:
        return _losses.get(self.loss)

    @property
    def num_params(self) -> int:
        return sum(a * b + b * self.bias for a, b in zip(self.sizes[:-1], self.sizes[1:]))


def init_params(key, net: MLP, dtype=jnp.float32):
    """Random parameters: He normal for ReLU-like layers, Glorot normal otherwise; zero bias.

    Args:
      key: a ``jax.random`` key.
      net: the network.
      dtype: a floating dtype.

    Returns:
      A tuple of L dicts ``{"w": (d_{l-1}, d_l), "b": (d_l,)}`` (no ``"b"`` without bias).

    Raises:
      TypeError: for a ``key`` that is not one ``jax.random`` key, a ``net`` that is not an
        :class:`MLP`, or a non-floating ``dtype``.
    """
    check_key(key)
    check_net(net)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {dtype!r}")
    params = []
    for k, act, (fan_in, fan_out) in zip(
        jax.random.split(key, net.num_layers), net.activations, zip(net.sizes[:-1], net.sizes[1:])
    ):
        var = 2.0 / fan_in if act.name in _activations.RELU_LIKE else 2.0 / (fan_in + fan_out)
        layer = {"w": math.sqrt(var) * jax.random.normal(k, (fan_in, fan_out), dtype)}
        if net.bias:
            layer["b"] = jnp.zeros((fan_out,), dtype)
        params.append(layer)
    return tuple(params)


class Cache(NamedTuple):
    """What the forward pass keeps for the backward pass.

    Attributes:
      xs: ``(x^(0), ..., x^(L))``, each (B, d_l); ``x^(0)`` is the input, ``x^(L) = o``.
      ss: ``(S^(1), ..., S^(L))``, each (B, d_l).
    """

    xs: tuple
    ss: tuple


def forward_cache(net: MLP, params, x) -> Cache:
    """The forward pass, keeping every S^(l) and x^(l). ``x`` is (B, d0)."""
    x = check_x(net, params, x)
    xs, ss = [x], []
    for layer, g in zip(params, net.activations):
        s = xs[-1] @ layer["w"]  # S_j^(l) = sum_i w_ij^(l) x_i^(l-1)  (+ b_j^(l))
        if net.bias:
            s = s + layer["b"][None, :]
        ss.append(s)
        xs.append(g.fn(s))  # x_j^(l) = g_l(S_j^(l))
    return Cache(tuple(xs), tuple(ss))


def forward(net: MLP, params, x):
    """The network's output ``o = x^(L)``, shape (B, dL), for inputs ``x`` of shape (B, d0)."""
    return forward_cache(net, params, x).xs[-1]


# -- input checks: at trace time, before any computation, naming the argument ------------


def _shape(a):
    return tuple(np.shape(a))


def check_net(net):
    """Raise unless ``net`` is an :class:`MLP` (a tuple of sizes is the common slip)."""
    if not isinstance(net, MLP):
        hint = f"; build one with MLP({net!r})" if isinstance(net, (tuple, list)) else ""
        raise TypeError(f"net: expected an MLP, got {type(net).__name__} {net!r}{hint}")


def check_params(net: MLP, params):
    """Raise if ``params`` does not match ``net`` (layer count, keys, shapes, dtypes)."""
    check_net(net)
    if not isinstance(params, (tuple, list)) or len(params) != net.num_layers:
        got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
        raise ValueError(f"params: expected a tuple of {net.num_layers} layers, got {got}")
    keys = {"w", "b"} if net.bias else {"w"}
    for l, (layer, d_in, d_out) in enumerate(zip(params, net.sizes[:-1], net.sizes[1:]), 1):
        if not isinstance(layer, dict) or set(layer) != keys:
            got = sorted(layer) if isinstance(layer, dict) else type(layer).__name__
            raise ValueError(f"params: layer {l}: expected keys {sorted(keys)}, got {got}")
        for name, want in (("w", (d_in, d_out)), ("b", (d_out,))):
            if name in layer and _shape(layer[name]) != want:
                raise ValueError(
                    f"params: layer {l}: {name} has shape {_shape(layer[name])}, expected {want}"
                )
            if name in layer and not jnp.issubdtype(jnp.result_type(layer[name]), jnp.floating):
                raise TypeError(
                    f"params: layer {l}: {name} has dtype {jnp.result_type(layer[name])}, "
                    "expected a floating dtype"
                )


def _as_array(name, x):
    """A nested Python list or tuple as a NumPy array (JAX takes arrays only); else ``x``."""
    if not isinstance(x, (list, tuple)):
        return x
    try:
        return np.asarray(x)
    except ValueError:  # ragged
        raise ValueError(f"{name}: expected a rectangular array or nested list, "
                         "got a ragged nested list") from None


def check_x(net: MLP, params, x):
    """Check params and inputs; return ``x`` as an array of the parameters' dtype.

    Every entry point's inputs go through here (via :func:`forward_cache`), so this is the one
    place that refuses an empty batch: its mean loss, gradient and metrics would be 0/0.
    """
    check_params(net, params)
    x = _as_array("x", x)
    if _shape(x)[1:] != (net.sizes[0],) or len(_shape(x)) != 2:
        raise ValueError(f"x: expected shape (B, {net.sizes[0]}), got {_shape(x)}")
    if _shape(x)[0] == 0:
        raise ValueError(f"x: expected at least one example, got an empty batch of shape {_shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"x: expected a floating dtype, got {jnp.result_type(x)}")
    return jnp.asarray(x, jnp.result_type(params[0]["w"]))


def check_y(net: MLP, x, y):
    """Check labels against the loss and the batch; return them as an array.

    Floating targets are cast to the dtype of ``x`` (already that of the parameters). Concrete
    labels outside the loss's domain (:func:`handbackprop.losses.labels_ok`: a class outside
    [0, K), a binary target outside [0, 1], a probability row with a negative entry or not
    summing to 1) raise here. Traced ones (under ``jax.jit``) cannot be inspected: the loss
    then gives each such example a NaN loss and NaN gradient, never a plausible zero.

    Raises:
      ValueError: naming ``y``, for a wrong shape or dtype, or a concrete label out of domain,
        e.g. ``y: softmax_cross_entropy needs class labels in [0, 3), got 7 at index 0``.
    """
    y = _as_array("y", y)
    batch, k = _shape(x)[0], net.sizes[-1]
    shape, dtype = _shape(y), jnp.result_type(y)
    # Concrete labels are checked on the host, as given (NumPy, or a JAX array outside jit):
    # inside a jit trace even a constant becomes a tracer once jnp touches it.
    host = None if isinstance(y, jax.core.Tracer) else np.asarray(y)
    if net.loss == "softmax_cross_entropy" and jnp.issubdtype(dtype, jnp.integer):
        if shape != (batch,):
            raise ValueError(f"y: integer class labels must have shape ({batch},), got {shape}")
    else:
        if net.loss == "softmax_cross_entropy":
            ok = "integer classes of shape ({b},) or probability rows of shape ({b}, {k})"
        else:
            ok = "floating targets of shape ({b}, {k})"
        if shape != (batch, k) or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"y: {net.loss} expects " + ok.format(b=batch, k=k)
                             + f", got shape {shape} dtype {dtype}")
        dtype = jnp.result_type(x)
        host = None if host is None else host.astype(dtype)
    if host is not None:
        _check_label_values(net, host, k)
    return jnp.asarray(y, dtype)


def _check_label_values(net, y, k):
    """For concrete labels (a NumPy array): raise, naming the first example out of the
    loss's domain."""
    name = getattr(net.loss, "name", net.loss)
    bad = np.flatnonzero(~_losses.labels_ok(name, y, k, np))
    if not bad.size:
        return
    i, row = int(bad[0]), y[bad[0]]
    if name == "binary_cross_entropy":
        j = int(np.flatnonzero(~((row >= 0) & (row <= 1)))[0])
        raise ValueError(f"y: binary_cross_entropy needs targets in [0, 1], "
                         f"got {row[j]} at index ({i}, {j})")
    if row.ndim == 0:
        raise ValueError(f"y: softmax_cross_entropy needs class labels in [0, {k}), "
                         f"got {row} at index {i}")
    tol = _losses.row_sum_tolerance(k, y.dtype)
    raise ValueError(f"y: softmax_cross_entropy needs probability rows with entries >= 0 "
                     f"summing to 1 (within {tol:.2g}, K eps of {y.dtype}), got row {i} with "
                     f"sum {row.sum()} and smallest entry {row.min()}")
