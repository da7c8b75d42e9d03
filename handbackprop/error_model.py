"""The verifier's numbers: one engine that checks a gradient of a scalar function, leaf by leaf,
against ``jax.grad`` and finite differences, with the error model of each comparison.

The gradient checks (:mod:`handbackprop.verify`) and the rule checks (:mod:`handbackprop.rules`)
all call :func:`check_leaves`; a rule is checked through scalars ``<u, f(x)>``.

Each leaf of the parameter pytree gets three comparisons; each passes when error / tolerance <= 1.

1. **Autodiff.** Your gradient and ``jax.grad`` compute the same sums in other orders, so they
   differ by round-off only, which is u times the size of the summed terms:
   ``|yours_i - autodiff_i| <= atol + rtol max(max_j |autodiff_j|, σ_g / u)`` over the leaf, with
   ``rtol = 64 u`` (u the machine epsilon of the leaf's or the loss's dtype, the coarser). Where
   the terms cancel (a bias summed over a batch), the result understates their size; ``σ_g``,
   ``jax.grad``'s own round-off measured from its fourth differences at 8 points within
   ``u^(2/3)`` of θ (as for f below, per entry), restores it. An entry at a kink, where the
   gradient jumps within that distance, gets an O(1) σ_g: its convention (relu'(0)) is not judged.
   This catches any error above about 1e-5 relative in float32, 1e-14 in float64.
2. **Directions** (the dot-product test, O(directions) evaluations at any size): along random
   directions v confined to the leaf, ``<yours, v>`` against the central difference
   ``D(h) = (f(θ + hv) - f(θ - hv)) / 2h``, ``h = cbrt(u)``, ``v_i = z_i max(1, |θ_i|) / sqrt(n)``
   (z standard normal, n the leaf's size: a step about as long as one coordinate's).
3. **Coordinates** (exhaustive, 4 evaluations per parameter): ``yours_i`` against ``D(h_i)`` with
   ``h_i = cbrt(u) max(1, |θ_i|)``, on by default up to :data:`EXHAUSTIVE_MAX` parameters.

Finite-difference tolerances follow the error model of ``D(h)``, every term estimated from the
evaluations, never a constant scaled by size. With ``φ(t) = f(θ + t v)``:

- truncation, ``h^2 φ''' / 6``: Richardson's estimate ``D(2h) - D(h) = 3 h^2 φ'''/6 + O(h^4)``;
  the tolerance allows ``2 |D(2h) - D(h)|``, twice the estimate, six times the term.
- round-off, ``(e(h) - e(-h)) / 2h`` for evaluation errors e of standard deviation σ: σ is
  estimated per leaf from fourth differences of f along the random directions at a tiny step
  ``δ = cbrt(u) h`` (Moré and Wild's ECnoise: ``Δ^4 φ = δ^4 φ'''' + noise of sd sqrt(70) σ``, the
  first term negligible and kinks rare at that step, so ``σ = median|Δ^4| / (0.6745 sqrt 70)``),
  and at least the final rounding ``u |f| / 2``; the tolerance allows ``8 σ / h``, about 11
  standard deviations of ``D(h)``'s round-off.
- kinks (ReLU): a kink within ``±h`` puts ``D(h)`` off by up to the jump in slope, and shows in
  ``K = |Δ^4 φ| / 2h`` (~0 for a smooth φ); the tolerance adds K, which with the Richardson term
  covers a single kink anywhere in the stencil. Where K exceeds 8 standard deviations of its
  round-off (``8 sqrt(70) σ / 2h``), f is not smooth at the step's scale (a kink, or curvature
  the step does not resolve): such coordinates and directions are counted as unreliable and
  skipped, never failed; the autodiff comparison still covers them.
- directions add the dot product's own rounding, ``8 sqrt(n) u_acc sum_i |g_i e_i|`` (Higham and
  Mary's probabilistic bound, u_acc that of float64 when x64 is on).
"""


import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from handbackprop import finite_diff as fd
from handbackprop.report import GradientReport, LeafReport

