"""Verifying derivative rules: VJPs, JVPs and ``jax.custom_vjp`` / ``jax.custom_jvp`` rules.

A rule for ``f`` (any pytree of arrays in, any pytree of floating arrays out) is checked through
scalars: for a random cotangent ``u`` confined to one output leaf, ``φ(x) = <u, f(x)>`` has the
gradient ``J^T u``, which the rule gives as its VJP of ``u``. So the gradient verifier's engine
(:func:`handbackprop.error_model.check_leaves`) applies unchanged, with its dtype-aware step,
Richardson truncation estimate, ECnoise round-off estimate and kink test, and each of its
leaves is one (input leaf, output leaf) block of the Jacobian, named ``arg0['w'] -> out[1]``.
No tolerance grows with an array's size. Where autodiff of ``f`` itself (or of a custom rule's
undecorated primal) is available, it is the second oracle: the rule's VJP of each cotangent
against it entry by entry, at a round-off tolerance. Exhaustive, small Jacobians are also
compared entry by entry (the rule's VJP rows against finite-difference columns), naming each
block's worst entry as (output index, input index).

Low-precision rules (bfloat16, float16 kernels) are judged against a high-precision reference
(``verify_rule(reference=...)``): error allowed = 2 x the error the reference itself makes in
the rule's dtype, plus one unit in the last place of the largest entry.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from handbackprop import error_model
from handbackprop import finite_diff as fd
from handbackprop.report import GradientReport, LeafReport

LOW_PRECISION = (jnp.bfloat16, jnp.float16)
JACOBIAN_MAX = 1 << 20  # exhaustive: the whole Jacobian, entry by entry, up to this many entries


@dataclasses.dataclass(frozen=True)
class _Contracted:
    """``<u, fn(*primals)>`` as a function of the differentiated primals: the scalar whose
    gradient is a VJP. Equal for equal ``fn`` and ``argnums``, so the jitted checks compile once."""

    fn: object
    argnums: tuple

    def __call__(self, diff, u, fixed):
        out = self.fn(*_merge(self.argnums, diff, fixed))
        terms = [jnp.vdot(c.astype(o.dtype), o) for c, o in zip(jax.tree.leaves(u), jax.tree.leaves(out))]
        return sum(terms[1:], terms[0])


@dataclasses.dataclass(frozen=True)
class _Flat:
    """``fn``'s output leaves raveled into one vector, as a function of the differentiated
    primals: the finite-difference Jacobian's columns are its coordinate differences."""

    fn: object
    argnums: tuple

    def __call__(self, diff, fixed):
        return ravel_pytree(self.fn(*_merge(self.argnums, diff, fixed)))[0]


@dataclasses.dataclass(frozen=True)
class _VJPOf:
    """``jax.vjp(fn)`` at the primals, of the cotangent passed last: the function whose own
    derivative ``verify_rule(order=2)`` checks."""

    fn: object
    argnums: tuple

    def __call__(self, *primals_and_u):
        *primals, u = primals_and_u
        return _jax_vjp(self.fn, self.argnums)(primals, u)


def _jax_vjp(fn, argnums):
    """``vjp_fn(primals, u)``: the VJP JAX uses for ``fn`` (its custom rule, if any)."""
    def vjp_fn(primals, u):
        diff, fixed = _split(argnums, primals)
        return jax.vjp(lambda *d: fn(*_merge(argnums, d, fixed)), *diff)[1](u)
    return vjp_fn


def _split(argnums, primals):
    """The differentiated primals and the others, each a tuple in order."""
    return (tuple(p for i, p in enumerate(primals) if i in argnums),
            tuple(p for i, p in enumerate(primals) if i not in argnums))


def _merge(argnums, diff, fixed):
    """The inverse of :func:`_split`."""
    diff, fixed, n = list(diff), list(fixed), len(diff) + len(fixed)
    return [diff.pop(0) if i in argnums else fixed.pop(0) for i in range(n)]


