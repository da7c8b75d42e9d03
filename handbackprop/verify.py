"""Gradient verification: any gradient against ``jax.grad`` and finite differences, leaf by leaf.

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

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from handbackprop import finite_diff as fd
from handbackprop.backprop import backprop, deltas
from handbackprop.backprop import loss as net_loss
from handbackprop.mlp import MLP, check_y, forward_cache

AUTODIFF_ULPS = 64  # default rtol = AUTODIFF_ULPS * u
SDS = 8  # standard deviations allowed for round-off and for the kink test
EXHAUSTIVE_MAX = 4096  # default: the coordinate-wise check up to this many parameters
COORD_OFFSETS = (-2, -1, 1, 2)
PROBE_OFFSETS = (-4, -3, -2, -1, 1, 2, 3, 4)  # in units of δ = cbrt(u) h, for σ
_DELTA4 = np.array([1.0, -4.0, 6.0, -4.0, 1.0])
_MEDIAN_ABS_NORMAL = 0.6745  # median |z| of a standard normal z


@dataclasses.dataclass(frozen=True)
class LeafReport:
    """One leaf's comparisons. Ratios are error / tolerance: at most 1 passes.

    Attributes:
      name: the leaf's path, e.g. ``[0]['w']`` (``layer 1 w`` from :func:`check_backprop`).
      shape, dtype: the parameter's.
      max_abs_error: ``max |yours - autodiff|``.
      max_rel_error: ``max_abs_error / max |autodiff|``, relative to the leaf's scale.
      index: the worst entry (largest ratio of any check), or ``None``.
      yours, autodiff, finite_diff: the three values there (``finite_diff`` only when exhaustive).
      autodiff_ratio: ``max |yours - autodiff| / autodiff_tol``.
      autodiff_tol: at ``index``, ``atol + rtol max(max |autodiff|, σ_g / u)``, σ_g that entry's.
      coords_ratio: the worst ratio over reliable coordinates, ``None`` unless exhaustive.
      coords_unreliable: coordinates where f is not smooth at the step's scale (skipped).
      directions_ratio: the worst ratio over reliable directions (``None`` if none was reliable).
      directions_unreliable: directions where f is not smooth at the step's scale (skipped).
      worst_direction: ``{"yours", "autodiff", "finite_diff", "tol"}`` for the worst direction.
      noise: σ, the estimated standard deviation of the loss's round-off near θ.
      term_scale: the largest ``σ_g / u``: the size of the terms summed into a gradient entry,
        from the round-off σ_g of ``jax.grad`` itself (large where the sums cancel).
      problem: why the leaf could not be compared (shape, dtype, non-finite values), or ``None``.
    """

    name: str
    shape: tuple
    dtype: str
    max_abs_error: float = math.nan
    max_rel_error: float = math.nan
    index: tuple | None = None
    yours: float | None = None
    autodiff: float | None = None
    finite_diff: float | None = None
    autodiff_ratio: float = math.nan
    autodiff_tol: float = math.nan
    coords_ratio: float | None = None
    coords_unreliable: int = 0
    directions_ratio: float | None = None
    directions_unreliable: int = 0
    worst_direction: dict | None = None
    noise: float = math.nan
    term_scale: float = math.nan
    problem: str | None = None

    @property
    def ok(self) -> bool:
        ratios = (self.autodiff_ratio, self.coords_ratio, self.directions_ratio)
        return self.problem is None and all(r is None or r <= 1 for r in ratios)


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One layer's delta against ``jax.grad`` with respect to ``S^(l)`` (:func:`check_backprop`).

    Attributes:
      layer: l, 1-based.
      activation: g_l's name.
      delta_error: ``max |delta_hand - delta_autodiff|`` over the batch.
      delta_ratio: that over ``rtol max |delta_autodiff|`` (+ atol).
      deriv_error: ``max |g'_hand(S) - g'_jax(S)|``, ``None`` for softmax (not elementwise).
      deriv_ratio: that over ``rtol max |g'_jax(S)|`` (+ atol).
      diagnosis: ``"ok"`` or where the fault is.
    """

    layer: int
    activation: str
    delta_error: float
    delta_ratio: float
    deriv_error: float | None
    deriv_ratio: float | None
    diagnosis: str = "ok"

    @property
    def ok(self) -> bool:
        return self.delta_ratio <= 1 and (self.deriv_ratio is None or self.deriv_ratio <= 1)


