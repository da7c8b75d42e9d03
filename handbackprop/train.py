"""Training: the note's three-step loop (loss, gradient, ``w <- w - eta grad``), compiled.

- :func:`sgd` is an optimiser in the optax style: a pair of pure functions
  ``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``, with
  :func:`apply_updates` adding the updates. Any optax ``GradientTransformation``
  (``optax.sgd``, ``optax.adam``, ...) fits the same slots.
- :func:`train_epoch` shuffles with a PRNG key, then runs every mini-batch step as one
  ``jax.lax.scan``: no Python runs per step.
- :func:`evaluate` gives the loss and the task's metric; :func:`fit` runs the epochs, keeps a
  per-epoch history and checks its inputs before any computation.

- With a mesh, the training set stays sharded by rows (:func:`process_rows`,
  :func:`shard_data`): each process holds only its rows, and each step gathers its batch
  from the devices that hold it.

Every step is three pieces: sampling, the gradient (the hand-written delta recursion's batch
sums, :func:`handbackprop.parallel.sharded_sums`, then their mean) and the optimiser's update.
"""

import dataclasses
import functools
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from handbackprop import parallel
from handbackprop.backprop import divisor, finish, finish_loss, loss
from handbackprop.checks import check_int, check_key, check_like, check_scalar
from handbackprop.dp import DPSGD, noisy_mean, poisson_batch
from handbackprop.mlp import MLP, check_net, check_x, check_y, forward, init_params


class Optimizer(NamedTuple):
    """A pair of pure functions, as ``optax.GradientTransformation``.

    Attributes:
      init: ``params -> state``.
      update: ``(grads, state, params=None) -> (updates, state)``; the new parameters are
        ``apply_updates(params, updates)``.
    """

    init: Callable
    update: Callable


class SGDState(NamedTuple):
    """:func:`sgd`'s state.

    Attributes:
      count: int32 scalar, the number of steps taken: the schedule's argument.
      trace: the momentum buffer, a pytree like the parameters; ``()`` without momentum.
    """

    count: jax.Array
    trace: Any


def sgd(learning_rate, momentum: float = 0.0, nesterov: bool = False) -> Optimizer:
    """Stochastic gradient descent, with optional (Nesterov) momentum and schedule.

    With step count t, learning rate eta_t and momentum mu, as ``optax.sgd``:

        v <- g + mu v;   w <- w - eta_t v          (heavy ball)
        v <- g + mu v;   w <- w - eta_t (g + mu v)  (Nesterov)

    and ``w <- w - eta_t g`` without momentum, the note's update.

    Two calls with equal settings (the same schedule object, if any) return equal
    optimisers: as a static argument of a jitted epoch, the second reuses the first's program.

    Args:
      learning_rate: eta, a number > 0, or a schedule ``step -> eta`` (any callable of the
        int32 step count, e.g. an optax schedule).
      momentum: mu in [0, 1).
      nesterov: use Nesterov momentum (needs momentum > 0).

    Returns:
      An :class:`Optimizer`.

    Raises:
      ValueError: for a non-positive learning rate or momentum outside [0, 1), raised here.

    Example:
      >>> opt = sgd(0.1)
      >>> params = {"w": jnp.ones(2, jnp.float32)}
      >>> updates, state = opt.update({"w": jnp.ones(2, jnp.float32)}, opt.init(params))
      >>> apply_updates(params, updates)["w"]
      Array([0.9, 0.9], dtype=float32)
      >>> opt == sgd(0.1)
      True
    """
    if not callable(learning_rate):
        check_scalar("learning_rate", learning_rate)
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not (
        0 <= momentum < 1
    ):
        raise ValueError(f"momentum: expected a number in [0, 1), got {momentum!r}")
    if nesterov and not momentum:
        raise ValueError("nesterov: Nesterov momentum needs momentum > 0, got momentum=0")
    if not callable(learning_rate) and not isinstance(learning_rate, jax.core.Tracer):
        learning_rate = float(learning_rate)  # hashable, as a static argument needs
    return Optimizer(_SGDInit(float(momentum)),
                     _SGDUpdate(learning_rate, float(momentum), bool(nesterov)))


