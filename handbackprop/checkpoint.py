"""Checkpoints: a training run's whole state in one ``.npz``, written atomically.

A checkpoint holds the parameters, the optimiser state (its leaves, in ``jax.tree`` order),
the shuffle key's data, and a JSON header (stored in the same file, as a string array):
the format version, the network configuration, the epoch, the key's implementation and any
JSON-serialisable user metadata. Arrays keep their dtypes and bits, so a run resumed from the
checkpoint of epoch k is bit for bit the run that never stopped.

Writing goes to a temporary file in the target's folder, then ``os.replace``: a crash or an
error mid-write leaves the previous checkpoint as it was. Reading uses
``np.load(..., allow_pickle=False)`` and checks every array against the network and optimiser;
anything truncated, corrupted or mismatched raises :class:`CheckpointError`.
"""

import json
import os
import pathlib
import tempfile
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from handbackprop import activations as _activations
from handbackprop import losses as _losses
from handbackprop.mlp import MLP, check_params
from handbackprop.train import TrainState

FORMAT = "handbackprop-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not match the network or optimiser."""


class Checkpoint(NamedTuple):
    """A loaded checkpoint.

    Attributes:
      net: the network, rebuilt from its saved configuration.
      state: the :class:`~handbackprop.train.TrainState` (params, optimiser state, key).
      epoch: the number of epochs done.
      metadata: the user metadata given to :func:`save` (a dict).
    """

    net: MLP
    state: TrainState
    epoch: int
    metadata: dict


def _builtin_name(spec, table, where):
    """The registered name of a built-in activation or loss; custom ones cannot be saved."""
    obj = (_activations.get(spec, where) if table is _activations.ACTIVATIONS
           else _losses.get(spec))
    if table.get(obj.name) != obj:
        raise ValueError(f"{where}: a custom {obj.name!r} cannot be saved in a checkpoint "
                         f"(its functions are code, not data); use one of {sorted(table)}")
    return obj.name


def net_config(net: MLP) -> dict:
    """The network's configuration as JSON-ready data, one activation name per hidden layer.

    Raises:
      ValueError: for a custom ``(g, g')`` activation or custom loss.
    """
    acts = _activations.ACTIVATIONS
    return {
        "sizes": list(net.sizes),
        "activation": [_builtin_name(a, acts, "net.activation") for a in net.hidden_activations],
        "output_activation": _builtin_name(net.output_activation, acts, "net.output_activation"),
        "loss": _builtin_name(net.loss, _losses.LOSSES, "net.loss"),
        "bias": net.bias,
        "l2": net.l2,
        "reduction": net.reduction,
    }


def net_from_config(config: dict) -> MLP:
    """The :class:`~handbackprop.MLP` that :func:`net_config` describes."""
    return MLP(tuple(config["sizes"]), activation=tuple(config["activation"]),
               output_activation=config["output_activation"], loss=config["loss"],
               bias=config["bias"], l2=config["l2"], reduction=config["reduction"])


def _is_typed_key(key):
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)


def save(path, net: MLP, state: TrainState, epoch: int, metadata: dict | None = None) -> None:
    """Write a checkpoint atomically (temporary file in the same folder, then ``os.replace``).

    Args:
      path: the file to write (conventionally ``*.npz``).
      net: the network.
      state: the :class:`~handbackprop.train.TrainState` after ``epoch`` epochs.
      epoch: the number of epochs done, >= 0.
      metadata: JSON-serialisable data to keep with it (e.g. the run's settings and history).

    Raises:
      ValueError: for a network that cannot be saved (custom activation or loss), parameters
        that do not match it, or metadata that is not JSON; nothing is written.
    """
    path = pathlib.Path(path)
    check_params(net, state.params)
    typed = _is_typed_key(state.key)
    header = json.dumps({
        "format": FORMAT, "version": VERSION, "net": net_config(net), "epoch": int(epoch),
        "key_impl": str(jax.random.key_impl(state.key)) if typed else None,
        "metadata": metadata or {},
    })
    arrays = {"header": np.array(header)}
    for l, layer in enumerate(state.params):
        arrays.update({f"params/{l}/{k}": np.asarray(v) for k, v in layer.items()})
    arrays.update({f"opt_state/{i}": np.asarray(v)
                   for i, v in enumerate(jax.tree.leaves(state.opt_state))})
    arrays["key"] = np.asarray(jax.random.key_data(state.key) if typed else state.key)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make the checkpoint private
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read(path):
    """All arrays and the parsed header, or a :class:`CheckpointError`."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}  # reading every member checks its CRC-32
        header = json.loads(str(arrays.pop("header")))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupted "
                              f"({type(e).__name__}: {e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {header.get('version')!r}, "
                              f"this library reads version {VERSION}")
    return header, arrays


def read_metadata(path) -> dict:
    """A checkpoint's header: ``{"net", "epoch", "metadata", ...}``, without building arrays.

    Raises:
      CheckpointError: for a file that is not a readable checkpoint.
    """
    return _read(path)[0]


def load(path, optimizer, net: MLP | None = None) -> Checkpoint:
    """Read a checkpoint and rebuild its training state.

    Args:
      path: a file written by :func:`save`.
      optimizer: the optimiser to continue with; its ``init`` gives the state's structure,
        which the saved leaves must match in number, shapes and dtypes.
      net: if given, the saved network configuration must equal this one.

    Returns:
      A :class:`Checkpoint`.

    Raises:
      CheckpointError: for a truncated, corrupted or mismatched file, naming what differs.
    """
    header, arrays = _read(path)
    try:
        saved = net_from_config(header["net"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid network configuration: {e}") from e
    if net is not None and net_config(net) != net_config(saved):
        raise CheckpointError(f"{path}: the checkpoint's network {net_config(saved)} does not "
                              f"match the expected {net_config(net)}")
    try:
        params = tuple({k: jnp.asarray(arrays[f"params/{l}/{k}"]) for k in layer}
                       for l, layer in enumerate(_layer_keys(saved)))
        check_params(saved, params)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: parameters do not match the network: {e}") from e
    template, treedef = jax.tree.flatten(optimizer.init(params))
    leaves = [arrays[k] for k in sorted((k for k in arrays if k.startswith("opt_state/")),
                                        key=lambda k: int(k.split("/")[1]))]
    got = [(a.shape, a.dtype) for a in leaves]
    want = [(np.shape(a), np.asarray(a).dtype) for a in template]
    if got != want:
        raise CheckpointError(f"{path}: optimiser state does not match the optimiser (saved with "
                              f"other settings?): saved leaves {got}, expected {want}")
    impl = header.get("key_impl")
    key = jax.random.wrap_key_data(arrays["key"], impl=impl) if impl else jnp.asarray(arrays["key"])
    state = TrainState(params, jax.tree.unflatten(treedef, [jnp.asarray(a) for a in leaves]), key)
    return Checkpoint(saved, state, int(header["epoch"]), header["metadata"])


def _layer_keys(net):
    return [("w", "b") if net.bias else ("w",)] * net.num_layers
