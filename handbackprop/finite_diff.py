"""Finite differences: the note's numerical gradient (section 2.2), vectorised.

For a scalar ``f`` of a pytree, coordinate i is moved by a step ``h_i`` and ``f`` evaluated again:

    central   D_i = (f(θ + h_i e_i) - f(θ - h_i e_i)) / 2h_i    error ~ h_i^2 |f'''| / 6 + u |f| / h_i
    forward   D_i = (f(θ + h_i e_i) - f(θ)) / h_i              error ~ h_i |f''| / 2  + 2u |f| / h_i

where u is the machine epsilon of the coarser of the coordinate's dtype and ``f``'s. The first
term (truncation) falls with h, the second (round-off in f, divided by h) grows; they balance at
``h_i = cbrt(u) max(1, |θ_i|)`` (central) and ``sqrt(u) max(1, |θ_i|)`` (forward): for central
differences 6.1e-6 (error ~ 1e-11) in float64 and 4.9e-3 (error ~ 1e-5) in float32, where
``jax.test_util.check_grads``'s fixed 1e-4 leaves mostly round-off. The divisor is the step
actually taken, ``(θ_i + h_i) - (θ_i - h_i)`` as rounded, so representation error in ``θ ± h``
costs nothing.

All coordinates run in one jit-compiled ``lax.map`` over chunks of vmapped coordinates; ``f`` is
a static argument, so pass the same function object to reuse the compiled code.
"""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

ORDER = {"central": 1 / 3, "forward": 1 / 2}  # default step = u ** ORDER[method]
CHUNK_ELEMENTS = 1 << 22  # perturbed parameter copies held at once by one vmapped chunk


def as_params(params, where="params"):
    """``params`` with every leaf a floating ``jax.Array``.

    Warns when a leaf is float64 but ``jax_enable_x64`` is off (JAX would compute in float32).

    Raises:
      TypeError: for a leaf that is not floating, naming its path.
      ValueError: for a tree with no leaves.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{where}{jax.tree_util.keystr(path)}: dtype {dtype}, expected a floating dtype")
        if getattr(leaf, "dtype", None) == jnp.float64 and not jax.config.jax_enable_x64:
            warnings.warn(
                f"{where}{jax.tree_util.keystr(path)} is float64 but jax_enable_x64 is off: JAX computes "
                "in float32 and the check uses float32 tolerances. Call "
                "jax.config.update('jax_enable_x64', True) first.",
                stacklevel=3,
            )
    params = jax.tree.map(jnp.asarray, params)
    if not jax.tree.leaves(params):
        raise ValueError(f"{where}: expected a pytree with at least one array, got {params!r}")
    return params


def check_scalar_output(f, params, args, where="f") -> jax.ShapeDtypeStruct:
    """The shape and dtype of ``f(params, *args)``; raises unless it is a floating scalar."""
    out = jax.eval_shape(f, params, *args)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != () or not jnp.issubdtype(
        out.dtype, jnp.floating
    ):
        got = f"shape {out.shape} dtype {out.dtype}" if hasattr(out, "shape") else repr(out)
        raise TypeError(f"{where}: expected a function returning a floating scalar, got {got}")
    return out


def unit_roundoff(*dtypes) -> float:
    """The machine epsilon of the coarsest of ``dtypes``."""
    return max(float(jnp.finfo(d).eps) for d in dtypes)


def relative_steps(params, out_dtype, method="central", eps=None):
    """Per leaf, the relative step: ``eps`` or the default ``u ** (1/3)`` (``u ** (1/2)`` forward)."""
    if eps is not None:
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps: expected a positive finite relative step, got {eps!r}")
        return jax.tree.map(lambda p: float(eps), params)
    return jax.tree.map(lambda p: unit_roundoff(p.dtype, out_dtype) ** ORDER[method], params)


def _steps(params, rel):
    """Flat per-coordinate steps ``h_i = rel max(1, |θ_i|)``, each in its leaf's dtype."""
    return ravel_pytree(
        jax.tree.map(lambda p, r: (r * jnp.maximum(1, jnp.abs(p))).astype(p.dtype), params, rel)
    )[0]


