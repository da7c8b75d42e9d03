"""The verifier's reports: records per leaf (or block) and per layer, and their text and JSON.

A :class:`GradientReport` is what :func:`~handbackprop.verify_gradient`,
:func:`~handbackprop.check_backprop` and the rule checks (:mod:`handbackprop.rules`) return;
the numbers in it come from :mod:`handbackprop.error_model`.
"""

import dataclasses
import math

import numpy as np

@dataclasses.dataclass(frozen=True)
class LeafReport:
    """One leaf's comparisons. Ratios are error / tolerance: at most 1 passes.

    Attributes:
      name: the leaf's path, e.g. ``[0]['w']`` (``layer 1 w`` from :func:`check_backprop`).
      shape, dtype: the parameter's.
      max_abs_error: ``max |yours - autodiff|``.
      max_rel_error: ``max_abs_error / max |autodiff|``, relative to the leaf's scale.
      index: the worst entry (largest ratio of any check), or ``None``; for a rule check's
        block with ``output_index``, the input index of its worst Jacobian entry.
      output_index: that entry's output index (exhaustive rule checks), else ``None``.
      yours, autodiff, finite_diff: the three values there (``finite_diff`` only when exhaustive;
        with ``output_index``, the Jacobian entry's: the rule's VJP row against the
        finite-difference column).
      autodiff_ratio: ``max |yours - autodiff| / autodiff_tol``; ``None`` without that oracle.
      autodiff_tol: at ``index``, ``atol + rtol max(max |autodiff|, σ_g / u)``, σ_g that entry's
        (with ``output_index``: ``64 u max |autodiff|`` over the block's Jacobian, + tiniest normal).
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
    output_index: tuple | None = None
    yours: float | None = None
    autodiff: float | None = None
    finite_diff: float | None = None
    autodiff_ratio: float | None = math.nan
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
    """The result of :func:`verify_gradient`, :func:`check_backprop` or a rule check.

    ``str(report)`` is a table, ``report.to_dict()`` JSON-ready, ``report.ok`` the verdict.

    Attributes:
      leaves: one :class:`LeafReport` per leaf, in ``jax.tree.leaves`` order (rule checks: per
        (input leaf, output leaf) block).
      layers: one :class:`LayerReport` per layer (``check_backprop`` only).
      loss: the loss at ``params``.
      num_params: n, the number of parameters.
      evaluations: loss evaluations spent on finite differences.
      num_directions: random directions per leaf.
      exhaustive: whether every coordinate was checked.
      tolerances: how each tolerance was set, one line per check.
      title: what was checked (``"gradient check"``, ``"vjp check"``, ...).
      notes: what the check did that the caller should know (an upcast, a missing oracle).
    """

    leaves: tuple
    layers: tuple = ()
    loss: float = math.nan
    num_params: int = 0
    evaluations: int = 0
    num_directions: int = 0
    exhaustive: bool = False
    tolerances: tuple = ()
    title: str = "gradient check"
    notes: tuple = ()

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
        gradient = self.title == "gradient check"
        unit, many = ("leaf", "leaves") if gradient else ("block", "blocks")
        head = (f"{self.title}: {len(self.leaves)} {many}, {self.num_params} parameters"
                + (f", loss {self.loss:.6g}" if gradient else "")
                + (f"; finite differences: {self.num_directions} directions per {unit}"
                   f"{' + every coordinate' if self.exhaustive else ''} "
                   f"({self.evaluations} {'loss' if gradient else 'function'} evaluations)"
                   if self.evaluations else ""))
        head += "".join(f"\nnote: {n}" for n in self.notes)
        cols = (unit, "shape", "max abs err", "max rel err", "worst at", "yours", "autodiff",
                "finite diff", "/tol autodiff", "/tol coords", "/tol dirs", "status")
        rows = [_leaf_row(leaf) for leaf in self.leaves]
        parts = [head, _table(cols, rows)]
        if self.layers:
            cols = ("layer", "activation", "delta max err", "/tol", "g' max err", "/tol", "diagnosis")
            parts.append(_table(cols, [_layer_row(layer) for layer in self.layers]))
        parts.append("tolerances:\n" + "\n".join(f"  {t}" for t in self.tolerances))
        parts.append(_verdict(self))
        return "\n\n".join(parts)


# -- the text --------------------------------------------------------------------------------


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
            _where(leaf), _fmt(leaf.yours, "+.8e"), _fmt(leaf.autodiff, "+.8e"),
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
    noun = "leaves" if report.title == "gradient check" else "blocks"
    lines = [f"FAIL: {len(bad)} of {len(report.leaves)} {noun}" + (
        f", {len(bad_layers)} of {len(report.layers)} layers" if report.layers else "")]
    for leaf in bad:
        lines.append(f"  {leaf.name}: " + (leaf.problem or (
            f"worst at {_where(leaf)}: yours {_fmt(leaf.yours, '+.8e')}, "
            f"autodiff {_fmt(leaf.autodiff, '+.8e')}, finite differences {_fmt(leaf.finite_diff, '+.8e')}")))
    lines += [f"  layer {layer.layer}: {layer.diagnosis}" for layer in bad_layers]
    if report.layers and bad and not bad_layers:
        lines.append("  every delta agrees with jax.grad: the fault is in the gradient step (3.6) "
                     "or the L2 term")
    return "\n".join(lines)


def _where(leaf):
    """The worst entry: its index, or ``out[2, 15] / arg0[3, 1]`` for a Jacobian entry."""
    if leaf.output_index is None:
        return _fmt(leaf.index)
    at = lambda name, i: name + (f"[{', '.join(map(str, i))}]" if i else "")  # noqa: E731
    arg, _, out = leaf.name.partition(" -> ")
    arg = arg.rpartition(": ")[2]  # "order 2: arg0"
    return f"{at(out, leaf.output_index)} / {at(arg, leaf.index)}"


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, float)):
        x = x.item() if isinstance(x, np.generic) else x
        return x if not isinstance(x, float) or math.isfinite(x) else str(x)
    return x

