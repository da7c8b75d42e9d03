"""Checks of scalar arguments and PRNG keys shared by the public functions.

Each raises before any computation, naming the argument, the expected and the received value
(``clip_norm: expected a positive finite number, got -1.0``). The checks of networks, inputs
and labels live with the network, in :mod:`handbackprop.mlp`.
"""

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def check_scalar(name: str, value, *, strict: bool = True):
    """Check a scalar hyperparameter such as ``clip_norm``; return it unchanged.

    A concrete value (a Python number or a concrete array) must be real, finite and ``> 0``
    (``>= 0`` if not ``strict``). A traced value, such as a non-static argument of a jitted
    caller, has no value at trace time: only its shape ``()`` and real dtype are checked.

    Raises:
      TypeError: for a non-scalar, a bool or a non-real value.
      ValueError: for a concrete value out of range.
    """
    want = "a positive finite number" if strict else "a finite number >= 0"
    try:  # bools and None pass jnp.result_type (as bool, float32); strings raise
        dtype = jnp.result_type(value)
        real = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
    except TypeError:
        real = False
    if value is None or not real or np.shape(value) != ():
        raise TypeError(f"{name}: expected {want}, got {value!r}")
    try:
        v = float(value)
    except jax.errors.ConcretizationTypeError:  # traced: no value until it runs
        return value
    if not (math.isfinite(v) and (v > 0 if strict else v >= 0)):
        raise ValueError(f"{name}: expected {want}, got {v!r}")
    return value


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """Check an integer setting in ``[low, high]`` (``>= low`` without ``high``); return it.

    Raises:
      TypeError: for a non-integer (bools included).
      ValueError: for an out-of-range value.
    """
    bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int {bounds}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}: expected an int {bounds}, got {value!r}")
    return int(value)


def check_key(key):
    """Raise unless ``key`` is one ``jax.random`` key, typed (``key(0)``) or raw (``PRNGKey(0)``)."""
    shape, dtype = np.shape(key), getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if not (typed and shape == () or dtype == jnp.uint32 and shape == (2,)):
        raise TypeError(
            f"key: expected one jax.random key such as jax.random.key(0), "
            f"got shape {shape} dtype {dtype}"
        )


def check_like(name: str, tree, like):
    """Raise unless ``tree`` has the structure and leaf shapes of ``like`` (the parameters)."""
    want, got = jax.tree.structure(like), jax.tree.structure(tree)
    if want != got:
        raise ValueError(f"{name}: expected a pytree like params, {want}, got {got}")
    for (path, t), p in zip(jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(like)):
        if np.shape(t) != np.shape(p):
            raise ValueError(f"{name}: {jax.tree_util.keystr(path)} has shape {np.shape(t)}, "
                             f"expected {np.shape(p)}")
