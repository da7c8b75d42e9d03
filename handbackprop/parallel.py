"""Data parallelism: the batch split over a device mesh, parameters replicated, with JAX's own
sharding (``jax.sharding.Mesh``, ``NamedSharding``, ``jax.shard_map``).

Each device runs the hand-written delta recursion on its own slice of the batch; one explicit
collective then combines the slices. For a batch split into n shards k = 1..n, every gradient
is formed from sums (:class:`handbackprop.backprop.Sums`), and sums add up:

    loss and gradient sums   sum_b w_b e_b,  sum_b w_b c_b g_b  =  sum_k (the same over shard k)

so :func:`sharded_sums`, the one wrapper, runs the one-device sums under ``jax.shard_map``
and ``psum``-s them; :func:`handbackprop.backprop.finish` then divides by the batch, adds
DP-SGD's noise (drawn once, from the caller's key, on the reduced sum) and the L2 term, once,
as on one device. The ``sharded_*`` functions are thin uses of it: each equals its one-device
counterpart up to the summation order's rounding. Every example is clipped on the device that
holds it (its norm needs nothing from the others); a padded Poisson batch splits over the
devices when its capacity is a multiple of their number (``dp.poisson_batch(multiple_of=)``).

The same code runs on one host's devices (several GPUs, or CPU devices made with
:func:`initialize`'s ``devices``) and on several processes (``jax.distributed``): the mesh
then holds every process's devices and the collectives cross hosts. In several processes,
every process must make the same calls with the same values, as JAX's multi-controller
model requires; :func:`replicate` and :func:`shard_batch` place host values on the mesh.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from handbackprop.backprop import (Sums, batch_sums, check_weights, divisor, finish,
                                   finish_loss)
from handbackprop.checks import check_int, check_key, check_scalar
from handbackprop.dp import noisy_mean
from handbackprop.mlp import MLP, check_x, check_y
from handbackprop.per_example import ClippedGrad, clipped_sums

AXIS = "data"  # the mesh axis the batch is split over


def initialize(devices=None, coordinator=None, num_processes=None, process_id=None):
    """Set the CPU device count and join a multi-process run; before any JAX computation.

    Both must happen before JAX starts its backends (its first computation, or a call such as
    ``jax.devices()``); JAX raises if the device count comes too late.

    Args:
      devices: the number of CPU devices to make on this host (``jax_num_cpu_devices``, the
        same as ``XLA_FLAGS=--xla_force_host_platform_device_count``). Only the CPU backend
        uses it: on a GPU machine the real GPUs are the devices and this changes nothing.
      coordinator: ``"host:port"`` of process 0, for ``jax.distributed.initialize``; CPU
        processes talk through the ``gloo`` collectives. ``None``: a single process.
      num_processes: the number of processes, with ``coordinator``.
      process_id: this process's index in ``[0, num_processes)``, with ``coordinator``.

    Raises:
      ValueError: naming the argument, for a bad value or a missing companion; all checked
        before anything is set.
      RuntimeError: from JAX, for a device count given after JAX has started.
    """
    if devices is not None:
        check_int("devices", devices, 1)
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    several = any(v is not None for v in given.values())
    if several:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise ValueError(f"{', '.join(missing)}: a multi-process run needs coordinator, "
                             f"num_processes and process_id, got {given}")
        check_int("num_processes", num_processes, 1)
        if isinstance(process_id, bool) or not isinstance(process_id, int) or not (
            0 <= process_id < num_processes
        ):
            raise ValueError(f"process_id: expected an int in [0, {num_processes}), "
                             f"got {process_id!r}")
    if devices is not None:
        jax.config.update("jax_num_cpu_devices", int(devices))
    if several:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default, explicit
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)


def data_parallel_mesh(num_devices=None) -> Mesh:
    """A one-axis mesh, ``"data"``, over the devices of every process.

    Args:
      num_devices: how many devices, all of them if ``None``. With several processes, a
        multiple of the process count: each process gives the same number of its own.

    Returns:
      A ``jax.sharding.Mesh`` with the single axis :data:`AXIS` (``"data"``).

    Raises:
      ValueError: ``num_devices: asked for 4 devices, there are 1 (cpu)``, and the like.

    Example:
      >>> import handbackprop as hbp
      >>> dict(hbp.data_parallel_mesh(1).shape)
      {'data': 1}
    """
    devices, processes = jax.devices(), jax.process_count()
    if num_devices is None:
        num_devices = len(devices)
    num_devices = check_int("num_devices", num_devices, 1)
    if num_devices > len(devices):
        raise ValueError(f"num_devices: asked for {num_devices} devices, there are {len(devices)} "
                         f"({jax.default_backend()})")
    if num_devices % processes:
        raise ValueError(f"num_devices: {num_devices} devices cannot be shared equally by the "
                         f"{processes} processes")
    per_process = num_devices // processes
    chosen = [d for p in range(processes)
              for d in [d for d in devices if d.process_index == p][:per_process]]
    return Mesh(np.array(chosen), (AXIS,))


def _check_mesh(mesh):
    if not isinstance(mesh, Mesh) or AXIS not in mesh.axis_names:
        raise TypeError(f"mesh: expected a jax.sharding.Mesh with a {AXIS!r} axis "
                        f"(see data_parallel_mesh), got {mesh!r}")
    return mesh.shape[AXIS]


def check_batch(name, batch, mesh):
    """Raise unless a batch of ``batch`` examples splits evenly over the mesh's ``"data"`` axis."""
    n = _check_mesh(mesh)
    if batch % n:
        raise ValueError(f"{name}: batch size {batch} is not divisible by the {n} devices of "
                         f"the mesh")