@dataclasses.dataclass(frozen=True)
class GradientReport:
    """The result of :func:`verify_gradient` or :func:`check_backprop`.

    ``str(report)`` is a table, ``report.to_dict()`` JSON-ready, ``report.ok`` the verdict.

    Attributes:
      leaves: one :class:`LeafReport` per leaf, in ``jax.tree.leaves`` order.
      layers: one :class:`LayerReport` per layer (``check_backprop`` only).
      loss: the loss at ``params``.
      num_params: n, the number of parameters.
      evaluations: loss evaluations spent on finite differences.
      num_directions: random directions per leaf.
      exhaustive: whether every coordinate was checked.
      tolerances: how each tolerance was set, one line per check.
    """

    leaves: tuple
    layers: tuple = ()
    loss: float = math.nan
    num_params: int = 0
    evaluations: int = 0
    num_directions: int = 0
    exhaustive: bool = False
    tolerances: tuple = ()

    @property
    def ok(self) -> bool:
        return all(leaf.ok for leaf in self.leaves) and all(layer.ok for layer in self.layers)

    def to_dict(self) -> dict:
        """Everything in the report as JSON-ready Python values (non-finite floats as strings)."""
        out = dataclasses.asdict(self)
        out["ok"] = self.ok
        for rows, src in ((out["leaves"], self.leaves), (out["layers"], self.layers)):
            for row, item in zip(rows, src):
                row["ok"] = item.ok
        return _jsonable(out)

    def raise_if_failed(self):
        """Raise ``AssertionError(str(self))`` unless the report passes."""
        if not self.ok:
            raise AssertionError(str(self))

    def __str__(self) -> str:
        head = (f"gradient check: {len(self.leaves)} leaves, {self.num_params} parameters, "
                f"loss {self.loss:.6g}; finite differences: {self.num_directions} directions "
                f"per leaf{' + every coordinate' if self.exhaustive else ''} "
                f"({self.evaluations} loss evaluations)")
        cols = ("leaf", "shape", "max abs err", "max rel err", "worst at", "yours", "autodiff",
                "finite diff", "/tol autodiff", "/tol coords", "/tol dirs", "status")
        rows = [_leaf_row(leaf) for leaf in self.leaves]
        parts = [head, _table(cols, rows)]
        if self.layers:
            cols = ("layer", "activation", "delta max err", "/tol", "g' max err", "/tol", "diagnosis")
            parts.append(_table(cols, [_layer_row(layer) for layer in self.layers]))
        parts.append("tolerances:\n" + "\n".join(f"  {t}" for t in self.tolerances))
        parts.append(_verdict(self))
        return "\n\n".join(parts)


