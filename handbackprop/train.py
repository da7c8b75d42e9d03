"""Training: the note's three-step loop (loss, gradient, ``w <- w - eta grad``), compiled.

- :func:`sgd` is an optimiser in the optax style: a pair of pure functions
  ``init(params) -> state`` and ``update(grads, state, params) -> (updates, state)``, with
  :func:`apply_updates` adding the updates. Any optax ``GradientTransformation``
  (``optax.sgd``, ``optax.adam``, ...) fits the same slots.
- :func:`train_epoch` shuffles with a PRNG key, then runs every mini-batch step as one
  ``jax.lax.scan``: no Python runs per step.
- :func:`evaluate` gives the loss and the task's metric; :func:`fit` runs the epochs, keeps a
  per-epoch history and checks its inputs before any computation.

Every gradient is :func:`handbackprop.value_and_backprop`'s, the hand-written delta recursion.
"""

import dataclasses
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from handbackprop import parallel
from handbackprop.backprop import l2_penalty, loss, value_and_backprop
from handbackprop.checks import check_int, check_scalar
from handbackprop.dp import DPSGD, dp_grad, noisy_mean, poisson_batch
from handbackprop.mlp import MLP, check_y, forward, forward_cache, init_params
from handbackprop.per_example import clipped_grad


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
    init_key, shuffle_key = jax.random.split(key)
    params = init_params(init_key, net, dtype)
    return TrainState(params, optimizer.init(params), shuffle_key)


def train_epoch(net: MLP, optimizer, batch_size: int, state: TrainState, x, y, mesh=None,
                dp: DPSGD | None = None):
    """One epoch: a fresh shuffle, then one SGD step per full mini-batch, as one ``lax.scan``.

    The last ``n mod batch_size`` examples of each shuffled order sit the epoch out, so that
    every step has the same static shape; the order is new each epoch, so none is left out
    for good (Poisson-sampled DP-SGD draws every step's batch afresh instead, see ``dp``).
    Jit with ``static_argnums=(0, 1, 2, 6, 7)``.

    Args:
      net: the network (static).
      optimizer: an :class:`Optimizer` or optax ``GradientTransformation`` (static).
      batch_size: B, in [1, n] (static).
      state: the :class:`TrainState` before the epoch.
      x: inputs, (n, d0), of the parameters' dtype.
      y: labels for the whole set, checked (see :func:`check_data`).
      mesh: ``None``, or a mesh with a ``"data"`` axis (static): data parallelism, each
        mini-batch split over its devices (see :func:`handbackprop.sharded_value_and_backprop`);
        ``state``, ``x`` and ``y`` replicated on it (:func:`handbackprop.parallel.replicate`).
      dp: ``None``, or :class:`handbackprop.dp.DPSGD` settings (static): every step's gradient
        is then :func:`handbackprop.dp_grad` (clipped per example, noised, averaged), with a
        noise key drawn from ``state.key``. With ``dp.poisson``, each of the n // B steps
        draws its batch by :func:`handbackprop.dp.poisson_batch` instead of taking the next B
        of a shuffle, and divides the noisy clipped sum by the expected size B (not by the
        count drawn, which would leak it); not with a ``mesh``.

    Returns:
      ``(state, losses)``: the state after the epoch, and each step's mini-batch loss
      (before its update), shape (n // B,).
    """
    n = x.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size: expected an int in [1, {n}] (the data set's size), "
                         f"got {batch_size}")
    if mesh is not None:
        parallel.check_batch("batch_size", batch_size, mesh)
    poisson = dp is not None and dp.check(mesh).poisson
    steps = n // batch_size
    if dp is None:
        key, shuffle_key = jax.random.split(state.key)
        noise_keys = None
    else:  # a third key only here, so that plain SGD's shuffles are unchanged by DP's existence
        key, shuffle_key, noise_key = jax.random.split(state.key, 3)
        noise_keys = jax.random.split(noise_key, steps)
    if poisson:  # each step draws its own batch: one sampling key per step
        batches = jax.random.split(shuffle_key, steps)
    else:
        batches = jax.random.permutation(shuffle_key, n)[: steps * batch_size].reshape(steps, -1)

    def step(carry, inputs):
        (params, opt_state), (batch, noise_key) = carry, inputs
        if poisson:
            idx, mask = poisson_batch(batch, n, batch_size)
        else:
            idx, mask = batch, None
        xb, yb = x[idx], y[idx]
        # The three-step loop: loss and gradient by the delta recursion, then the update.
        if poisson:  # padded: only the chosen examples count; the mean divides by B, as q n
            value = _masked_loss(net, params, xb, yb, mask)
            clipped = clipped_grad(net, params, xb, yb, dp.clip_norm, weights=mask)
            grads = noisy_mean(net, params, clipped.sum, batch_size, noise_key, dp.clip_norm,
                               dp.noise_multiplier)
        elif dp is not None:
            value = loss(net, params, xb, yb)  # reported only; XLA shares its forward pass
            grads = (dp_grad(net, params, xb, yb, noise_key, dp.clip_norm, dp.noise_multiplier)
                     if mesh is None else parallel.sharded_dp_grad(
                         net, params, xb, yb, noise_key, dp.clip_norm, dp.noise_multiplier, mesh))
        elif mesh is None:
            value, grads = value_and_backprop(net, params, xb, yb)
        else:
            value, grads = parallel.sharded_value_and_backprop(net, params, xb, yb, mesh)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (apply_updates(params, updates), opt_state), value

    (params, opt_state), losses = jax.lax.scan(
        step, (state.params, state.opt_state), (batches, noise_keys))
    return TrainState(params, opt_state, key), losses