def _floating(tree) -> bool:
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves)


def _check_argnums(primals, argnums) -> tuple:
    """The differentiated primals' positions: default every primal whose leaves all float."""
    if argnums is None:
        argnums = tuple(i for i, p in enumerate(primals) if _floating(p))
        if not argnums:
            raise TypeError("primals: expected at least one primal with floating leaves, got "
                            f"dtypes {[str(jnp.result_type(x)) for x in jax.tree.leaves(primals)]}")
        return argnums
    argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for i in argnums:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(primals):
            raise ValueError(f"argnums: expected positions in [0, {len(primals)}), got {argnums!r}")
        if not _floating(primals[i]):
            raise TypeError(f"argnums: primal {i} has non-floating leaves, got dtypes "
                            f"{[str(jnp.result_type(x)) for x in jax.tree.leaves(primals[i])]}")
    return tuple(sorted(set(argnums)))


def _names(prefix, tree):
    return [prefix + jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _check_output(f, primals, where="f"):
    out = jax.eval_shape(f, *primals)
    leaves = jax.tree.leaves(out)
    if not leaves or not all(jnp.issubdtype(o.dtype, jnp.floating) for o in leaves):
        got = [f"{o.dtype}{o.shape}" for o in leaves] if leaves else repr(out)
        raise TypeError(f"{where}: expected a function returning a pytree of floating arrays, got {got}")
    return out


def _upcast(primals, argnums, f):
    """The primals in float64 when x64 is on (else low precision to float32), where ``f``
    accepts it; and the note saying so, or ``None``."""
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)
    dtypes = {jnp.result_type(x) for i in argnums for x in jax.tree.leaves(primals[i])}
    if all(d == wide for d in dtypes) or (wide != jnp.float64 and not dtypes & set(map(jnp.dtype, LOW_PRECISION))):
        return primals, None
    up = [jax.tree.map(lambda x: jnp.asarray(x, wide), p) if i in argnums else p for i, p in enumerate(primals)]
    try:
        out = jax.eval_shape(f, *up)
    except Exception:  # noqa: BLE001 (f may refuse other dtypes in any way)
        return primals, None
    if any(o.dtype != wide for o in jax.tree.leaves(out)):
        return primals, None
    was = ", ".join(sorted(str(d) for d in dtypes))
    return up, f"upcast to {jnp.dtype(wide).name} (primals were {was}): the check runs there"


def _cotangent(key, out_leaves, j):
    """A standard normal cotangent on output leaf j, zeros on the others (NumPy draws)."""
    return [np.asarray(fd.normal_draws(key, o.shape), np.float64).astype(o.dtype) if k == j
            else np.zeros(o.shape, o.dtype) for k, o in enumerate(out_leaves)]