# Frozen dataclasses rather than closures: equal settings give equal (and equally hashed)
# functions, so an optimiser rebuilt with the same settings is the same static argument.
@dataclasses.dataclass(frozen=True)
class _SGDInit:
    momentum: float

    def __call__(self, params):
        trace = jax.tree.map(jnp.zeros_like, params) if self.momentum else ()
        return SGDState(jnp.zeros([], jnp.int32), trace)


@dataclasses.dataclass(frozen=True)
class _SGDUpdate:
    learning_rate: Any  # a float or a schedule
    momentum: float
    nesterov: bool

    def __call__(self, grads, state, params=None):
        del params  # part of the optax signature; plain SGD does not need it
        mu = self.momentum
        if not isinstance(state, SGDState) or (state.trace == ()) != (not mu):
            want = "a momentum buffer" if mu else "no momentum buffer (trace=())"
            raise ValueError(f"state: sgd(momentum={mu}) expects an SGDState with {want}, as its "
                             f"init makes, got {type(state).__name__}"
                             + (f" with trace {jax.tree.structure(state.trace)}"
                                if isinstance(state, SGDState) else ""))
        if mu:
            trace = jax.tree.map(lambda g, v: g + mu * v, grads, state.trace)
            step = jax.tree.map(lambda g, v: g + mu * v, grads, trace) if self.nesterov else trace
        else:
            trace, step = (), grads
        lr = self.learning_rate
        eta = lr(state.count) if callable(lr) else lr
        # Cast eta to each leaf's dtype, so a float64 schedule cannot promote float32 params.
        updates = jax.tree.map(lambda s: -jnp.asarray(eta, s.dtype) * s, step)
        return updates, SGDState(state.count + 1, trace)


def apply_updates(params, updates):
    """``params + updates`` leaf by leaf (as ``optax.apply_updates``)."""
    check_like("updates", updates, params)
    return jax.tree.map(lambda p, u: p + u, params, updates)


class TrainState(NamedTuple):
    """Everything a training run carries from one epoch to the next.

    Attributes:
      params: the network's parameters.
      opt_state: the optimiser's state.
      key: a ``jax.random`` key, split once per epoch for the shuffle.
    """

    params: Any
    opt_state: Any
    key: jax.Array


def init_state(key, net: MLP, optimizer, dtype=jnp.float32) -> TrainState:
    """Fresh parameters (see :func:`handbackprop.init_params`), optimiser state and shuffle key.

    Args:
      key: a ``jax.random`` key; split into the initialisation key and the shuffle key.
      net: the network.
      optimizer: an :class:`Optimizer` or optax ``GradientTransformation``.
      dtype: the parameters' floating dtype.
    """
    check_key(key)
    check_net(net)
    init_key, shuffle_key = jax.random.split(key)
    params = init_params(init_key, net, dtype)
    return TrainState(params, optimizer.init(params), shuffle_key)


class ShardedData(NamedTuple):
    """A training set laid out over a data-parallel mesh, each process holding only its rows.

    Made by :func:`shard_data`; :func:`fit` and :func:`train_epoch` take it as it is.

    Attributes:
      x: inputs, a global array of (D r, d0) rows sharded over the mesh's ``"data"`` axis: each
        of its D devices holds r = ceil(n / D) consecutive rows, the last ones zero padding.
      y: labels, sharded and padded like ``x``.
      n: the number of real examples, rows ``0 .. n - 1``.
    """

    x: Any
    y: Any
    n: int