def _masked_loss(net: MLP, params, x, y, mask):
    """The loss of the examples where ``mask`` (bool) is True in a padded batch: their mean
    (or sum, as ``net.reduction``) plus the L2 term."""
    cache = forward_cache(net, params, x)
    e = net.loss_fn.value(cache.ss[-1], cache.xs[-1], check_y(net, cache.xs[0], y))
    total = jnp.sum(jnp.where(mask, e, 0))
    if net.reduction == "mean":
        total = total / jnp.maximum(jnp.sum(mask), 1)
    return total + l2_penalty(net, params)


def metric_name(net: MLP) -> str:
    """The task's headline metric: ``"accuracy"`` for cross-entropies, ``"r2"`` otherwise."""
    return "r2" if net.loss == "squared_error" else "accuracy"


def evaluate(net: MLP, params, x, y) -> dict:
    """The loss and the task's metrics on a data set. Jit with ``static_argnums=0``.

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
        squared error: floating targets (n, dL), or (n,) when dL = 1.
      where: the argument's name for error messages.

    Returns:
      ``(x, y)`` as NumPy arrays, ``y`` in the form :func:`handbackprop.loss` takes.

    Raises:
      ValueError: naming ``where``, for inputs or labels that do not fit the network's loss.
    """
    x, y = np.asarray(x), np.asarray(y)
    k = net.sizes[-1]
    if x.ndim != 2 or x.shape[1] != net.sizes[0] or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{where}: x: expected floating inputs of shape (n, {net.sizes[0]}) for "
                         f"the network's sizes {net.sizes}, got shape {x.shape} dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{where}: x: expected finite inputs, got NaN or infinity")
    n = x.shape[0]
    if y.shape[:1] != (n,):
        raise ValueError(f"{where}: y: expected {n} labels, one per row of x, got shape {y.shape}")
    integer = np.issubdtype(y.dtype, np.integer)
    if integer and y.ndim == 1 and net.loss == "softmax_cross_entropy":
        if n and (y.min() < 0 or y.max() >= k):
            raise ValueError(f"{where}: y: softmax_cross_entropy needs class labels in [0, {k}) "
                             f"for the network's {k} outputs, got labels {y.min()} to {y.max()}")
        return x, y
    if integer and y.ndim == 1 and net.loss == "binary_cross_entropy" and k == 1:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{where}: y: binary_cross_entropy needs 0/1 labels, "
                             f"got values {np.unique(y)[:10].tolist()}")
        return x, y[:, None].astype(x.dtype)
    if not integer and y.ndim == 1 and net.loss == "squared_error" and k == 1:
        y = y[:, None]
    if integer or y.shape != (n, k) or not np.issubdtype(y.dtype, np.floating):
        expected = {
            "softmax_cross_entropy": f"integer classes of shape ({n},) "
                                     f"or probability rows ({n}, {k})",
            "binary_cross_entropy": f"0/1 targets of shape ({n}, {k})"
            + (f" or integer 0/1 classes ({n},)" if k == 1 else ""),
            "squared_error": f"floating targets of shape ({n}, {k})",
        }[net.loss]
        kind = "integer class labels" if integer else "floating targets"
        raise ValueError(f"{where}: y: {net.loss} with {k} outputs expects {expected}, "
                         f"got {kind} of shape {y.shape}")
    if net.loss == "binary_cross_entropy" and not np.all((y >= 0) & (y <= 1)):
        raise ValueError(f"{where}: y: binary_cross_entropy needs targets in [0, 1]")
    if net.loss == "softmax_cross_entropy" and np.any(y < 0):
        raise ValueError(f"{where}: y: softmax_cross_entropy needs non-negative probability rows")
    return x, y