def _blocks(fn, vjp_fn, primals, argnums, *, key, num_directions, exhaustive, rtol, atol, autodiff,
            notes=(), title="vjp check"):
    """Every (input leaf, output leaf) block of ``vjp_fn`` against ``fn`` by the engine: one
    random cotangent per output leaf, the engine's leaves then being the input leaves."""
    diff, fixed = _split(argnums, primals)
    diff = tuple(fd.as_params(d, f"primals[{i}]") for i, d in zip(argnums, diff))
    primals = _merge(argnums, diff, fixed)
    out = _check_output(fn, primals)
    out_leaves, out_tree = jax.tree.leaves(out), jax.tree.structure(out)
    out_names = _names("out", out)
    in_names = [n for i, d in zip(argnums, diff) for n in _names(f"arg{i}", d)]
    loss = _Contracted(fn, argnums)
    if autodiff:  # autodiff of fn may be unavailable (a Pallas call, a non-differentiable op)
        try:
            jax.eval_shape(jax.grad(loss), diff, jax.tree.unflatten(out_tree, out_leaves), fixed)
        except Exception as e:  # noqa: BLE001
            autodiff = False
            notes = (*notes, f"no autodiff oracle ({type(e).__name__}): finite differences alone judge")
    leaves, evaluations = [], 0
    for j, name in enumerate(out_names):
        u = jax.tree.unflatten(out_tree, _cotangent(jax.random.fold_in(key, j), out_leaves, j))
        yours = vjp_fn(tuple(primals), u)
        if not isinstance(yours, (tuple, list)) or len(yours) != len(argnums):
            raise ValueError(f"vjp_fn: expected a tuple of {len(argnums)} cotangents (one per differentiated "
                             f"primal, argnums {argnums}), got {type(yours).__name__}"
                             + (f" of length {len(yours)}" if isinstance(yours, (tuple, list)) else ""))
        yours = tuple(yours)
        if jax.tree.structure(yours) != jax.tree.structure(diff):
            raise ValueError(f"vjp_fn: returned cotangents of structure {jax.tree.structure(yours)}, "
                             f"expected that of the primals, {jax.tree.structure(diff)}")
        report = error_model.check_leaves(
            loss, yours, diff, (u, tuple(fixed)), key=jax.random.fold_in(key, j), num_directions=num_directions,
            exhaustive=exhaustive, rtol=rtol, atol=atol, autodiff=autodiff,
            names=[f"{n} -> {name}" for n in in_names])
        leaves += report.leaves
        evaluations += report.evaluations
    m, entries = sum(o.size for o in out_leaves), ()
    if report.exhaustive and m * report.num_params <= JACOBIAN_MAX and all(r.problem is None for r in leaves):
        try:
            jac = [jax.vmap(lambda e, g=g: ravel_pytree(g(tuple(primals), _unravel_like(out, e)))[0])(
                jnp.eye(m, dtype=jnp.result_type(*out_leaves))) for g in
                   (vjp_fn, *([_jax_vjp(fn, argnums)] if autodiff else []))]
        except Exception as e:  # noqa: BLE001 (a rule that cannot be vmapped: the blocks alone judge)
            notes = (*notes, f"vjp_fn not vmappable ({type(e).__name__}): worst entries named by input only")
        else:
            leaves = _worst_entries(leaves, _Flat(fn, argnums), diff, fixed, out_leaves, jac)
            evaluations += len(error_model.COORD_OFFSETS) * report.num_params
            entries = ("each block's worst entry, out[..] / arg[..]: its Jacobian entry by entry, the rule's VJP "
                       "of each output basis cotangent against central differences of f along each input "
                       "coordinate (same tolerance, σ = u |f_o| / 2) and against autodiff's",)
    tolerances = report.tolerances + (
        "each block: φ = <u, f(x)> along directions v confined to its input leaf, u a standard normal "
        "cotangent confined to its output leaf; 'yours' is the rule's VJP of u, 'autodiff' jax.vjp of f",
        *entries)
    return GradientReport(tuple(leaves), loss=math.nan, num_params=report.num_params, evaluations=evaluations,
                          num_directions=num_directions, exhaustive=report.exhaustive,
                          tolerances=tolerances, title=title, notes=tuple(notes))


def _unravel_like(out, flat):
    """A flat vector as a pytree like ``out`` (shapes and dtypes of its leaves)."""
    return ravel_pytree(jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), out))[1](flat)