def _place(tree, sharding):
    """``jax.device_put`` of every leaf; typed PRNG keys go as their raw data (``device_put``
    does not place a typed key on devices of other processes)."""
    def put(a):
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = jax.device_put(jax.random.key_data(a), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        return jax.device_put(a, sharding)
    return jax.tree.map(put, tree)


def replicate(tree, mesh):
    """Every leaf of ``tree`` (parameters, optimiser state, keys, a small data set) copied to
    every device of the mesh. With several processes, each must pass the same values."""
    _check_mesh(mesh)
    return _place(tree, NamedSharding(mesh, P()))


def shard_batch(tree, mesh):
    """Every leaf split along its first axis over the mesh's ``"data"`` axis.

    With several processes, each passes the whole (same) batch and keeps its devices' rows.

    Raises:
      ValueError: ``x: batch size 10 is not divisible by the 4 devices of the mesh``
        (the leaf's path names it).
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path).strip("[]'") or "batch"
        check_batch(name, np.shape(leaf)[0] if np.ndim(leaf) else 0, mesh)
    return _place(tree, NamedSharding(mesh, P(AXIS)))


def sharded_sums(net: MLP, params, x, y, mesh, clip_norm=None, weights=None) -> Sums:
    """A batch's sums (:class:`handbackprop.backprop.Sums`), the batch split over ``mesh``.

    The one sharding wrapper: every device forms the sums of its B/n examples
    (:func:`handbackprop.backprop.batch_sums`, or :func:`handbackprop.per_example.clipped_sums`
    with ``clip_norm``), and one ``psum`` adds them up; :func:`handbackprop.backprop.finish`
    then makes the gradient. Clipping needs nothing from other devices: each example's norm
    is its own.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters, replicated (or placed by JAX).
      x: inputs, (B, d0), B divisible by the mesh's device count.
      y: labels for ``net.loss`` (see :func:`handbackprop.loss`).
      mesh: a mesh with a ``"data"`` axis (:func:`data_parallel_mesh`), static under jit;
        ``None``: the same sums on one device, unsharded.
      clip_norm: ``None`` (unclipped), or C > 0: each example's gradient clipped to it.
      weights: optional (B,), split like the batch (see
        :func:`handbackprop.per_example.clipped_sums`), e.g. the mask of a padded Poisson
        batch whose capacity is a multiple of the devices
        (:func:`handbackprop.dp.poisson_batch` with ``multiple_of``).

    Returns:
      ``Sums(loss, grads, norms, dropped)``: ``loss``, ``grads`` and ``dropped`` replicated;
      ``norms`` (B,) split over the mesh like the batch (``None`` unclipped, as ``dropped``).

    Raises:
      ValueError, TypeError: ``x: batch size 10 is not divisible by the 4 devices of the
        mesh``, the checks of ``clip_norm`` and ``weights``, and of ``params``, ``x`` and
        ``y`` against the whole batch, before any computation.
    """
    if clip_norm is not None:
        check_scalar("clip_norm", clip_norm)
    x = check_x(net, params, x)
    y = check_y(net, x, y)
    weights = check_weights(weights, x, unit=clip_norm is not None)

    def local(params, x, y, weights, clip_norm):
        if clip_norm is None:
            return batch_sums(net, params, x, y, weights)
        return clipped_sums(net, params, x, y, clip_norm, weights)

    if mesh is None:
        return local(params, x, y, weights, clip_norm)
    check_batch("x", x.shape[0], mesh)

    def shard(*args):  # this device's B/n examples
        sums = local(*args)
        total = jax.lax.psum((sums.loss, sums.grads, sums.dropped), AXIS)  # the one collective
        return Sums(*total[:2], sums.norms, total[2])

    specs = (P(), P(AXIS), P(AXIS), P(AXIS), P())
    return jax.shard_map(shard, mesh=mesh, in_specs=specs,
                         out_specs=Sums(P(), P(), P(AXIS), P()))(params, x, y, weights, clip_norm)


def sharded_value_and_backprop(net: MLP, params, x, y, mesh):
    """:func:`handbackprop.value_and_backprop` with the batch split over ``mesh``.

    The loss and gradient sums of every device's B/n examples are ``psum``-ed
    (:func:`sharded_sums`), then reduced and given their L2 term once, as on one device.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters, replicated (or placed by JAX).
      x: inputs, (B, d0), B divisible by the mesh's device count.
      y: labels for ``net.loss`` (see :func:`handbackprop.loss`).
      mesh: a mesh with a ``"data"`` axis (:func:`data_parallel_mesh`); static under jit.

    Returns:
      ``(loss, grads)``, as :func:`handbackprop.value_and_backprop`, replicated.

    Raises:
      ValueError: ``x: batch size 10 is not divisible by the 4 devices of the mesh``, and
        the usual checks of ``params``, ``x`` and ``y``, before any computation.

    Example:
      >>> import jax, jax.numpy as jnp, handbackprop as hbp
      >>> net, mesh = hbp.MLP((3, 4, 2)), hbp.data_parallel_mesh()
      >>> params = hbp.init_params(jax.random.key(0), net)
      >>> loss, grads = hbp.sharded_value_and_backprop(net, params, jnp.ones((8, 3)),
      ...                                              jnp.zeros((8, 2)), mesh)
      >>> jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)
      True
    """
    _check_mesh(mesh)
    sums = sharded_sums(net, params, x, y, mesh)
    n = divisor(net, np.shape(x)[0])
    return finish_loss(net, params, sums.loss, n), finish(net, params, sums.grads, n)


def sharded_backprop(net: MLP, params, x, y, mesh):
    """The gradient of :func:`handbackprop.loss`, the batch split over ``mesh``
    (see :func:`sharded_value_and_backprop`)."""
    return sharded_value_and_backprop(net, params, x, y, mesh)[1]


def sharded_clipped_grad(net: MLP, params, x, y, clip_norm, mesh) -> ClippedGrad:
    """:func:`handbackprop.clipped_grad` with the batch split over ``mesh``.

    Every device clips its own examples' gradients and forms their clipped sum; the sums are
    ``psum``-ed (:func:`sharded_sums`).

    Args:
      net, params, x, y, clip_norm: as for :func:`handbackprop.clipped_grad`.
      mesh: a mesh with a ``"data"`` axis; static under jit.

    Returns:
      A :class:`handbackprop.ClippedGrad` ``(sum, mean, norms, dropped)``: ``sum``, ``mean``
      and ``dropped`` replicated, ``norms`` (B,) split over the mesh like the batch.

    Raises:
      ValueError: as :func:`sharded_value_and_backprop`, and for a bad ``clip_norm``.
    """
    check_scalar("clip_norm", clip_norm)
    _check_mesh(mesh)
    sums = sharded_sums(net, params, x, y, mesh, clip_norm)
    return ClippedGrad.from_sums(sums, params, np.shape(x)[0])


def sharded_dp_grad(net: MLP, params, x, y, key, clip_norm, noise_multiplier, mesh):
    """:func:`handbackprop.dp_grad` with the batch split over ``mesh``.

    The clipped sum comes from :func:`sharded_sums`; the noise is drawn once, from ``key``,
    on the reduced sum (every device draws the same numbers), so the result equals
    :func:`handbackprop.dp_grad` with the same key up to the summation order's rounding.

    Args:
      net, params, x, y, key, clip_norm, noise_multiplier: as for :func:`handbackprop.dp_grad`.
      mesh: a mesh with a ``"data"`` axis; static under jit.

    Returns:
      A tuple like ``params``, replicated.
    """
    check_scalar("clip_norm", clip_norm)
    check_scalar("noise_multiplier", noise_multiplier, strict=False)
    check_key(key)
    _check_mesh(mesh)
    sums = sharded_sums(net, params, x, y, mesh, clip_norm)
    return noisy_mean(net, params, sums.grads, np.shape(x)[0], key, clip_norm, noise_multiplier)