def _as_device(x, y, dtype):
    """Inputs and floating targets in the parameters' dtype; integer classes as int32."""
    y = jnp.asarray(y, jnp.int32 if np.issubdtype(y.dtype, np.integer) else dtype)
    return jnp.asarray(x, dtype), y


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
      train_data: ``(x, y)``, see :func:`check_data`.
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
        to train data-parallel: every mini-batch split over its devices, parameters, state and
        data replicated. ``batch_size`` must be divisible by its device count. With several
        processes (``jax.distributed``), every process calls ``fit`` with the same arguments.
      dp: ``None``, or :class:`handbackprop.dp.DPSGD` ``(clip_norm, noise_multiplier,
        poisson=False)`` to train with DP-SGD: every step's gradient is
        :func:`handbackprop.dp_grad`, the optimiser applies it as any other
        (``net.reduction`` does not apply: DP-SGD averages); ``poisson=True`` draws each
        step's batch by Poisson sampling (see :func:`train_epoch`), not with ``mesh``.

    Returns:
      ``(state, history)``: the final :class:`TrainState` (``state.params`` are the trained
      parameters) and a dict of per-epoch lists: ``"epoch"``, ``"train_loss"`` (the mean of
      the epoch's mini-batch losses) and, with ``test_data``, ``"test_loss"`` and
      ``"test_<metric>"`` for each metric of :func:`evaluate`.

    Raises:
      ValueError: for bad epochs, batch size, data or labels, before any computation.
    """
    if not isinstance(net, MLP):
        raise TypeError(f"net: expected an MLP, got {type(net).__name__}")
    check_int("epochs", epochs, 1)
    check_int("initial_epoch", initial_epoch, 0, epochs)
    x, y = check_data(net, *train_data, where="train_data")
    check_int("batch_size", batch_size, 1, x.shape[0])
    if mesh is not None:
        parallel.check_batch("batch_size", batch_size, mesh)
    if dp is not None:
        dp = DPSGD(*dp).check(mesh)
    if test_data is not None:
        test_data = check_data(net, *test_data, where="test_data")
    if (key is None) == (state is None):
        raise ValueError("key, state: expected exactly one, a key for a fresh start or a state "
                         f"to continue from, got key={key!r} and state={type(state).__name__}")
    if state is None:
        state = init_state(key, net, optimizer, dtype)
    dtype = jax.tree.leaves(state.params)[0].dtype
    x, y = _as_device(x, y, dtype)
    if test_data is not None:
        test_data = _as_device(*test_data, dtype)
    if mesh is not None:
        state, x, y, test_data = parallel.replicate((state, x, y, test_data), mesh)
    # Looked up here, not bound at import, so that tests can count traces of train_epoch.
    epoch_fn = jax.jit(train_epoch, static_argnums=(0, 1, 2, 6, 7))
    eval_fn = jax.jit(evaluate, static_argnums=0)
    history = {"epoch": [], "train_loss": []}
    for epoch in range(initial_epoch + 1, epochs + 1):
        state, losses = epoch_fn(net, optimizer, batch_size, state, x, y, mesh, dp)
        record = {"epoch": epoch, "train_loss": float(jnp.mean(losses))}
        if test_data is not None:
            metrics = eval_fn(net, state.params, *test_data)
            record.update({f"test_{k}": float(v) for k, v in metrics.items()})
        for k, v in record.items():
            history.setdefault(k, []).append(v)
        if callback is not None:
            callback(epoch, state, record)
    return state, history