def process_rows(n: int, mesh) -> slice:
    """The rows of an n-example training set that this process holds in a data-parallel run.

    Each of the mesh's D devices holds r = ceil(n / D) consecutive rows; a process those of its
    devices, which must be consecutive on the mesh (as :func:`handbackprop.data_parallel_mesh`
    makes them). Load these rows (``x[process_rows(n, mesh)]``), then :func:`shard_data`.

    Example:
      >>> import handbackprop as hbp
      >>> process_rows(10, hbp.data_parallel_mesh(1))  # one process holds every row
      slice(0, 10, None)
    """
    return _process_rows(check_int("n", n, 1), mesh, jax.process_index())


def _process_rows(n, mesh, process):
    parallel.check_batch("n", 0, mesh)  # checks the mesh
    per_device = -(-n // mesh.shape[parallel.AXIS])
    positions = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == process]
    if not positions or positions != list(range(positions[0], positions[-1] + 1)):
        raise ValueError(f"mesh: process {process}'s devices are not consecutive on the mesh "
                         f"(positions {positions}); make it with data_parallel_mesh")
    return slice(min(positions[0] * per_device, n), min((positions[-1] + 1) * per_device, n))


def shard_data(net: MLP, local_data, mesh, dtype=jnp.float32) -> ShardedData:
    """Lay a training set out over ``mesh`` from the rows each process holds.

    Every process calls it with its own rows, :func:`process_rows` of the whole set, and never
    holds the others': the global arrays are built by ``jax.make_array_from_process_local_data``.
    The processes' row counts are exchanged first (one small all-gather), so every process
    learns n, and a process whose rows fail :func:`check_data` makes every process raise.

    Args:
      net: the network.
      local_data: ``(x, y)``, this process's rows, see :func:`check_data`.
      mesh: a mesh with a ``"data"`` axis.
      dtype: the parameters' floating dtype; integer classes become int32.

    Returns:
      A :class:`ShardedData`.

    Raises:
      ValueError: for rows that fail the checks or are not this process's share.
    """
    from jax.experimental import multihost_utils

    error = None
    try:
        x, y = check_data(net, *_pair("train_data", local_data), where="train_data")
    except (ValueError, TypeError) as e:
        error, x = e, np.zeros((0, net.sizes[0]))
    counts = np.asarray(multihost_utils.process_allgather(
        np.array([len(x), error is not None]))).reshape(-1, 2)
    if error is not None:
        raise error
    if counts[:, 1].any():
        bad = int(np.flatnonzero(counts[:, 1])[0])
        raise ValueError(f"train_data: process {bad}'s rows failed the checks (see its error)")
    n = int(counts[:, 0].sum())
    for p, count in enumerate(counts[:, 0]):
        rows = _process_rows(n, mesh, p)
        if count != rows.stop - rows.start:
            raise ValueError(f"train_data: process {p} holds {count} rows, expected its share of "
                             f"the {n} examples, rows {rows.start} to {rows.stop} "
                             "(see process_rows)")
    devices = mesh.shape[parallel.AXIS]
    per_device = -(-n // devices)
    mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    x, y = _as_host(x, y, dtype)
    pad = len(mine) * per_device - len(x)  # zero rows, never sampled: indices stay below n
    sharding = NamedSharding(mesh, P(parallel.AXIS))
    x, y = (jax.make_array_from_process_local_data(
        sharding, np.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)),
        (devices * per_device, *a.shape[1:])) for a in (x, y))
    return ShardedData(x, y, n)