def _map(fn, items, n, copies):
    """``lax.map(fn, items)`` in vmapped chunks holding at most ``CHUNK_ELEMENTS`` parameter
    copies (``copies`` of n entries per item); one plain ``vmap`` when everything fits."""
    chunk = max(1, CHUNK_ELEMENTS // (n * copies))
    return jax.vmap(fn)(items) if len(items) <= chunk else jax.lax.map(fn, items, batch_size=chunk)


@functools.partial(jax.jit, static_argnums=(0, 3))
def coordinate_values(f, params, args, offsets, rel):
    """``f`` at ``θ + k h_i e_i`` for every coordinate i and every offset k.

    Args:
      f: ``f(params, *args) -> scalar``.
      params: a pytree of floating arrays with n entries in all.
      args: a tuple of further arguments of ``f``.
      offsets: a static tuple of K integers.
      rel: per-leaf relative steps (see :func:`relative_steps`).

    Returns:
      ``(values, taken)``, each (n, K), coordinates in ``ravel_pytree`` order: ``values[i, k]``
      is f at the moved point and ``taken[i, k]`` the step actually taken, ``fl(θ_i + k h_i) - θ_i``.
    """
    flat, unravel = ravel_pytree(params)
    h = _steps(params, rel)
    taken = jnp.stack([ravel_pytree(unravel(flat + k * h))[0] - flat for k in offsets], axis=1)
    ks = jnp.asarray(offsets, flat.dtype)

    def at(i):
        return jax.vmap(lambda k: f(unravel(flat.at[i].add(k * h[i])), *args))(ks)

    values = _map(at, jnp.arange(flat.size), flat.size, len(offsets))
    return values, taken


def normal_draws(key, shape):
    """Standard normal draws as a NumPy float64 array, seeded from a ``jax.random`` key.

    NumPy rather than ``jax.random``: threefry would add seconds of compilation to each check.
    """
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist()).standard_normal(shape)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def line_values(f, params, args, num_directions, offsets, rel, zs, grads):
    """``f`` along random directions, each confined to one leaf, and gradients dotted with them.

    Direction d of leaf l is ``v_i = z_i max(1, |θ_i|) / sqrt(n_l)`` on that leaf's n_l entries
    (``z = zs[d]``; the leaves are disjoint, so they may share it), zero elsewhere, so that ``|v|`` is about one coordinate's scale and the
    step moves the function no further than a coordinate step would; ``f`` is evaluated at ``θ + k r_l v`` for each offset k, with
    ``r_l`` the leaf's relative step.

    Args:
      f, params, args: as for :func:`coordinate_values`.
      num_directions: D, directions per leaf (static).
      offsets: a static tuple of K integers; must contain -1 and 1.
      rel: per-leaf relative steps.
      zs: (D, n) standard normal draws (see :func:`normal_draws`).
      grads: a tuple of G gradient pytrees shaped like ``params``.

    Returns:
      ``(values, dots, absdots)`` of shapes (L D, K), (L D, G), (L D, G) for L leaves, line
      ``l D + d`` for direction d of leaf l: ``dots[m, g] = <grads[g], e>`` and ``absdots``
      ``sum_i |grads[g]_i e_i|``, where ``e = (fl(θ + r v) - fl(θ - r v)) / 2r`` is the
      direction the central difference at k = +-1 actually measures.
    """
    flat, unravel = ravel_pytree(params)
    rt = lambda a: ravel_pytree(unravel(a))[0]  # noqa: E731  (rounds to each leaf's dtype)
    sizes = [p.size for p in jax.tree.leaves(params)]
    # Leaf l owns entries [starts[l], starts[l + 1]): a range test against an iota, which XLA
    # computes at run time (a jnp.repeat of the leaf indices is constant-folded, for seconds).
    starts = jnp.asarray(np.cumsum([0, *sizes]), jnp.int32)
    index = jax.lax.iota(jnp.int32, flat.size)
    rel_leaf = jnp.asarray(jax.tree.leaves(rel), flat.dtype)
    norm = jnp.sqrt(jnp.asarray(sizes, flat.dtype))
    scale = jnp.maximum(1, jnp.abs(flat))
    gs = jnp.stack([ravel_pytree(g)[0].astype(flat.dtype) for g in grads])
    acc = jax.dtypes.canonicalize_dtype(jnp.float64)
    ks = jnp.asarray(offsets, flat.dtype)

    def at(m):
        leaf, r = m // num_directions, rel_leaf[m // num_directions]
        mine = (index >= starts[leaf]) & (index < starts[leaf + 1])
        v = jnp.where(mine, zs[m % num_directions].astype(flat.dtype) * scale / norm[leaf], 0)
        values = jax.vmap(lambda k: f(unravel(flat + k * r * v), *args))(ks)
        e = ((rt(flat + r * v) - rt(flat - r * v)) / (2 * r)).astype(acc)
        terms = gs.astype(acc) * e[None, :]
        return values, terms.sum(1), jnp.abs(terms).sum(1)

    lines = jnp.arange(len(sizes) * num_directions)
    return _map(at, lines, flat.size, len(offsets) + 2)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _numerical_grad(f, params, args, method, rel):
    flat, unravel = ravel_pytree(params)
    if method == "central":
        values, taken = coordinate_values(f, params, args, (-1, 1), rel)
        d = (values[:, 1] - values[:, 0]) / (taken[:, 1] - taken[:, 0])
    else:
        values, taken = coordinate_values(f, params, args, (1,), rel)
        d = (values[:, 0] - f(params, *args)) / taken[:, 0]
    return unravel(d.astype(flat.dtype))


def numerical_grad(f, params, *args, method="central", eps=None):
    """The full finite-difference gradient of a scalar function of a pytree.

    Coordinate i moves by ``h_i = eps max(1, |θ_i|)``; the derivative is divided by the step
    actually taken. ``n`` coordinates cost ``2n`` evaluations of ``f`` (central) or ``n + 1``
    (forward), run as one jit-compiled, chunked ``vmap``.

    Args:
      f: ``f(params, *args) -> scalar``, a JAX-traceable function.
      params: a pytree of floating arrays.
      *args: further arguments of ``f``, held fixed.
      method: ``"central"`` (error O(h^2)) or ``"forward"``, the note's one-sided difference (O(h)).
      eps: the relative step; default ``cbrt(u)`` (central) or ``sqrt(u)`` (forward), u the
        machine epsilon of the coarser of the leaf's dtype and ``f``'s output dtype.

    Returns:
      A pytree like ``params`` (structure, shapes, dtypes) of finite-difference derivatives.

    Raises:
      ValueError: for an unknown ``method`` or a non-positive ``eps``.
      TypeError: for a non-floating leaf or an ``f`` that does not return a floating scalar.

    Example:
      >>> import jax.numpy as jnp, handbackprop as hbp
      >>> g = hbp.numerical_grad(lambda p: jnp.sum(p["a"] ** 3), {"a": jnp.array([1.0, 2.0])})
      >>> [round(float(d), 3) for d in g["a"]]
      [3.0, 12.0]
    """
    if method not in ORDER:
        raise ValueError(f"method: expected one of {sorted(ORDER)}, got {method!r}")
    params = as_params(params)
    out = check_scalar_output(f, params, args)
    return _numerical_grad(f, params, args, method, relative_steps(params, out.dtype, method, eps))
