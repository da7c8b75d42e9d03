"""Every curvature quantity of :mod:`handbackprop.curvature` against its autodiff oracle.

Here, as in the gradient verifier, autodiff is the oracle:

- ``hessian_vector_product``: ``jax.jvp(jax.grad(loss))``;
- ``diag_hessian``: ``diag(jax.hessian(loss))`` (the full Hessian: small networks only);
- ``ggn_vector_product``, ``diag_ggn``, ``per_example_diag_ggn``: the GGN assembled from
  ``jax.jacobian`` of the map from the parameters to ``z`` (``S^(L)``, or the output ``o`` for
  squared error with a non-identity output activation) and ``jax.hessian`` of the loss in z;
- ``kfac_factors`` (``"kflr"``): ``a`` from the inputs, ``g = r_B sum_b J_b^T H_b J_b`` with
  ``J_b = dz_b / dS_b^(l)`` by ``jax.jacobian`` through offsets added to ``S^(l)``.

Each quantity's tolerance is ``rtol`` times its largest oracle entry over all layers (the size
of the summed terms, as cancellation within an entry is bounded by it): both sides sum the
same products in other orders, so they differ by a few hundred roundings at most. The Monte
Carlo methods are random and not checked here (the tests bound their mean).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from handbackprop import curvature
from handbackprop.backprop import loss as net_loss
from handbackprop.mlp import MLP, check_x, check_y

RTOL_ULPS = 256  # default rtol = RTOL_ULPS * u of the parameters' dtype
MAX_PARAMS = 4096  # the oracles form P x P matrices


@dataclasses.dataclass(frozen=True)
class CurvatureCheck:
    """One quantity's leaf of one layer against its oracle.

    Attributes:
      quantity: the function's name, e.g. ``"diag_hessian"``.
      layer: l, 1-based.
      leaf: ``"w"`` or ``"b"`` (``"a"`` or ``"g"`` for ``kfac_factors``).
      max_abs_error: ``max |yours - oracle|`` over the leaf.
      tol: the error allowed, ``rtol`` times the quantity's largest oracle entry.
    """

    quantity: str
    layer: int
    leaf: str
    max_abs_error: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_error <= self.tol)  # False for NaN


@dataclasses.dataclass(frozen=True)
class CurvatureReport:
    """All checks of :func:`check_curvature`; ``ok`` when every one passes."""

    checks: tuple

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> tuple:
        return tuple(c for c in self.checks if not c.ok)

    def __str__(self):
        lines = [f"curvature check: {'ok' if self.ok else f'{len(self.failures)} FAILED'}"]
        for c in self.checks:
            lines.append(f"  {'ok  ' if c.ok else 'FAIL'} {c.quantity} layer {c.layer} {c.leaf}: "
                         f"max error {c.max_abs_error:.3g}, tol {c.tol:.3g}")
        return "\n".join(lines)


def _z_of_s(net: MLP, s):
    """The Gauss-Newton split's output z: S^(L) for canonical pairs, o otherwise."""
    return s if curvature._is_canonical(net) else net.activations[-1].fn(s)


def _loss_of_z(net: MLP, z, y):
    """Each example's loss as a function of z, (B,)."""
    if curvature._is_canonical(net):
        return net.loss_fn.value(z, net.activations[-1].fn(z), y)
    return 0.5 * jnp.sum((z - y) ** 2, axis=-1)


def _z_with_offsets(net: MLP, params, x, offsets):
    """The forward pass with ``offsets[l]`` added to ``S^(l)``: z, (B, K)."""
    h = x
    for l, (layer, g, off) in enumerate(zip(params, net.activations, offsets)):
        s = h @ layer["w"] + (layer["b"][None, :] if net.bias else 0) + off
        h = g.fn(s)
    return _z_of_s(net, s)


def _output_hessians(net, z, y):
    """``H_b = d2 e_b / dz_b^2`` for every example, (B, K, K)."""
    return jax.vmap(jax.hessian(lambda zb, yb: _loss_of_z(net, zb[None], yb[None])[0]))(z, y)


def ggn_per_example(net: MLP, params, x, y):
    """Each example's ``J_b^T H_b J_b`` over the flat parameters, (B, P, P), and the unravel."""
    flat, unravel = ravel_pytree(params)
    zeros = tuple(jnp.zeros((x.shape[0], d), flat.dtype) for d in net.sizes[1:])
    z_of = lambda p: _z_with_offsets(net, unravel(p), x, zeros)  # noqa: E731
    jac = jax.jacobian(z_of)(flat)  # (B, K, P)
    hz = _output_hessians(net, z_of(flat), y)
    return jnp.einsum("bkp,bkl,blq->bpq", jac, hz, jac), unravel


def _scale(net, x):
    return 1.0 / x.shape[0] if net.reduction == "mean" else 1.0


def _l2_diagonal(net: MLP, params):
    """``l2`` on every weight entry, 0 on biases, as the flat vector."""
    return ravel_pytree(tuple({k: jnp.full_like(v, net.l2 if k == "w" else 0.0) for k, v in layer.items()}
                              for layer in params))[0]


def ggn_matrix(net: MLP, params, x, y):
    """The oracle GGN of :func:`handbackprop.loss`: ``r_B sum_b J_b^T H_b J_b + l2`` on weights, (P, P)."""
    per, _ = ggn_per_example(net, params, x, y)
    return _scale(net, x) * jnp.sum(per, 0) + jnp.diag(_l2_diagonal(net, params))