def train_epoch(net: MLP, optimizer, batch_size: int, state: TrainState, x, y, mesh=None,
                dp: DPSGD | None = None):
    """One epoch: a fresh shuffle, then one SGD step per full mini-batch, as one ``lax.scan``.

    The last ``n mod batch_size`` examples of each shuffled order sit the epoch out, so that
    every step has the same static shape; the order is new each epoch, so none is left out
    for good (Poisson-sampled DP-SGD draws every step's batch afresh instead, see ``dp``).
    Compiled inside, with ``net``, ``optimizer``, ``batch_size``, ``mesh`` and ``dp`` static:
    call it directly. (Jitting it with ``static_argnums=(0, 1, 2, 6, 7)``, as earlier versions
    asked, still works: the checks then see shapes only.)

    Every step is three pieces: sampling (the next B of the shuffle, or a Poisson batch),
    the gradient (the delta recursion; clipped and noised with ``dp``; split over ``mesh``),
    and the optimiser's update. The arguments are checked once, before the scan.

    Args:
      net: the network.
      optimizer: an :class:`Optimizer` or optax ``GradientTransformation``.
      batch_size: B, an int in [1, n].
      state: the :class:`TrainState` before the epoch; its ``opt_state`` as ``optimizer.init``
        makes it.
      x: inputs, (n, d0), of the parameters' dtype; or a :class:`ShardedData` (then ``y`` is
        ``None``), the set laid out over ``mesh``.
      y: labels for the whole set, one per row of ``x`` (see :func:`check_data`).
      mesh: ``None``, or a mesh with a ``"data"`` axis: data parallelism, each mini-batch split
        over its devices (see :func:`handbackprop.sharded_value_and_backprop`), ``state``
        replicated on it (:func:`handbackprop.parallel.replicate`), the data sharded
        (:func:`shard_data`) or replicated.
      dp: ``None``, or :class:`handbackprop.dp.DPSGD` settings: every step's gradient is then
        the noisy clipped mean of :func:`handbackprop.dp_grad`, with a noise key drawn from
        ``state.key``. With ``dp.poisson``, each of the n // B steps draws its batch by
        :func:`handbackprop.dp.poisson_batch` instead of taking the next B of a shuffle, and
        divides the noisy clipped sum by the expected size B (not by the count drawn, which
        would leak it); with a ``mesh`` the padded batch is padded further to a multiple of
        the devices, the padding masked out of the clipped sum.

    Returns:
      ``(state, losses)``: the state after the epoch, and each step's mini-batch loss
      (before its update), shape (n // B,).

    Raises:
      ValueError, TypeError: naming the argument, before any computation.
    """
    x, y, n = _check_epoch(net, optimizer, batch_size, state, x, y, mesh)
    return _epoch(net, optimizer, batch_size, state, x, y, mesh, _as_dpsgd(dp), n)


_STATIC = ("net", "optimizer", "batch_size", "mesh", "dp", "n")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _epoch(net: MLP, optimizer, batch_size, state, x, y, mesh, dp, n):
    """:func:`train_epoch` after its checks: rows ``0 .. n - 1`` of ``x`` are the examples."""
    steps = n // batch_size
    poisson = dp is not None and dp.poisson
    if dp is None:
        key, sample_key = jax.random.split(state.key)
        noise_keys = None
    else:  # a third key only here, so that plain SGD's shuffles are unchanged by DP's existence
        key, sample_key, noise_key = jax.random.split(state.key, 3)
        noise_keys = jax.random.split(noise_key, steps)
    if poisson:  # each step draws its own batch: one sampling key per step
        samples = jax.random.split(sample_key, steps)
    else:
        samples = jax.random.permutation(sample_key, n)[: steps * batch_size].reshape(steps, -1)
    devices = 1 if mesh is None else mesh.shape[parallel.AXIS]
    if x.shape[0] % devices:  # replicated data: whole blocks of rows per device, for _rows
        x, y = (jnp.pad(a, [(0, -a.shape[0] % devices)] + [(0, 0)] * (a.ndim - 1)) for a in (x, y))

    def step(carry, inputs):
        (params, opt_state), (sample, noise_key) = carry, inputs
        # Sampling: the next B of the shuffle, or a Poisson batch padded to a multiple of the
        # devices (the padding masked out).
        idx, mask = poisson_batch(sample, n, batch_size, devices) if poisson else (sample, None)
        xb, yb = _rows(x, idx, mesh), _rows(y, idx, mesh)
        value, grads = _gradient(net, params, xb, yb, mask, noise_key, batch_size, mesh, dp)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (apply_updates(params, updates), opt_state), value

    (params, opt_state), losses = jax.lax.scan(
        step, (state.params, state.opt_state), (samples, noise_keys))
    return TrainState(params, opt_state, key), losses