def verify_gradient(loss_fn, grad_fn, params, *args, key=None, num_directions=8, exhaustive=None,
                    rtol=None, atol=None) -> GradientReport:
    """Check ``grad_fn`` against ``jax.grad(loss_fn)`` and against finite differences.

    Works for any scalar function of any pytree of floating arrays. The tolerances, and why,
    are in the module docstring and in ``report.tolerances``.

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
      exhaustive: check every coordinate (4n evaluations); default when n <= ``EXHAUSTIVE_MAX``.
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
    out = fd.check_scalar_output(loss_fn, params, args, "loss_fn")
    key = jax.random.key(0) if key is None else key
    yours = grad_fn(params, *args)
    if jax.tree.structure(yours) != jax.tree.structure(params):
        raise ValueError(f"grad_fn: returned a pytree of structure {jax.tree.structure(yours)}, "
                         f"expected that of params, {jax.tree.structure(params)}")
    leaves, paths = jax.tree.leaves(params), [jax.tree_util.keystr(p) for p, _ in
                                              jax.tree_util.tree_leaves_with_path(params)]
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
    f0, auto, (lines, dots, absdots), coords, probe = _evaluate(
        loss_fn, params, args, num_directions, offsets, rel,
        fd.normal_draws(key, (num_directions, n)), safe, exhaustive)
    if not np.isfinite(f0):
        raise ValueError(f"loss_fn: the loss at params is {float(f0)}, expected a finite number")
    f0 = float(f0)
    lines = np.asarray(lines, np.float64)
    stencils, probes = (np.insert(a, a.shape[1] // 2, f0, axis=1) for a in np.split(lines, [4], axis=1))
    dots, absdots = np.asarray(dots, np.float64), np.asarray(absdots, np.float64)
    if exhaustive:
        values, taken = (np.asarray(a, np.float64) for a in coords)
        starts = np.cumsum([0] + [p.size for p in leaves])
    u_acc = float(jnp.finfo(jax.dtypes.canonicalize_dtype(jnp.float64)).eps)
    reports = []
    for i, (path, p, y, a, r, prob) in enumerate(zip(paths, leaves, jax.tree.leaves(safe),
                                                     jax.tree.leaves(auto), jax.tree.leaves(rel),
                                                     problems)):
        u = fd.unit_roundoff(p.dtype, out.dtype)
        block = slice(i * num_directions, (i + 1) * num_directions)
        sigma = _noise(probes[block], u * abs(f0) / 2)
        g9 = np.insert(np.asarray(jax.tree.leaves(probe)[i], np.float64).reshape(len(PROBE_OFFSETS), -1),
                       len(PROBE_OFFSETS) // 2, np.asarray(a, np.float64).ravel(), axis=0)
        grad_noise = _noise(g9.T, 0.0, per_row=True).reshape(p.shape)
        leaf_coords = (values[starts[i]:starts[i + 1]], taken[starts[i]:starts[i + 1]]) if exhaustive else None
        reports.append(_leaf_report(
            path, p, np.asarray(y, np.float64), np.asarray(a, np.float64), prob, f0, sigma, grad_noise / u,
            rtol=AUTODIFF_ULPS * u if rtol is None else rtol,
            atol=float(jnp.finfo(p.dtype).tiny) if atol is None else atol,
            lines=(stencils[block], dots[block], absdots[block], r, math.sqrt(p.size) * u_acc), coords=leaf_coords))
    evaluations = 1 + len(offsets) * num_directions * len(leaves) + exhaustive * len(COORD_OFFSETS) * n
    return GradientReport(tuple(reports), loss=f0, num_params=n, evaluations=evaluations,
                          num_directions=num_directions, exhaustive=exhaustive,
                          tolerances=_tolerance_notes(leaves, out.dtype, rtol, atol))


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
    leaves = tuple(dataclasses.replace(leaf, name=_layer_name(leaf.name)) for leaf in report.leaves)
    u = fd.unit_roundoff(jnp.result_type(params[0]["w"]))
    rtol = AUTODIFF_ULPS * u if rtol is None else rtol
    atol = float(jnp.finfo(jnp.result_type(params[0]["w"])).tiny) if atol is None else atol
    layers = _layer_reports(net, _layer_values(net, params, x, y), rtol, atol)
    return dataclasses.replace(report, leaves=leaves, layers=layers)


# -- the numbers -----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _jit_backprop(net, params, x, y):
    return backprop(net, params, x, y)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 8))
def _evaluate(loss_fn, params, args, num_directions, offsets, rel, zs, yours, exhaustive):
    """Every evaluation a check needs, in one compiled program."""
    f0, auto = jax.value_and_grad(loss_fn)(params, *args)
    lines = fd.line_values(loss_fn, params, args, num_directions, offsets, rel, zs, (yours, auto))
    coords = fd.coordinate_values(loss_fn, params, args, COORD_OFFSETS, rel) if exhaustive else None
    # jax.grad at θ + k δ v, k = ±1..±4 (δ ~ u^(2/3), as line_values's probe), for the autodiff
    # gradient's own round-off (see _noise).
    ks = jnp.asarray(offsets[len(COORD_OFFSETS):]) * jnp.min(jnp.asarray(jax.tree.leaves(rel)))
    z = ravel_pytree(params)[1](zs[0])
    v = jax.tree.map(lambda p, z: (z * jnp.maximum(1, jnp.abs(p)) / math.sqrt(p.size)).astype(p.dtype), params, z)
    probe = jax.vmap(lambda k: jax.grad(loss_fn)(jax.tree.map(lambda p, d: p + k * d, params, v), *args))(ks)
    return f0, auto, lines, coords, probe


@dataclasses.dataclass(frozen=True)
class _NetLoss:
    """``net``'s loss as ``f(params, x, y)``; equal for equal networks, so that the jitted
    checks (static in the loss function) compile once per network, not once per call."""

    net: MLP

    def __call__(self, params, x, y):
        return net_loss(self.net, params, x, y)


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


def _leaf_report(name, p, y, a, problem, f0, sigma, terms, rtol, atol, lines, coords):
    base = dict(name=name, shape=tuple(p.shape), dtype=str(p.dtype), noise=sigma,
                term_scale=float(np.nanmax(terms, initial=0.0)))
    if problem is None and not np.isfinite(a).all():
        problem = "jax.grad of loss_fn is not finite here"
    if problem is not None:
        return LeafReport(problem=problem, **base)
    err = np.abs(y - a).ravel()
    scale = float(np.max(np.abs(a), initial=0.0))
    tol = (atol + rtol * np.fmax(scale, terms)).ravel()
    ad_ratio = np.where(err == 0, 0.0, err / tol)
    v5, dots, absdots, r, dot_unit = lines  # directions: f at -2h..2h
    t5 = np.broadcast_to(np.arange(-2, 3) * r, v5.shape)
    dir_ratio, dir_fd, dir_tol = _fd_check(dots[:, 0], v5, t5, sigma,
                                           SDS * dot_unit * absdots[:, 0])
    worst_dir = None
    if np.isfinite(dir_ratio).any():
        m = int(np.nanargmax(dir_ratio))
        worst_dir = dict(yours=dots[m, 0], autodiff=dots[m, 1], finite_diff=dir_fd[m], tol=dir_tol[m])
    fields = dict(directions_ratio=_nanmax(dir_ratio), directions_unreliable=int(np.isnan(dir_ratio).sum()),
                  worst_direction=worst_dir)
    worst = ad_ratio
    fd_at = None
    if coords is not None:
        values, taken = coords
        v5 = np.insert(values, 2, f0, axis=1)
        t5 = np.insert(taken, 2, 0.0, axis=1)
        c_ratio, fd_at, _ = _fd_check(y.ravel(), v5, t5, sigma)
        fields.update(coords_ratio=_nanmax(c_ratio), coords_unreliable=int(np.isnan(c_ratio).sum()))
        worst = np.fmax(ad_ratio, c_ratio)
    k = int(np.argmax(worst)) if worst.size else None
    return LeafReport(
        max_abs_error=float(err.max(initial=0.0)),
        max_rel_error=float(err.max(initial=0.0) / scale) if scale else float(err.max(initial=0.0)),
        index=None if k is None else _index(k, p.shape),
        yours=None if k is None else float(y.ravel()[k]),
        autodiff=None if k is None else float(a.ravel()[k]),
        finite_diff=None if k is None or fd_at is None else float(fd_at[k]),
        autodiff_ratio=float(ad_ratio.max(initial=0.0)), autodiff_tol=None if k is None else float(tol[k]),
        **fields, **base)


def _nanmax(a):
    return float(np.nanmax(a)) if np.isfinite(a).any() else None


# -- check_backprop's layers -----------------------------------------------------------------


def _continue(net, params, l, s, y):
    """The summed per-example losses as a function of ``S`` of layer l + 1 (0-based l)."""
    x = net.activations[l].fn(s)
    for layer, g in zip(params[l + 1:], net.activations[l + 1:]):
        s = x @ layer["w"]  # S^(k) = x^(k-1) W^(k) + b^(k), as in the forward pass
        if net.bias:
            s = s + layer["b"][None, :]
        x = g.fn(s)
    return jnp.sum(net.loss_fn.value(s, x, y))


@functools.partial(jax.jit, static_argnums=0)
def _layer_values(net, params, x, y):
    """Per layer: hand delta, autodiff delta, hand g'(S), jax's g'(S) (``None`` for softmax)."""
    cache = forward_cache(net, params, x)
    yy = check_y(net, cache.xs[0], y)
    hand = deltas(net, params, x, y)
    out = []
    for l, (g, s, xl) in enumerate(zip(net.activations, cache.ss, cache.xs[1:])):
        auto = jax.grad(functools.partial(_continue, net, params, l))(s, yy)
        if g.elementwise:
            derivs = g.derivative(s, xl), jax.jvp(g.fn, (s,), (jnp.ones_like(s),))[1]
        else:
            derivs = None, None
        out.append((hand[l], auto, *derivs))
    return out