AUTODIFF_ULPS = 64  # default rtol = AUTODIFF_ULPS * u
SDS = 8  # standard deviations allowed for round-off and for the kink test
EXHAUSTIVE_MAX = 4096  # default: the coordinate-wise check up to this many parameters
COORD_OFFSETS = (-2, -1, 1, 2)
PROBE_OFFSETS = (-4, -3, -2, -1, 1, 2, 3, 4)  # in units of δ = cbrt(u) h, for σ
_DELTA4 = np.array([1.0, -4.0, 6.0, -4.0, 1.0])
_MEDIAN_ABS_NORMAL = 0.6745  # median |z| of a standard normal z


class Coordinates(NamedTuple):
    """f at θ + k h_i e_i for every coordinate i, k in ``COORD_OFFSETS``, and the steps taken."""

    values: np.ndarray  # (n, 4)
    taken: np.ndarray  # (n, 4)


class Evaluations(NamedTuple):
    """Every evaluation one check needs, from one compiled program (:func:`_evaluate`)."""

    f0: jax.Array  # f at θ
    autodiff: object  # jax.grad of f at θ (a pytree like θ), or None without that oracle
    lines: tuple  # (values, dots, absdots) of fd.line_values
    coords: tuple | None  # (values, taken) of fd.coordinate_values, or None
    probe: object  # jax.grad at θ + k δ v, k = ±1..±4 (leading axis 8), or None


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 8, 9))
def _evaluate(loss_fn, params, args, num_directions, offsets, rel, zs, yours, exhaustive, autodiff):
    """Every evaluation a check needs, in one compiled program."""
    if autodiff:
        f0, auto = jax.value_and_grad(loss_fn)(params, *args)
    else:
        f0, auto = loss_fn(params, *args), None
    grads = (yours, auto) if autodiff else (yours,)
    lines = fd.line_values(loss_fn, params, args, num_directions, offsets, rel, zs, grads)
    coords = fd.coordinate_values(loss_fn, params, args, COORD_OFFSETS, rel) if exhaustive else None
    probe = None
    if autodiff:  # jax.grad at θ + k δ v, k = ±1..±4 (δ ~ u^(2/3), as line_values's probe), for
        # the autodiff gradient's own round-off (see _noise).
        ks = jnp.asarray(offsets[len(COORD_OFFSETS):]) * jnp.min(jnp.asarray(jax.tree.leaves(rel)))
        z = ravel_pytree(params)[1](zs[0])
        v = jax.tree.map(lambda p, z: (z * jnp.maximum(1, jnp.abs(p)) / math.sqrt(p.size)).astype(p.dtype),
                         params, z)
        probe = jax.vmap(lambda k: jax.grad(loss_fn)(jax.tree.map(lambda p, d: p + k * d, params, v), *args))(ks)
    return Evaluations(f0, auto, lines, coords, probe)