def _rows(a, idx, mesh):
    """``a[idx]``; with a mesh, ``a`` split by rows over it, and the result split like a batch.

    Each device picks the chosen rows it holds (zeros for the others: the sum is exact) and
    ``psum_scatter`` hands every device its B / D rows of the batch: no device ever needs
    rows it does not hold.
    """
    if mesh is None:
        return a[idx]

    def local(block, idx):
        i = idx - jax.lax.axis_index(parallel.AXIS) * block.shape[0]
        here = (i >= 0) & (i < block.shape[0])
        rows = block[jnp.clip(i, 0, block.shape[0] - 1)]
        rows = jnp.where(here.reshape(-1, *[1] * (block.ndim - 1)), rows, 0)
        return jax.lax.psum_scatter(rows, parallel.AXIS, scatter_dimension=0, tiled=True)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(parallel.AXIS), P()),
                         out_specs=P(parallel.AXIS))(a, idx)


def _gradient(net: MLP, params, x, y, mask, key, batch_size, mesh, dp):
    """A step's loss and gradient: the one place where the training step makes them.

    The batch's sums (clipped with ``dp``, only the examples where ``mask`` in a padded
    Poisson batch, split over ``mesh`` if any: :func:`handbackprop.parallel.sharded_sums`),
    then the gradient from them: the reduction's mean, or DP-SGD's noisy mean over B.
    """
    sums = parallel.sharded_sums(net, params, x, y, mesh, None if dp is None else dp.clip_norm,
                                 mask)
    count = x.shape[0] if mask is None else jnp.maximum(jnp.sum(mask), 1)
    value = finish_loss(net, params, sums.loss, divisor(net, count))
    if dp is None:
        return value, finish(net, params, sums.grads, divisor(net, x.shape[0]))
    return value, noisy_mean(net, params, sums.grads, batch_size, key, dp.clip_norm,
                             dp.noise_multiplier)


def _check_epoch(net, optimizer, batch_size, state, x, y, mesh):
    """:func:`train_epoch`'s checks, once before the scan; ``(x, y, n)``."""
    check_net(net)
    _check_optimizer(optimizer)
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected a TrainState (see init_state), got "
                        f"{type(state).__name__}")
    if isinstance(x, ShardedData):
        if y is not None:
            raise ValueError("y: with x a ShardedData (which holds the labels), expected None")
        if mesh is None:
            raise ValueError("mesh: a ShardedData is laid out over a mesh; pass that mesh")
        (x, y, n), checked = x, True  # shard_data checked the labels
    else:
        n, checked = np.shape(x)[0] if np.ndim(x) else 0, False
        if np.shape(y)[:1] != (n,):
            raise ValueError(f"y: expected {n} labels, one per row of x, got shape {np.shape(y)}")
    x_checked = check_x(net, state.params, x)
    if not checked:
        check_y(net, x_checked, y)
    check_int("batch_size", batch_size, 1, n)
    if mesh is not None:
        parallel.check_batch("batch_size", batch_size, mesh)
    _check_state(optimizer, state)
    return x, y, n


def _check_state(optimizer, state):
    """Raise unless ``state.opt_state`` is shaped as ``optimizer.init`` makes it (e.g. not a
    momentum buffer for plain SGD)."""
    leaves, treedef = jax.tree.flatten(state.params)
    spec = treedef, tuple((np.shape(a), jnp.result_type(a)) for a in leaves)
    try:
        want = _state_layout(optimizer, *spec)
    except TypeError:  # an unhashable optimiser: no cache
        want = _state_layout.__wrapped__(optimizer, *spec)
    got = jax.tree.structure(state.opt_state), [np.shape(a) for a in
                                               jax.tree.leaves(state.opt_state)]
    if want != got:
        raise ValueError(f"state: its opt_state does not match the optimizer's: expected "
                         f"{want[0]}, got {got[0]}")