def _ratio(hand, auto, rtol, atol):
    hand, auto = np.asarray(hand, np.float64), np.asarray(auto, np.float64)
    err = float(np.max(np.abs(hand - auto), initial=0.0))
    tol = atol + rtol * float(np.max(np.abs(auto), initial=0.0))
    return err, (0.0 if err == 0 else err / tol if np.isfinite(err) else math.inf)


def _layer_reports(net, values, rtol, atol):
    rows = []
    for l, (g, (hand, auto, dh, da)) in enumerate(zip(net.activations, values), start=1):
        d_err, d_ratio = _ratio(hand, auto, rtol, atol)
        g_err, g_ratio = _ratio(dh, da, rtol, atol) if dh is not None else (None, None)
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


def _layer_name(path):  # "[0]['w']" -> "layer 1 w"
    index, key = path[1:].split("]", 1)
    return f"layer {int(index) + 1} {key.strip(chr(39) + '[]')}"


# -- the text --------------------------------------------------------------------------------


def _tolerance_notes(leaves, out_dtype, rtol, atol):
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


def _fmt(x, spec=".3g"):
    if x is None:
        return "-"
    if isinstance(x, tuple):
        return str(x) if len(x) != 1 else f"({x[0]})"
    return format(x, spec)


def _leaf_row(leaf):
    status = "ok" if leaf.ok else "FAIL" + (f": {leaf.problem}" if leaf.problem else "")
    dirs = _fmt(leaf.directions_ratio, ".2g") + (
        f" ({leaf.directions_unreliable} skipped)" if leaf.directions_unreliable else "")
    coords = _fmt(leaf.coords_ratio, ".2g") + (
        f" ({leaf.coords_unreliable} skipped)" if leaf.coords_unreliable else "")
    return (leaf.name, str(leaf.shape), _fmt(leaf.max_abs_error, ".2e"), _fmt(leaf.max_rel_error, ".2e"),
            _fmt(leaf.index), _fmt(leaf.yours, "+.8e"), _fmt(leaf.autodiff, "+.8e"),
            _fmt(leaf.finite_diff, "+.8e"), _fmt(leaf.autodiff_ratio, ".2g"), coords, dirs, status)