def _worst_entries(rows, flat_fn, diff, fixed, out_leaves, jac):
    """The block rows with the worst entry of each (input leaf, output leaf) block of the
    Jacobian named: the rule's VJP rows ``jac[0]`` (one per output basis cotangent) against the
    finite-difference columns (central differences of f along each input coordinate, at the
    engine's steps and per-entry tolerance, σ its floor ``u |f_o| / 2``) and autodiff's rows
    ``jac[1]`` where given, at the engine's ``64 u max |autodiff|`` over the block."""
    out_dtype = jnp.result_type(*out_leaves)
    values, taken = (np.asarray(a, np.float64) for a in fd.coordinate_values(
        flat_fn, diff, (fixed,), error_model.COORD_OFFSETS, fd.relative_steps(diff, out_dtype)))
    f0 = np.asarray(flat_fn(diff, fixed), np.float64)
    jac = [np.asarray(j, np.float64) for j in jac]  # (outputs, inputs)
    in_leaves = jax.tree.leaves(diff)
    ins, outs = (np.cumsum([0] + [x.size for x in xs]) for xs in (in_leaves, out_leaves))
    rows = list(rows)
    for j, o in enumerate(out_leaves):
        for i, p in enumerate(in_leaves):
            k = j * len(in_leaves) + i
            if not o.size or not p.size:
                continue
            cols, oj = slice(ins[i], ins[i + 1]), slice(outs[j], outs[j + 1])
            v5 = np.insert(values[cols, :, oj], 2, f0[oj], axis=1).transpose(2, 0, 1).reshape(-1, 5)
            t5 = np.broadcast_to(np.insert(taken[cols], 2, 0.0, axis=1)[None], (o.size, p.size, 5))
            u = fd.unit_roundoff(p.dtype, o.dtype)
            sigma = np.repeat(u * np.abs(f0[oj]) / 2, p.size)
            yours = jac[0][oj, cols].ravel()
            ratio, at_fd, _ = error_model._fd_check(yours, v5, t5.reshape(-1, 5), sigma)
            entry = dict(finite_diff=at_fd, autodiff=None, autodiff_tol=None)
            if len(jac) > 1 and np.isfinite(jac[1][oj, cols]).all():
                a = jac[1][oj, cols].ravel()
                tol = float(jnp.finfo(p.dtype).tiny) + error_model.AUTODIFF_ULPS * u * np.max(np.abs(a), initial=0)
                ratio = np.fmax(ratio, np.abs(yours - a) / tol)
                entry.update(autodiff=a, autodiff_tol=np.full(a.shape, tol))
            w = int(np.argmax(np.nan_to_num(ratio, nan=-1.0)))
            rows[k] = dataclasses.replace(
                rows[k], output_index=error_model._index(w // p.size, o.shape),
                index=error_model._index(w % p.size, p.shape), yours=float(yours[w]),
                **{n: None if x is None else float(x[w]) for n, x in entry.items()})
    return rows


def _value_rows(label, got, want, rtol=None):
    """Rows comparing two pytrees of values (a rule's primal output against f's) leaf by leaf,
    at the autodiff comparison's round-off tolerance: ``64 u max |want|`` plus the tiniest normal."""
    rows = []
    for name, g, w in zip(_names("out", want), jax.tree.leaves(got), jax.tree.leaves(want)):
        dtype = jnp.result_type(w)
        tol = (error_model.AUTODIFF_ULPS * float(jnp.finfo(dtype).eps) if rtol is None else rtol) * float(
            np.max(np.abs(np.asarray(w, np.float64)), initial=0.0)) + float(jnp.finfo(dtype).tiny)
        rows.append(_compare_row(f"{name} ({label})", g, w, tol))
    return rows


def _compare_row(name, got, want, tol):
    """A :class:`LeafReport` for ``max |got - want| <= tol``: 'yours' got, 'autodiff' want."""
    w = np.asarray(want, np.float64)
    if np.shape(got) != w.shape:
        return LeafReport(name, w.shape, str(jnp.result_type(want)),
                          problem=f"shape {tuple(np.shape(got))}, expected {w.shape}")
    g = np.asarray(got, np.float64)
    err = np.abs(g - w)
    err = np.where(np.isnan(err), np.inf, err)
    k = int(np.argmax(err)) if err.size else 0
    e = float(err.max(initial=0.0))
    scale = float(np.max(np.abs(w), initial=0.0))
    return LeafReport(name, w.shape, str(jnp.result_type(want)), max_abs_error=e,
                      max_rel_error=e / scale if scale else e, index=error_model._index(k, w.shape),
                      yours=float(g.ravel()[k]), autodiff=float(w.ravel()[k]),
                      autodiff_ratio=0.0 if e == 0 else e / tol, autodiff_tol=tol)


def verify_vjp(f, vjp_fn, *primals, argnums=None, key=None, num_directions=8, exhaustive=None,
               rtol=None, atol=None) -> GradientReport:
    """Check a hand-written VJP of ``f`` against ``jax.vjp(f)`` and finite differences.

    Each (input leaf, output leaf) block is checked on its own (see the module docstring): the
    report has one row per block, named ``arg0['w'] -> out[1]``.

    Args:
      f: ``f(*primals)``, JAX-traceable, returning a pytree of floating arrays.
      vjp_fn: ``vjp_fn(primals, cotangents)``, the VJP under test: ``primals`` a tuple, the
        ``cotangents`` a pytree like f's output; returns a tuple with one cotangent pytree per
        differentiated primal. Called once per output leaf, as is.
      *primals: f's arguments, pytrees of arrays.
      argnums: the differentiated primals' positions; default every primal with floating
        leaves (integer and other arguments are held fixed).
      key, num_directions, exhaustive, rtol, atol: as for :func:`~handbackprop.verify_gradient`,
        per block (``exhaustive`` checks each input coordinate of each block).

    Returns:
      A :class:`~handbackprop.GradientReport` (``title`` ``"vjp check"``).

    Raises:
      TypeError: for an ``f`` that does not return floating arrays, or no floating primal.
      ValueError: for bad ``argnums`` or ``vjp_fn`` returning the wrong structure.

    Example:
      >>> import jax.numpy as jnp, handbackprop as hbp
      >>> f = lambda x, w: jnp.tanh(x @ w)
      >>> def vjp(primals, g):
      ...     x, w = primals
      ...     d = g * (1 - jnp.tanh(x @ w) ** 2)
      ...     return d @ w.T, x.T @ d
      >>> x, w = jnp.ones((2, 3)) / 3, jnp.eye(3)[:, :2]
      >>> hbp.verify_vjp(f, vjp, x, w).ok
      True
      >>> bad = lambda p, g: (vjp(p, g)[0], -vjp(p, g)[1])  # wrong sign in dW
      >>> [row.name for row in hbp.verify_vjp(f, bad, x, w).leaves if not row.ok]
      ['arg1 -> out']
    """
    _check_directions(num_directions)
    argnums = _check_argnums(primals, argnums)
    primals, note = _upcast(primals, argnums, f)
    key = jax.random.key(0) if key is None else key
    cast = _cast_like(primals, argnums) if note else None
    rule = vjp_fn if cast is None else (lambda p, u: cast(vjp_fn(p, u)))
    return _blocks(f, rule, primals, argnums, key=key, num_directions=num_directions, exhaustive=exhaustive,
                   rtol=rtol, atol=atol, autodiff=True, notes=(note,) if note else ())


def verify_jvp(f, jvp_fn, *primals, argnums=None, key=None, num_directions=8, exhaustive=None,
               rtol=None, atol=None) -> GradientReport:
    """Check a hand-written JVP of ``f`` (a ``jax.custom_jvp`` rule) against ``jax.jvp(f)`` and
    finite differences, and its primal output against ``f(*primals)``.

    The JVP is checked through its transpose: ``<u, jvp(v)> = <vjp(u), v>``, the VJP of u being
    ``jax.vjp`` of the (linear) map from tangents to ``jvp_fn``'s tangent output.

    Args:
      f: ``f(*primals)``, returning a pytree of floating arrays.
      jvp_fn: ``jvp_fn(primals, tangents) -> (primal_out, tangent_out)``, a ``jax.custom_jvp``
        rule's signature: it receives tangents for every primal, zeros for floating primals
        outside ``argnums`` and ``float0`` zeros for integer ones.
      *primals, argnums, key, num_directions, exhaustive, rtol, atol: as for :func:`verify_vjp`.

    Returns:
      A :class:`~handbackprop.GradientReport` (``title`` ``"jvp check"``) with a row per block
      and a row per output leaf for the primal output.

    Example:
      >>> import jax.numpy as jnp, handbackprop as hbp
      >>> f = lambda x: jnp.sin(x) * x
      >>> rule = lambda p, t: (f(*p), (jnp.cos(p[0]) * p[0] + jnp.sin(p[0])) * t[0])
      >>> hbp.verify_jvp(f, rule, jnp.linspace(0.0, 1.0, 4)).ok
      True
    """
    _check_directions(num_directions)
    argnums = _check_argnums(primals, argnums)
    primals, note = _upcast(primals, argnums, f)
    key = jax.random.key(0) if key is None else key

    def tangents(diff_t):
        it = iter(diff_t)
        return tuple(next(it) if i in argnums else jax.tree.map(_zero_tangent, p) for i, p in enumerate(primals))

    def vjp_fn(p, u):
        diff = tuple(jax.tree.map(jnp.zeros_like, p[i]) for i in argnums)
        return jax.vjp(lambda *t: jvp_fn(tuple(p), tangents(t))[1], *diff)[1](u)

    report = _blocks(f, vjp_fn, primals, argnums, key=key, num_directions=num_directions, exhaustive=exhaustive,
                     rtol=rtol, atol=atol, autodiff=True, notes=(note,) if note else (), title="jvp check")
    zeros = tuple(jax.tree.map(jnp.zeros_like, primals[i]) for i in argnums)
    primal_out, tangent_out = jvp_fn(tuple(primals), tangents(zeros))
    want = f(*primals)
    rows = _value_rows("jvp_fn's primal output", primal_out, want)
    # The transpose above sees only the linear part: a tangent that is not 0 at 0 is an error too.
    rows += [_compare_row(f"{name} (jvp_fn's tangent of zero tangents)", t, np.zeros(np.shape(t)),
                          float(jnp.finfo(jnp.result_type(w)).tiny))
             for name, t, w in zip(_names("out", want), jax.tree.leaves(tangent_out), jax.tree.leaves(want))]
    return dataclasses.replace(report, leaves=report.leaves + tuple(rows), tolerances=report.tolerances + (
        f"primal output rows: jvp_fn's against f's, |yours - f| <= {error_model.AUTODIFF_ULPS} u max|f| "
        "(column 'autodiff' holds f's value); tangent of zero tangents: exactly 0",))


def _zero_tangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _cast_like(primals, argnums):
    """Cast a rule's cotangents to the (upcast) primals' dtypes."""
    def cast(cts):
        if not isinstance(cts, (tuple, list)) or len(cts) != len(argnums):
            return cts
        return tuple(jax.tree.map(lambda c, p: jnp.asarray(c, jnp.result_type(p)), c, primals[i])
                     if jax.tree.structure(c) == jax.tree.structure(primals[i]) else c
                     for c, i in zip(cts, argnums))
    return cast


def _check_directions(num_directions):
    if isinstance(num_directions, bool) or not (isinstance(num_directions, int) and num_directions >= 1):
        raise ValueError(f"num_directions: expected an int >= 1, got {num_directions!r}")


def _custom(f):
    """The ``jax.custom_vjp`` or ``jax.custom_jvp`` object behind ``f`` (through ``jax.jit``
    and ``functools.wraps`` wrappers), or ``None``."""
    seen = 0
    while f is not None and seen < 16:
        if isinstance(f, (jax.custom_vjp, jax.custom_jvp)):
            return f
        f, seen = getattr(f, "__wrapped__", None), seen + 1
    return None


def verify_rule(f, *primals, argnums=None, reference=None, order=1, key=None, num_directions=8,
                exhaustive=None, rtol=None, atol=None) -> GradientReport:
    """Check the derivative JAX uses for ``f`` (its ``custom_vjp`` / ``custom_jvp`` rule, if any)
    against finite differences of ``f``'s primal computation and autodiff of its undecorated
    primal (``f.fun``) where that is differentiable.

    For a ``custom_vjp``, the forward rule's primal output is also compared with ``f``'s.
    Without a custom rule, JAX's own derivative of ``f`` is checked against finite differences.

    Args:
      f: a JAX function, typically decorated with ``jax.custom_vjp`` or ``jax.custom_jvp``
        (possibly under ``jax.jit``), returning a pytree of floating arrays.
      *primals, argnums, key, num_directions, exhaustive, rtol, atol: as for :func:`verify_vjp`.
      reference: a function of the same signature, typically plain ``jnp``: then ``f``'s output
        and VJP (and a custom_vjp's forward output) are compared with the reference's evaluated
        in float64 (float32 without x64), allowing twice the error the reference itself makes
        in ``f``'s dtype plus one unit in the last place of the largest entry: the mode for
        bfloat16 and float16 kernels. Without it, low-precision primals are upcast (float64
        with x64, else float32) and the report says so.
      order: 1, or 2 to check also the VJP's own derivative (the VJP differentiated again)
        against finite differences of the VJP.

    Returns:
      A :class:`~handbackprop.GradientReport` (``title`` ``"rule check"``).

    Example:
      >>> import jax, jax.numpy as jnp, handbackprop as hbp
      >>> @jax.custom_vjp
      ... def square(x):
      ...     return x * x
      >>> square.defvjp(lambda x: (x * x, x), lambda x, g: (2 * x * g,))
      >>> hbp.verify_rule(square, jnp.linspace(-1.0, 1.0, 5)).ok
      True
      >>> square.defvjp(lambda x: (x * x, x), lambda x, g: (x * g,))  # forgot the 2
      >>> hbp.verify_rule(square, jnp.linspace(-1.0, 1.0, 5)).ok
      False
    """
    _check_directions(num_directions)
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order: expected 1 or 2, got {order!r}")
    if reference is not None and not callable(reference):
        raise TypeError(f"reference: expected a function of f's signature, got {reference!r}")
    argnums = _check_argnums(primals, argnums)
    key = jax.random.key(0) if key is None else key
    if reference is not None:
        return _against_reference(f, reference, primals, argnums, key)
    primals, note = _upcast(primals, argnums, f)
    notes = (note,) if note else ()
    custom = _custom(f)
    primal_fn = custom.fun if custom is not None else f
    if custom is None:
        notes += ("f has no custom rule: JAX's own derivative of f is checked, by finite differences",)

    report = _blocks(primal_fn, _jax_vjp(f, argnums), primals, argnums, key=key, num_directions=num_directions,
                     exhaustive=exhaustive, rtol=rtol, atol=atol, autodiff="where finite" if custom else False,
                     notes=notes, title="rule check")
    rows = []
    if isinstance(custom, jax.custom_vjp):
        rows = _value_rows("forward rule's output", custom.fwd(*primals)[0], primal_fn(*primals))
    if order == 2:
        out = _check_output(f, primals)
        u = jax.tree.unflatten(jax.tree.structure(out), [
            np.asarray(fd.normal_draws(jax.random.fold_in(key, 1 << 30), o.shape)).astype(o.dtype)
            for o in jax.tree.leaves(out)])
        second = _VJPOf(f, argnums)
        hessian = _blocks(second, _jax_vjp(second, argnums), (*primals, u), argnums,
                          key=jax.random.fold_in(key, (1 << 30) + 1), num_directions=num_directions,
                          exhaustive=exhaustive, rtol=rtol, atol=atol, autodiff=False, title="rule check")
        rows += [dataclasses.replace(r, name=f"order 2: {r.name}") for r in hessian.leaves]
        report = dataclasses.replace(report, evaluations=report.evaluations + hessian.evaluations)
    return dataclasses.replace(report, leaves=report.leaves + tuple(rows))



def _ulp(scale, dtype):
    """One unit in the last place of ``scale`` in ``dtype`` (its smallest normal for 0)."""
    info = jnp.finfo(dtype)
    return float(info.eps) * 2.0 ** math.floor(math.log2(scale)) if scale > 0 else float(info.tiny)


def _reference_row(name, got, ref_hi, ref_lo, dtype):
    """``got`` against the wide reference, allowing 2 x the narrow reference's own error plus
    one ulp of the largest entry, in ``dtype``."""
    hi = np.asarray(ref_hi, np.float64)
    own = float(np.max(np.abs(np.asarray(ref_lo, np.float64) - hi), initial=0.0))
    tol = 2 * own + _ulp(float(np.max(np.abs(hi), initial=0.0)), dtype)
    return _compare_row(name, got, hi, tol)


def _against_reference(f, reference, primals, argnums, key):
    """``verify_rule(reference=...)``: f's output, forward rule and VJP against the reference's."""
    wide = jax.dtypes.canonicalize_dtype(jnp.float64)
    hi = [jax.tree.map(lambda x: jnp.asarray(x, wide), p) if i in argnums else p for i, p in enumerate(primals)]
    out = _check_output(f, primals)
    out_leaves, out_tree = jax.tree.leaves(out), jax.tree.structure(out)
    out_names = _names("out", out)
    values = [("output", f(*primals))]
    custom = _custom(f)
    if isinstance(custom, jax.custom_vjp):
        values.append(("forward rule's output", custom.fwd(*primals)[0]))
    rows = []
    ref_hi, ref_lo = reference(*hi), reference(*primals)
    ref_dtypes = [jnp.result_type(r) for r in jax.tree.leaves(ref_hi)]  # what the reference computes in
    for label, got in values:
        for name, g, h, lo, o in zip(out_names, jax.tree.leaves(got), jax.tree.leaves(ref_hi),
                                     jax.tree.leaves(ref_lo), out_leaves):
            rows.append(_reference_row(f"{name} ({label})", g, h, lo, o.dtype))

    def vjp_of(fn, p, u):  # u: cotangent leaves, cast to what fn outputs
        diff, fixed = _split(argnums, p)
        out, pull = jax.vjp(lambda *d: fn(*_merge(argnums, d, fixed)), *diff)
        return pull(jax.tree.unflatten(out_tree, [np.asarray(c, np.float64).astype(o.dtype)
                                                  for c, o in zip(u, jax.tree.leaves(out))]))

    in_names = [n for i in argnums for n in _names(f"arg{i}", primals[i])]
    in_dtypes = [jnp.result_type(x) for i in argnums for x in jax.tree.leaves(primals[i])]
    for j, out_name in enumerate(out_names):
        u = _cotangent(jax.random.fold_in(key, j), out_leaves, j)  # representable in f's dtype
        got = jax.tree.leaves(vjp_of(f, primals, u))
        want_hi = jax.tree.leaves(vjp_of(reference, hi, u))
        want_lo = jax.tree.leaves(vjp_of(reference, primals, u))
        for name, g, h, lo, dtype in zip(in_names, got, want_hi, want_lo, in_dtypes):
            rows.append(_reference_row(f"{name} -> {out_name}", g, h, lo, dtype))
    note = (f"reference mode: f in {', '.join(sorted({str(o.dtype) for o in out_leaves}))} against the "
            f"reference in {', '.join(sorted({str(d) for d in ref_dtypes}))}")
    tolerances = (f"|yours - reference({jnp.dtype(wide).name})| <= 2 max|reference(f's dtype) - "
                  f"reference({jnp.dtype(wide).name})| + ulp(max|reference|) in f's dtype, per output "
                  "leaf and per (input leaf, output leaf) block of the VJP (column 'autodiff' holds the "
                  "reference's value); u a standard normal cotangent confined to the block's output leaf",)
    n = sum(int(np.size(x)) for i in argnums for x in jax.tree.leaves(primals[i]))
    return GradientReport(tuple(rows), num_params=n, tolerances=tolerances, title="rule check", notes=(note,))