@functools.lru_cache(maxsize=64)  # checked every epoch: trace optimizer.init once per layout
def _state_layout(optimizer, treedef, leaves):
    """The structure and leaf shapes of ``optimizer.init``'s state for parameters of this
    structure and these ``(shape, dtype)`` leaves."""
    params = treedef.unflatten([jax.ShapeDtypeStruct(s, d) for s, d in leaves])
    want = jax.eval_shape(optimizer.init, params)
    return jax.tree.structure(want), [np.shape(a) for a in jax.tree.leaves(want)]


def _check_optimizer(optimizer):
    if not (callable(getattr(optimizer, "init", None)) and
            callable(getattr(optimizer, "update", None))):
        raise TypeError(f"optimizer: expected an Optimizer (e.g. sgd(0.1)) or an optax "
                        f"GradientTransformation, got {type(optimizer).__name__}")


def _as_dpsgd(dp) -> DPSGD | None:
    """``dp`` as checked :class:`DPSGD` settings (a tuple of 2 or 3 is accepted), or None."""
    if dp is None:
        return None
    if not isinstance(dp, DPSGD):
        if not isinstance(dp, (tuple, list)) or len(dp) not in (2, 3):
            raise TypeError(f"dp: expected DPSGD(clip_norm, noise_multiplier, poisson=False) or a "
                            f"tuple of 2 or 3 of them, got {dp!r}")
        dp = DPSGD(*dp)
    return dp.check()


def _pair(name, data):
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        got = f"an array of shape {np.shape(data)}" if hasattr(data, "shape") else repr(data)
        raise TypeError(f"{name}: expected a pair (x, y), got {got}"[:300])
    return data


def metric_name(net: MLP) -> str:
    """The task's headline metric: ``"accuracy"`` for cross-entropies, ``"r2"`` otherwise."""
    check_net(net)
    return "r2" if net.loss == "squared_error" else "accuracy"


def evaluate(net: MLP, params, x, y) -> dict:
    """The loss and the task's metrics on a data set. Compiled inside (``net`` static);
    concrete labels are checked first (see :func:`handbackprop.mlp.check_y`).

    Args:
      net: the network.
      params: its parameters.
      x: inputs, (n, d0).
      y: labels as :func:`handbackprop.loss` takes them.

    Returns:
      ``{"loss", "accuracy"}`` for the cross-entropies (binary: output > 1/2 vs target > 1/2,
      per output); ``{"loss", "r2", "mse"}`` for squared error (``r2`` as scikit-learn's
      ``r2_score``: 1 - SS_res / SS_tot per output, averaged; ``mse`` over every entry).
      Each a scalar of the parameters' dtype.
    """
    check_net(net)
    check_y(net, check_x(net, params, x), y)
    return _evaluate(net, params, x, y)


@functools.partial(jax.jit, static_argnames="net")
def _evaluate(net: MLP, params, x, y) -> dict:
    """:func:`evaluate` after its checks."""
    out = {"loss": loss(net, params, x, y)}
    o = forward(net, params, x)
    if net.loss == "softmax_cross_entropy":
        labels = y if jnp.issubdtype(y.dtype, jnp.integer) else jnp.argmax(y, axis=-1)
        out["accuracy"] = jnp.mean(jnp.argmax(o, axis=-1) == labels, dtype=o.dtype)
    elif net.loss == "binary_cross_entropy":
        out["accuracy"] = jnp.mean((o > 0.5) == (y > 0.5), dtype=o.dtype)
    else:
        residual = jnp.sum((y - o) ** 2, axis=0)
        total = jnp.sum((y - jnp.mean(y, axis=0)[None, :]) ** 2, axis=0)
        out["r2"] = jnp.mean(1 - residual / total)
        out["mse"] = jnp.mean((y - o) ** 2)
    return out


