"""DP-SGD (Abadi et al. 2016) at the cost of SGD, and optional privacy accounting.

One DP-SGD gradient, for a batch of B examples, clip bound C and noise multiplier sigma:

    g = (sum_b clip_C(g_b) + N(0, sigma^2 C^2 I)) / B  +  l2 W

The noise is calibrated to the *sum*, whose sensitivity to one example is C, and only then
divided by B: adding noise of standard deviation sigma C to the mean, as some code does, gives
B times too much noise. The clipped sum comes from :func:`handbackprop.clipped_grad` in one
backward pass, with no per-example gradients in memory (an example with a non-finite gradient
is left out of it); :func:`noisy_mean` draws the noise and hands the sum to
:func:`handbackprop.backprop.finish`, which divides and adds the L2 gradient ``l2 W``: it
does not depend on the data, so it is added after clipping and noise and costs no privacy.

Accounting (:func:`dp_epsilon`) needs the optional ``dp-accounting`` package:
``pip install 'handbackprop[dp]'``. It assumes Poisson sampling, which :func:`poisson_batch`
draws (every example independently with probability B / n, padded to a static size, the sum
then divided by the expected B); shuffled fixed-size batches are its usual approximation.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from handbackprop.backprop import finish
from handbackprop.checks import check_int, check_key, check_scalar
from handbackprop.mlp import MLP, check_params
from handbackprop.per_example import clipped_sums

ACCOUNTANTS = ("rdp", "pld")


class DPSGD(NamedTuple):
    """DP-SGD's settings for training (:func:`handbackprop.fit` with ``dp=``): static, hashable.

    Every step's gradient is then :func:`dp_grad` with a fresh noise key.

    Attributes:
      clip_norm: C > 0, the per-example clipping bound.
      noise_multiplier: sigma >= 0; the noise on the clipped sum has standard deviation sigma C.
      poisson: draw each step's batch by Poisson sampling (:func:`poisson_batch`: every
        example independently with probability q = B / n), the sampling that
        :func:`dp_epsilon` accounts for. ``False``: shuffled fixed-size batches, for which
        that accounting is only the customary approximation.
    """

    clip_norm: float
    noise_multiplier: float
    poisson: bool = False

    def check(self, mesh=None):
        """Raise a clear error for an out-of-range setting, or for Poisson sampling with a
        data-parallel ``mesh`` (not implemented); return ``self``."""
        check_scalar("clip_norm", self.clip_norm)
        check_scalar("noise_multiplier", self.noise_multiplier, strict=False)
        if not isinstance(self.poisson, bool):
            raise TypeError(f"poisson: expected a bool, got {self.poisson!r}")
        if self.poisson and mesh is not None:
            raise ValueError("dp: Poisson sampling (poisson=True) is not implemented with a "
                             "mesh; use shuffled batches (poisson=False) or one device")
        return self


def poisson_capacity(n: int, batch_size: int, multiple_of: int = 1) -> int:
    """The static size of a padded Poisson batch of expected size B from n examples.

    ``min(n, ceil(B + 6 sqrt(B (1 - B/n))) + 1)``: a binomial count exceeds it with
    probability below about 1e-9, and only then does :func:`poisson_batch` drop examples.
    Then rounded up to a multiple of ``multiple_of`` (e.g. the devices of a mesh, so that
    the padded batch splits evenly over them), which may exceed n.
    """
    check_int("n", n, 1)
    check_int("batch_size", batch_size, 1, n)
    check_int("multiple_of", multiple_of, 1)
    sd = math.sqrt(batch_size * (1 - batch_size / n))
    size = min(n, math.ceil(batch_size + 6 * sd) + 1)
    return -(-size // multiple_of) * multiple_of


def poisson_batch(key, n: int, batch_size: int, multiple_of: int = 1):
    """A Poisson-sampled batch: each of n examples independently with probability B / n.

    The sampling that DP-SGD's accounting (:func:`dp_epsilon`) assumes. The count is random
    (binomial, mean B); the result is padded to the static :func:`poisson_capacity`.

    Args:
      key: a ``jax.random`` key.
      n: the data set's size.
      batch_size: B, the expected batch size, in [1, n].
      multiple_of: the capacity is a multiple of it (see :func:`poisson_capacity`).

    Returns:
      ``(indices, mask)``, each of shape ``(poisson_capacity(n, B, multiple_of),)``: the
      chosen examples' indices in increasing order, then zeros; ``mask`` (bool) is True for a
      chosen example, False for padding.

    Example:
      >>> idx, mask = poisson_batch(jax.random.key(0), 1000, 32)
      >>> idx.shape, bool(jnp.all(idx[~mask] == 0))
      ((67,), True)
    """
    check_key(key)
    size = poisson_capacity(n, batch_size, multiple_of)
    chosen = jax.random.bernoulli(key, batch_size / n, (n,))
    (indices,) = jnp.nonzero(chosen, size=size, fill_value=0)
    return indices, jnp.arange(size) < jnp.sum(chosen)


def dp_grad(net: MLP, params, x, y, key, clip_norm, noise_multiplier):
    """A DP-SGD gradient: per-example clipping, Gaussian noise on the sum, then the mean.

    Clips each example's gradient to norm <= ``clip_norm`` (C), adds Gaussian noise of
    standard deviation ``noise_multiplier * clip_norm`` to the clipped *sum*, then divides
    by the batch size B; finally adds ``net.l2 * W`` (data-independent, so never clipped or
    noised). The noise is thus ``sigma C / B`` per coordinate of the result. Calibrating
    the noise to the sum but adding it to the mean, a known bug elsewhere, would make it B
    times larger. ``net.reduction`` is ignored: DP-SGD averages over the batch.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs, (B, d0).
      y: labels for ``net.loss``.
      key: a ``jax.random`` key for the noise (:func:`tree_normal`).
      clip_norm: C > 0.
      noise_multiplier: sigma >= 0; 0 gives the clipped mean (no privacy).
        Both are checked at trace time when concrete; when traced (non-static arguments of
        a jitted caller) only their shape and dtype are checked: pass them as static to have
        their values checked.

    Returns:
      A tuple like ``params``, in the parameters' dtype.

    Raises:
      ValueError, TypeError: naming ``clip_norm``, ``noise_multiplier``, ``key``, ``params``,
        ``x`` or ``y``, before any computation.
    """
    check_scalar("noise_multiplier", noise_multiplier, strict=False)
    check_key(key)
    sums = clipped_sums(net, params, x, y, clip_norm)
    return noisy_mean(net, params, sums.grads, np.shape(x)[0], key, clip_norm, noise_multiplier)


def tree_normal(key, tree):
    """Standard normal numbers shaped like ``tree``, one per entry of its leaves.

    All P numbers come from one ``jax.random.normal`` draw, then are cut into the leaves: on
    a CPU, each draw runs as a loop of small kernels with about 0.1 ms of fixed cost, so one
    draw (rather than a key split and one draw per leaf) matters for small networks.

    Args:
      key: a ``jax.random`` key.
      tree: a pytree of floating arrays (e.g. parameters); only their shapes and dtypes count.

    Returns:
      A pytree like ``tree``, each leaf of its shape and dtype.

    Example:
      >>> z = tree_normal(jax.random.key(0), {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)})
      >>> jax.tree.map(jnp.shape, z)
      {'b': (3,), 'w': (2, 3)}
    """
    check_key(key)
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = [jnp.result_type(a) for a in leaves]
    if not leaves or not all(jnp.issubdtype(d, jnp.floating) for d in dtypes):
        raise (TypeError if leaves else ValueError)(
            "tree: expected a pytree of floating arrays (at least one), got "
            + (f"leaf dtypes {sorted(set(map(str, dtypes)))}" if leaves else f"{tree!r}"))
    sizes = [np.size(a) for a in leaves]
    z = jax.random.normal(key, (sum(sizes),), jnp.result_type(*leaves))
    parts = jnp.split(z, np.cumsum(sizes)[:-1])
    return treedef.unflatten([p.reshape(np.shape(a)).astype(a.dtype) for p, a in zip(parts, leaves)])


def noisy_mean(net: MLP, params, clipped_sum, batch: int, key, clip_norm, noise_multiplier):
    """DP-SGD's gradient from a clipped sum: ``(clipped_sum + N(0, (sigma C)^2 I)) / B + l2 W``.

    The second half of :func:`dp_grad`, for a clipped sum computed elsewhere (e.g. reduced
    across devices first, as :func:`handbackprop.sharded_dp_grad` does). The noise is
    :func:`tree_normal`'s; a concrete ``noise_multiplier`` of 0 skips drawing it.

    Args:
      net: the network (for its L2 term).
      params: its parameters.
      clipped_sum: ``sum_b clip_C(g_b)``, a tuple like ``params``.
      batch: B, the number of examples summed (the expected B for a Poisson batch), an
        int >= 1.
      key, clip_norm, noise_multiplier: as for :func:`dp_grad`.

    Returns:
      A tuple like ``params``, in the parameters' dtypes.

    Raises:
      ValueError, TypeError: naming ``batch``, ``clipped_sum``, ``key``, ``clip_norm``,
        ``noise_multiplier`` or ``params``, before any computation.
    """
    check_params(net, params)
    want, got = jax.tree.map(np.shape, params), jax.tree.map(np.shape, clipped_sum)
    if got != want:
        raise ValueError(f"clipped_sum: expected a tree like params with shapes {want}, "
                         f"got {got}")
    check_int("batch", batch, 1)
    check_key(key)
    check_scalar("clip_norm", clip_norm)
    check_scalar("noise_multiplier", noise_multiplier, strict=False)
    if isinstance(noise_multiplier, (int, float)) and noise_multiplier == 0:
        # A known sigma = 0 adds exactly nothing: skip drawing P normals (on a CPU, often
        # the costliest part of a small network's step). A traced sigma always draws.
        return finish(net, params, clipped_sum, batch)
    std = noise_multiplier * clip_norm  # the sum's sensitivity to one example is C
    z = tree_normal(key, clipped_sum)
    return finish(net, params, clipped_sum, batch,
                  jax.tree.map(lambda g, z: jnp.asarray(std, g.dtype) * z, clipped_sum, z))


def dp_sgd_step(net: MLP, params, x, y, key, learning_rate, clip_norm, noise_multiplier):
    """One DP-SGD step: ``params - learning_rate * dp_grad(...)``.

    Args:
      net, params, x, y, key, clip_norm, noise_multiplier: as for :func:`dp_grad`.
      learning_rate: > 0, checked like ``clip_norm``.

    Returns:
      The new parameters, a tuple like ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, handbackprop as hbp
      >>> net = hbp.MLP((3, 4, 2), loss="softmax_cross_entropy")
      >>> params = hbp.init_params(jax.random.key(0), net)
      >>> x, y = jnp.ones((8, 3)), jnp.zeros((8,), jnp.int32)
      >>> step = jax.jit(hbp.dp_sgd_step, static_argnums=0)
      >>> new = step(net, params, x, y, jax.random.key(1), 0.1, 1.0, 1.1)
      >>> jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, params)
      True
    """
    check_scalar("learning_rate", learning_rate)
    grads = dp_grad(net, params, x, y, key, clip_norm, noise_multiplier)
    lr = learning_rate
    return jax.tree.map(lambda p, g: p - jnp.asarray(lr, p.dtype) * g, params, grads)


def dp_epsilon(noise_multiplier, sampling_rate, steps, delta, accountant="rdp") -> float:
    """The epsilon that DP-SGD spends, for a given delta: (epsilon, delta)-DP.

    Each step is a Poisson-subsampled Gaussian mechanism (every example enters a batch with
    probability ``sampling_rate``, e.g. expected batch size / data set size) with noise
    multiplier sigma, composed ``steps`` times, as computed by Google's ``dp-accounting``.
    A host-side function of Python numbers: call it outside ``jax.jit``.

    Args:
      noise_multiplier: sigma >= 0 (0 spends an infinite epsilon).
      sampling_rate: q in (0, 1].
      steps: the number of steps, an int >= 1.
      delta: in (0, 1).
      accountant: ``"rdp"`` (Renyi DP, the usual upper bound) or ``"pld"`` (privacy loss
        distributions: tighter, slower).

    Returns:
      epsilon, a Python float (``inf`` without noise).

    Raises:
      ImportError: when ``dp-accounting`` is not installed (``pip install 'handbackprop[dp]'``).
      ValueError, TypeError: for an argument out of range, naming it.

    Example:
      >>> import handbackprop as hbp
      >>> # 60 epochs of batches of 256 from 60,000 examples (needs dp-accounting)
      >>> round(hbp.dp_epsilon(1.1, 256 / 60000, 60 * 60000 // 256, 1e-5), 2)  # doctest: +SKIP
      2.6
    """
    check_scalar("noise_multiplier", noise_multiplier, strict=False)
    check_scalar("sampling_rate", sampling_rate)
    if not 0 < float(sampling_rate) <= 1:
        raise ValueError(f"sampling_rate: expected a number in (0, 1], got {sampling_rate!r}")
    steps = check_int("steps", steps, 1)
    check_scalar("delta", delta)
    if not float(delta) < 1:
        raise ValueError(f"delta: expected a number in (0, 1), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant: expected one of {ACCOUNTANTS}, got {accountant!r}")
    try:
        import dp_accounting
    except ImportError as e:
        raise ImportError(
            "dp_epsilon: privacy accounting needs the optional dp-accounting package: "
            "pip install 'handbackprop[dp]'"
        ) from e
    if float(noise_multiplier) == 0:
        return math.inf
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else (
        dp_accounting.pld.PLDAccountant()
    )
    event = dp_accounting.PoissonSampledDpEvent(
        float(sampling_rate), dp_accounting.GaussianDpEvent(float(noise_multiplier))
    )
    acc.compose(event, steps)
    return float(acc.get_epsilon(float(delta)))