def _layer_row(layer):
    return (str(layer.layer), layer.activation, _fmt(layer.delta_error, ".2e"),
            _fmt(layer.delta_ratio, ".2g"), _fmt(layer.deriv_error, ".2e"),
            _fmt(layer.deriv_ratio, ".2g"), layer.diagnosis)


def _table(cols, rows):
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths]), *map(line, rows)])


def _verdict(report):
    bad = [leaf for leaf in report.leaves if not leaf.ok]
    bad_layers = [layer for layer in report.layers if not layer.ok]
    if not bad and not bad_layers:
        return "PASS"
    lines = [f"FAIL: {len(bad)} of {len(report.leaves)} leaves" + (
        f", {len(bad_layers)} of {len(report.layers)} layers" if report.layers else "")]
    for leaf in bad:
        lines.append(f"  {leaf.name}: " + (leaf.problem or (
            f"worst at {_fmt(leaf.index)}: yours {_fmt(leaf.yours, '+.8e')}, "
            f"autodiff {_fmt(leaf.autodiff, '+.8e')}, finite differences {_fmt(leaf.finite_diff, '+.8e')}")))
    lines += [f"  layer {layer.layer}: {layer.diagnosis}" for layer in bad_layers]
    if report.layers and bad and not bad_layers:
        lines.append("  every delta agrees with jax.grad: the fault is in the gradient step (3.6) "
                     "or the L2 term")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, float)):
        x = x.item() if isinstance(x, np.generic) else x
        return x if not isinstance(x, float) or math.isfinite(x) else str(x)
    return x