def check_data(net: MLP, x, y, where: str = "data"):
    """Check a whole data set against the network before training; return it as arrays.

    Args:
      net: the network.
      x: inputs, (n, d0), finite.
      y: softmax cross-entropy: integer classes (n,) in [0, dL) or probability rows (n, dL);
        binary cross-entropy: 0/1 targets (n, dL), or integer 0/1 classes (n,) when dL = 1;
        squared error: floating targets (n, dL), or (n,) when dL = 1; finite.
      where: the argument's name for error messages.

    Returns:
      ``(x, y)`` as NumPy arrays, ``y`` in the form :func:`handbackprop.loss` takes.

    Raises:
      ValueError: naming ``where``, for inputs or labels that do not fit the network's loss.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or x.shape[1] != net.sizes[0] or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{where}: x: expected floating inputs of shape (n, {net.sizes[0]}) for "
                         f"the network's sizes {net.sizes}, got shape {x.shape} dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{where}: x: expected finite inputs, got NaN or infinity")
    n = x.shape[0]
    if y.shape[:1] != (n,):
        raise ValueError(f"{where}: y: expected {n} labels, one per row of x, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating) and not np.all(np.isfinite(y)):
        raise ValueError(f"{where}: y: expected finite targets, got NaN or infinity")
    integer, k = np.issubdtype(y.dtype, np.integer), net.sizes[-1]
    # The forms the command line and fit accept beyond loss()'s: as loss() takes them.
    if integer and y.ndim == 1 and net.loss == "binary_cross_entropy" and k == 1:
        y = y[:, None].astype(x.dtype)
    elif not integer and y.ndim == 1 and net.loss == "squared_error" and k == 1:
        y = y[:, None]
    try:  # the label rules' one home: shapes, dtypes and values
        check_y(net, x, y)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{where}: {e}") from None
    return x, y


def _as_host(x, y, dtype):
    """Inputs and floating targets in the parameters' dtype, integer classes as int32, on the
    host: the same bytes in every process, whatever JAX's float64 setting."""
    dtype = np.dtype(dtype)
    return x.astype(dtype), y.astype(np.int32 if np.issubdtype(y.dtype, np.integer) else dtype)