def hessian_matrix(net: MLP, params, x, y):
    """The oracle Hessian of :func:`handbackprop.loss` over the flat parameters, (P, P)."""
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda p: net_loss(net, unravel(p), x, y))(flat)


def kflr_oracle(net: MLP, params, x, y):
    """``KronFactors(a, g)`` per layer, g through ``jax.jacobian`` of z in offsets at ``S^(l)``."""
    zeros = tuple(jnp.zeros((x.shape[0], d), x.dtype) for d in net.sizes[1:])
    jacs = jax.jacobian(lambda offs: _z_with_offsets(net, params, x, offs))(zeros)  # (B,K,B,d) each
    hz = _output_hessians(net, _z_with_offsets(net, params, x, zeros), y)
    out, h = [], x
    for layer, g, jac in zip(params, net.activations, jacs):
        xa = jnp.concatenate([h, jnp.ones_like(h[:, :1])], 1) if net.bias else h
        jb = jnp.einsum("bkbd->bkd", jac)  # examples do not interact
        gg = _scale(net, x) * jnp.einsum("bki,bkl,blj->ij", jb, hz, jb)
        out.append(curvature.KronFactors(xa.T @ xa / x.shape[0], gg))
        h = g.fn(h @ layer["w"] + (layer["b"][None, :] if net.bias else 0))
    return tuple(out)


@functools.partial(jax.jit, static_argnums=0)
def oracles(net: MLP, params, x, y, v):
    """Every deterministic quantity by autodiff, in one jitted call, named as the functions.

    ``x`` and ``y`` are checked (``check_x`` / ``check_y``); ``v`` is like ``params``.
    """
    flat, unravel = ravel_pytree(params)
    vflat = ravel_pytree(v)[0]
    per, _ = ggn_per_example(net, params, x, y)
    ggn = _scale(net, x) * jnp.sum(per, 0) + jnp.diag(_l2_diagonal(net, params))
    out = {
        "ggn_vector_product": unravel(ggn @ vflat),
        "diag_ggn": unravel(jnp.diag(ggn)),
        "per_example_diag_ggn": jax.vmap(lambda m: unravel(jnp.diag(m)))(per),
        "kfac_factors": kflr_oracle(net, params, x, y),
    }
    if _has_second(net):
        loss = lambda p: net_loss(net, p, x, y)  # noqa: E731
        out["hessian_vector_product"] = jax.jvp(jax.grad(loss), (params,), (v,))[1]
        out["diag_hessian"] = unravel(jnp.diag(hessian_matrix(net, params, x, y)))
    return out


def _has_second(net: MLP) -> bool:
    try:
        curvature._check_second(net, "check_curvature")
    except ValueError:
        return False
    return True


def check_curvature(net: MLP, params, x, y, *, v=None, rtol=None) -> CurvatureReport:
    """Compare every curvature quantity with its autodiff oracle, layer by layer.

    Args:
      net: the network; at most :data:`MAX_PARAMS` parameters (the oracles are P x P).
      params, x, y: as for :func:`handbackprop.loss`.
      v: the direction for the products, like ``params`` (default: standard normal, key 0).
      rtol: relative tolerance (default ``RTOL_ULPS`` times the dtype's epsilon).

    Returns:
      A :class:`CurvatureReport`; its failures name the quantity, the layer and the leaf.
      Quantities needing g'' are left out for activations without one.

    Raises:
      ValueError: for a network with more than :data:`MAX_PARAMS` parameters.
    """
    if net.num_params > MAX_PARAMS:
        raise ValueError(f"net: check_curvature forms P x P matrices; expected at most {MAX_PARAMS} "
                         f"parameters, got {net.num_params}")
    x = check_x(net, params, x)
    y = check_y(net, x, y)
    flat, unravel = ravel_pytree(params)
    if v is None:
        v = unravel(jax.random.normal(jax.random.key(0), flat.shape, flat.dtype))
    v = curvature._check_like(params, v)
    rtol = RTOL_ULPS * float(jnp.finfo(flat.dtype).eps) if rtol is None else rtol
    expected = oracles(net, params, x, y, v)
    yours = {
        "ggn_vector_product": curvature.ggn_vector_product(net, params, x, y, v),
        "diag_ggn": curvature.diag_ggn(net, params, x, y),
        "per_example_diag_ggn": curvature.per_example_diag_ggn(net, params, x, y),
        "kfac_factors": curvature.kfac_factors(net, params, x, y),
    }
    if "diag_hessian" in expected:
        yours["hessian_vector_product"] = curvature.hessian_vector_product(net, params, x, y, v)
        yours["diag_hessian"] = curvature.diag_hessian(net, params, x, y)
    checks = []
    for quantity, oracle in expected.items():
        tol = rtol * max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(oracle))
        for l, (mine, ref) in enumerate(zip(yours[quantity], oracle), 1):
            leaves = mine._asdict() if isinstance(mine, curvature.KronFactors) else mine
            refs = ref._asdict() if isinstance(ref, curvature.KronFactors) else ref
            for leaf in leaves:
                err = np.max(np.abs(np.asarray(leaves[leaf], np.float64) - np.asarray(refs[leaf], np.float64)))
                checks.append(CurvatureCheck(quantity, l, leaf, float(err), tol))
    return CurvatureReport(tuple(checks))