def check_leaves(loss_fn, yours, params, args, *, key, num_directions, exhaustive, rtol, atol,
                 autodiff=True, names=None) -> GradientReport:
    """The engine: ``yours``, a gradient of ``loss_fn`` at ``params``, checked leaf by leaf.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``; static under ``jax.jit`` (equal objects
        share the compiled checks).
      yours: the gradient under test, a pytree like ``params`` (any leaf may be wrong in shape,
        dtype or finiteness: its row says so).
      params: a pytree of floating ``jax.Array`` leaves (see ``fd.as_params``).
      args: a tuple of further arguments of ``loss_fn``, held fixed.
      key, num_directions, exhaustive, rtol, atol: as for :func:`~handbackprop.verify_gradient`
        (``exhaustive`` ``None`` for the default).
      autodiff: ``True``: compare with ``jax.grad(loss_fn)`` entry by entry, which must be finite;
        ``"where finite"``: the same, leaf by leaf where ``jax.grad`` is finite (elsewhere, as at
        a kink of the primal, finite differences alone judge); ``False``: no autodiff oracle.
      names: one name per leaf; default the leaves' paths.

    Returns:
      A :class:`GradientReport`.

    Raises:
      ValueError: for a loss that is not finite at ``params``.
    """
    out = jax.eval_shape(loss_fn, params, *args)
    leaves = jax.tree.leaves(params)
    names = names or [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    problems = [_problem(y, p) for y, p in zip(jax.tree.leaves(yours), leaves)]
    # A leaf that is no gradient (wrong shape, dtype) takes part as zeros; its row says why.
    safe = jax.tree.unflatten(jax.tree.structure(params), [
        jnp.zeros_like(p) if prob else jnp.asarray(y, p.dtype)
        for y, p, prob in zip(jax.tree.leaves(yours), leaves, problems)])
    n = sum(p.size for p in leaves)
    exhaustive = n <= EXHAUSTIVE_MAX if exhaustive is None else bool(exhaustive)
    rel = fd.relative_steps(params, out.dtype)
    delta = min(jax.tree.leaves(rel))  # the noise probe's step, δ = cbrt(u) h ~ u^(2/3)
    offsets = COORD_OFFSETS + tuple(k * delta for k in PROBE_OFFSETS)
    ev = _evaluate(loss_fn, params, args, num_directions, offsets, rel,
                   fd.normal_draws(key, (num_directions, n)), safe, exhaustive, bool(autodiff))
    if not np.isfinite(ev.f0):
        raise ValueError(f"loss_fn: the loss at params is {float(ev.f0)}, expected a finite number")
    f0 = float(ev.f0)
    values, dots, absdots = (np.asarray(a, np.float64) for a in ev.lines)
    stencils, probes = (np.insert(a, a.shape[1] // 2, f0, axis=1) for a in np.split(values, [4], axis=1))
    if exhaustive:
        coord_values, taken = (np.asarray(a, np.float64) for a in ev.coords)
        starts = np.cumsum([0] + [p.size for p in leaves])
    u_acc = float(jnp.finfo(jax.dtypes.canonicalize_dtype(jnp.float64)).eps)
    autos = jax.tree.leaves(ev.autodiff) if autodiff else [None] * len(leaves)
    probe_leaves = jax.tree.leaves(ev.probe) if autodiff else [None] * len(leaves)
    reports = []
    for i, (name, p, y, a, g8, r, prob) in enumerate(zip(names, leaves, jax.tree.leaves(safe), autos,
                                                         probe_leaves, jax.tree.leaves(rel), problems)):
        u = fd.unit_roundoff(p.dtype, out.dtype)
        block = slice(i * num_directions, (i + 1) * num_directions)
        sigma = _noise(probes[block], u * abs(f0) / 2)
        if a is not None:
            a = np.asarray(a, np.float64)
        if a is not None and not np.isfinite(a).all():
            if autodiff is True and prob is None:
                prob = "jax.grad of loss_fn is not finite here"
            a = None  # "where finite": finite differences alone judge this leaf
        terms = np.zeros(p.shape)
        if a is not None:
            g9 = np.insert(np.asarray(g8, np.float64).reshape(len(PROBE_OFFSETS), -1),
                           len(PROBE_OFFSETS) // 2, a.ravel(), axis=0)
            terms = _noise(g9.T, 0.0, per_row=True).reshape(p.shape) / u
        coords = (Coordinates(coord_values[starts[i]:starts[i + 1]], taken[starts[i]:starts[i + 1]])
                  if exhaustive else None)
        lines = Directions(stencils[block], dots[block], absdots[block], r, math.sqrt(p.size) * u_acc)
        reports.append(_leaf_report(
            name, p, np.asarray(y, np.float64), a, prob, f0, sigma, terms,
            rtol=AUTODIFF_ULPS * u if rtol is None else rtol,
            atol=float(jnp.finfo(p.dtype).tiny) if atol is None else atol, lines=lines, coords=coords))
    evaluations = 1 + len(offsets) * num_directions * len(leaves) + exhaustive * len(COORD_OFFSETS) * n
    return GradientReport(tuple(reports), loss=f0, num_params=n, evaluations=evaluations,
                          num_directions=num_directions, exhaustive=exhaustive,
                          tolerances=tolerance_notes(leaves, out.dtype, rtol, atol))


def _problem(y, p):
    """Why ``y`` cannot stand as the gradient of parameter ``p``, or ``None``."""
    shape, dtype = tuple(np.shape(y)), jnp.result_type(y)
    if shape != p.shape:
        return f"shape {shape}, expected {p.shape}"
    if dtype != p.dtype:
        return f"dtype {dtype}, expected {p.dtype}"
    bad = ~np.isfinite(np.asarray(y, np.float64))
    if bad.any():
        return f"{int(bad.sum())} non-finite entries, first at {_index(np.argmax(bad), shape)}"
    return None


def _index(flat_index, shape):
    return tuple(int(i) for i in np.unravel_index(int(flat_index), shape))


def _noise(v9, floor, per_row=False):
    """Round-off σ from values at -4δ..4δ (rows): their fourth differences are noise alone
    (ECnoise). Pooled: the median over all windows; ``per_row``: each row's RMS."""
    d4 = np.stack([v9[:, j:j + 5] @ _DELTA4 for j in range(v9.shape[1] - 4)], axis=1)
    if per_row:
        return np.sqrt(np.mean(d4**2, axis=1)) / math.sqrt(70)
    d4 = d4[np.isfinite(d4)]
    est = np.median(np.abs(d4)) / (_MEDIAN_ABS_NORMAL * math.sqrt(70)) if d4.size else 0.0
    return max(float(est), floor)


def _stencil(v, t):
    """From f at five points t (centre 0) per row: D(h), |D(2h) - D(h)|, K = |Δ^4| / 2h, h."""
    h = (t[:, 3] - t[:, 1]) / 2
    d1 = (v[:, 3] - v[:, 1]) / (t[:, 3] - t[:, 1])
    d2 = (v[:, 4] - v[:, 0]) / (t[:, 4] - t[:, 0])
    dd = v
    for j in range(1, 5):  # the fourth divided difference, exact for cubics at any spacing
        dd = (dd[:, 1:] - dd[:, :-1]) / (t[:, j:] - t[:, :-j])
    return d1, np.abs(d2 - d1), 12 * h**3 * np.abs(dd[:, 0]), h


def _fd_check(yours, v, t, sigma, extra=0.0):
    """Ratios |yours - D(h)| / tol per row, NaN where unreliable; and D(h), tol."""
    with np.errstate(all="ignore"):
        d1, trunc, kink, h = _stencil(v, t)
        noise = sigma / np.abs(h)
        tol = 2 * trunc + kink + SDS * noise + extra
        ratio = np.abs(yours - d1) / tol
        reliable = np.isfinite(ratio) & (kink <= SDS * math.sqrt(70) / 2 * noise)
    return np.where(reliable, ratio, np.nan), d1, tol


class Directions(NamedTuple):
    """One leaf's random directions: f at -2h..2h along each, and the gradients dotted with it."""

    stencils: np.ndarray  # (D, 5): f at -2h, -h, 0, h, 2h
    dots: np.ndarray  # (D, G): <yours, e>, then <autodiff, e> when there is that oracle
    absdots: np.ndarray  # (D, G): sum_i |g_i e_i|, the size of the dot product's terms
    step: float  # h, the leaf's relative step
    dot_unit: float  # sqrt(n) u_acc: the dot product's rounding per unit of absdots


def _leaf_report(name, p, y, a, problem, f0, sigma, terms, rtol, atol, lines: Directions, coords):
    """One leaf's :class:`LeafReport`; ``a`` is ``None`` where there is no autodiff oracle."""
    base = dict(name=name, shape=tuple(p.shape), dtype=str(p.dtype), noise=sigma,
                term_scale=float(np.nanmax(terms, initial=0.0)))
    if problem is not None:
        return LeafReport(problem=problem, **base)
    fields = {}
    if a is not None:
        err = np.abs(y - a).ravel()
        scale = float(np.max(np.abs(a), initial=0.0))
        tol = (atol + rtol * np.fmax(scale, terms)).ravel()
        worst = ad_ratio = np.where(err == 0, 0.0, err / tol)
        fields.update(max_abs_error=float(err.max(initial=0.0)),
                      max_rel_error=float(err.max(initial=0.0) / scale) if scale else float(err.max(initial=0.0)),
                      autodiff_ratio=float(ad_ratio.max(initial=0.0)))
    else:
        worst = np.zeros(p.size)
        fields.update(autodiff_ratio=None)
    t5 = np.broadcast_to(np.arange(-2, 3) * lines.step, lines.stencils.shape)
    dir_ratio, dir_fd, dir_tol = _fd_check(lines.dots[:, 0], lines.stencils, t5, sigma,
                                           SDS * lines.dot_unit * lines.absdots[:, 0])
    if np.isfinite(dir_ratio).any():
        m = int(np.nanargmax(dir_ratio))
        fields["worst_direction"] = dict(yours=lines.dots[m, 0], finite_diff=dir_fd[m], tol=dir_tol[m],
                                         autodiff=lines.dots[m, 1] if a is not None else None)
    fields.update(directions_ratio=_nanmax(dir_ratio), directions_unreliable=int(np.isnan(dir_ratio).sum()))
    fd_at = None
    if coords is not None:
        v5 = np.insert(coords.values, 2, f0, axis=1)
        t5 = np.insert(coords.taken, 2, 0.0, axis=1)
        c_ratio, fd_at, _ = _fd_check(y.ravel(), v5, t5, sigma)
        fields.update(coords_ratio=_nanmax(c_ratio), coords_unreliable=int(np.isnan(c_ratio).sum()))
        worst = np.fmax(worst, c_ratio)
    if worst.size and (a is not None or coords is not None):
        k = int(np.argmax(worst))
        fields.update(index=_index(k, p.shape), yours=float(y.ravel()[k]),
                      autodiff=None if a is None else float(a.ravel()[k]),
                      autodiff_tol=None if a is None else float(tol[k]),
                      finite_diff=None if fd_at is None else float(fd_at[k]))
    return LeafReport(**fields, **base)


def _nanmax(a):
    return float(np.nanmax(a)) if np.isfinite(a).any() else None


def tolerance_notes(leaves, out_dtype, rtol, atol):
    us = sorted({fd.unit_roundoff(p.dtype, out_dtype) for p in leaves})
    u_text = ", ".join(f"{u:.3g}" for u in us)
    ad = (f"rtol = {rtol:.3g}" if rtol is not None else f"rtol = {AUTODIFF_ULPS} u") + (
        f", atol = {atol:.3g}" if atol is not None else ", atol = smallest normal")
    return (
        f"u = machine epsilon of the parameter's or the loss's dtype (coarser): {u_text}",
        f"yours vs jax.grad: |yours - autodiff| <= atol + rtol max(max|autodiff|, σ_g/u) over the leaf, "
        f"{ad}: the same sums in another order differ by round-off only; σ_g/u, the size of the "
        "summed terms where they cancel, from jax.grad's own round-off σ_g (fourth differences of "
        "jax.grad at 8 points within u^(2/3))",
        "yours vs finite differences D(h), h = cbrt(u) max(1, |θ|) (along a direction: h = cbrt(u), "
        "v_i = z_i max(1, |θ_i|) / sqrt(leaf size)): tol = 2|D(2h) - D(h)| (truncation, Richardson) + |Δ⁴f|/2h "
        f"(kinks) + {SDS}σ/h (round-off; σ from fourth differences of f, at least u|f|/2)",
        f"steps with |Δ⁴f|/2h > {SDS} sqrt(70)σ/2h: f is not smooth at the step's scale (a kink): "
        "skipped as unreliable, not failed",
    )