def fit(net: MLP, optimizer, train_data, *, epochs: int, batch_size: int, key=None,
        state: TrainState | None = None, initial_epoch: int = 0, test_data=None,
        dtype=jnp.float32, callback: Callable | None = None, mesh=None,
        dp: DPSGD | None = None):
    """Train for epochs ``initial_epoch + 1 .. epochs``, one compiled scan per epoch.

    Every argument is checked before any computation. Resuming from a saved ``state``
    after epoch k with ``initial_epoch=k`` gives bit for bit the run that never stopped.

    Args:
      net: the network.
      optimizer: an :class:`Optimizer` (e.g. :func:`sgd`) or optax ``GradientTransformation``.
      train_data: ``(x, y)``, see :func:`check_data`; or, with a ``mesh``, a
        :class:`ShardedData` that each process made from its own rows (:func:`shard_data`).
      epochs: the last epoch's number, >= 1.
      batch_size: B, in [1, n].
      key: a ``jax.random`` key for a fresh start (see :func:`init_state`).
      state: a :class:`TrainState` to continue from instead of ``key``.
      initial_epoch: the number of epochs ``state`` has already done, in [0, epochs].
      test_data: an optional ``(x, y)`` evaluated after every epoch.
      dtype: the parameters' floating dtype for a fresh start.
      callback: called as ``callback(epoch, state, record)`` after every epoch, ``record``
        being that epoch's entry of the history (floats).
      mesh: ``None``, or a mesh with a ``"data"`` axis (:func:`handbackprop.data_parallel_mesh`)
        to train data-parallel: every mini-batch split over its devices, parameters and state
        replicated, the training set sharded by rows (each process keeps only its rows,
        :func:`process_rows`). ``batch_size`` must be divisible by its device count. With
        several processes (``jax.distributed``), every process calls ``fit`` with the same
        arguments, but for a :class:`ShardedData`, which holds each its own rows. The shuffle
        is global and the same for every layout: 1 and 2 processes take the same steps, up
        to the summation order's rounding.
      dp: ``None``, or :class:`handbackprop.dp.DPSGD` ``(clip_norm, noise_multiplier,
        poisson=False)`` (or such a tuple) to train with DP-SGD: every step's gradient is
        :func:`handbackprop.dp_grad`'s noisy clipped mean, the optimiser applies it as any
        other (``net.reduction`` does not apply: DP-SGD averages); ``poisson=True`` draws each
        step's batch by Poisson sampling (see :func:`train_epoch`), with or without ``mesh``.

    Returns:
      ``(state, history)``: the final :class:`TrainState` (``state.params`` are the trained
      parameters) and a dict of per-epoch lists: ``"epoch"``, ``"train_loss"`` (the mean of
      the epoch's mini-batch losses) and, with ``test_data``, ``"test_loss"`` and
      ``"test_<metric>"`` for each metric of :func:`evaluate`.

    Raises:
      ValueError, TypeError: for bad settings, data or labels, naming the argument, before
        any computation.
    """
    check_net(net)
    _check_optimizer(optimizer)
    check_int("epochs", epochs, 1)
    check_int("initial_epoch", initial_epoch, 0, epochs)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a function callback(epoch, state, record) or None, "
                        f"got {callback!r}")
    dp = _as_dpsgd(dp)
    if (key is None) == (state is None):
        raise ValueError("key, state: expected exactly one, a key for a fresh start or a state "
                         f"to continue from, got key={key!r} and state={type(state).__name__}")
    if isinstance(train_data, ShardedData):
        if mesh is None:
            raise ValueError("mesh: a ShardedData train_data is laid out over a mesh; pass it")
        n = train_data.n
    else:
        x, y = check_data(net, *_pair("train_data", train_data), where="train_data")
        n = x.shape[0]
    check_int("batch_size", batch_size, 1, n)
    if mesh is not None:
        parallel.check_batch("batch_size", batch_size, mesh)
    if test_data is not None:
        test_data = check_data(net, *_pair("test_data", test_data), where="test_data")
    if state is None:
        state = init_state(key, net, optimizer, dtype)
    dtype = jax.tree.leaves(state.params)[0].dtype
    if test_data is not None:
        test_data = _as_host(*test_data, dtype)
    if isinstance(train_data, ShardedData):
        x, y = train_data.x, train_data.y
        if x.dtype != dtype:
            raise ValueError(f"train_data: its x has dtype {x.dtype}, the parameters {dtype}: "
                             "make it by shard_data with the parameters' dtype")
    elif mesh is not None:  # every process was given the whole set: each keeps its rows
        rows = process_rows(n, mesh)
        x, y, n = shard_data(net, (x[rows], y[rows]), mesh, dtype)
    else:
        x, y = (jnp.asarray(a) for a in _as_host(x, y, dtype))
    _check_state(optimizer, state)
    if mesh is not None:
        state, test_data = parallel.replicate((state, test_data), mesh)
    history = {"epoch": [], "train_loss": []}
    for epoch in range(initial_epoch + 1, epochs + 1):
        state, losses = _epoch(net, optimizer, batch_size, state, x, y, mesh, dp, n)
        record = {"epoch": epoch, "train_loss": float(jnp.mean(losses))}
        if test_data is not None:
            metrics = _evaluate(net, state.params, *test_data)  # checked above
            record.update({f"test_{k}": float(v) for k, v in metrics.items()})
        for k, v in record.items():
            history.setdefault(k, []).append(v)
        if callback is not None:
            callback(epoch, state, record)
    return state, history
