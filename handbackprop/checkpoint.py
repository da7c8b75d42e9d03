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

import contextlib
import json
import os
import pathlib
import re
import tempfile
import warnings
import zipfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from handbackprop import activations as _activations
from handbackprop import losses as _losses
from handbackprop.checks import check_int, check_key
from handbackprop.mlp import MLP, check_net, check_params
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
      TypeError: for a ``net`` that is not an :class:`~handbackprop.MLP`.
      ValueError: for a custom ``(g, g')`` activation or custom loss.
    """
    check_net(net)
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


def _stale_temporaries(path):
    """Temporary files that saves of ``path`` killed mid-write (SIGKILL, power loss) left."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name)]


def save(path, net: MLP, state: TrainState, epoch: int, metadata: dict | None = None) -> None:
    """Write a checkpoint atomically (temporary file in the same folder, then ``os.replace``).

    A save killed before ``os.replace`` leaves its temporary file (``.NAME.XXXXXXXX.tmp``)
    behind; the next save of the same path removes such files. Two processes saving one path
    at once are not supported.

    Args:
      path: the file to write (conventionally ``*.npz``).
      net: the network.
      state: the :class:`~handbackprop.train.TrainState` after ``epoch`` epochs.
      epoch: the number of epochs done, >= 0.
      metadata: a JSON-serialisable dict to keep with it (e.g. the run's settings and history).

    Raises:
      TypeError: for a ``state`` that is not a :class:`~handbackprop.train.TrainState`.
      ValueError: for a network that cannot be saved (custom activation or loss), parameters
        that do not match it, a negative epoch, or metadata that is not a JSON dict;
        nothing is written.
    """
    path = pathlib.Path(path)
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected a TrainState(params, opt_state, key) such as "
                        f"init_state or fit return, got {type(state).__name__}")
    check_params(net, state.params)
    check_int("epoch", epoch, 0)
    check_key(state.key)
    if not isinstance(metadata, (dict, type(None))):
        raise TypeError(f"metadata: expected a dict or None, got {type(metadata).__name__}")
    typed = _is_typed_key(state.key)
    try:
        header = json.dumps({
            "format": FORMAT, "version": VERSION, "net": net_config(net), "epoch": int(epoch),
            "key_impl": str(jax.random.key_impl(state.key)) if typed else None,
            "metadata": metadata or {},
        })
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"metadata: expected JSON-serialisable data, got {e}") from None
    arrays = {"header": np.array(header)}
    for l, layer in enumerate(state.params):
        arrays.update({f"params/{l}/{k}": np.asarray(v) for k, v in layer.items()})
    arrays.update({f"opt_state/{i}": np.asarray(v)
                   for i, v in enumerate(jax.tree.leaves(state.opt_state))})
    arrays["key"] = np.asarray(jax.random.key_data(state.key) if typed else state.key)
    stale = _stale_temporaries(path) if path.parent.is_dir() else []
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
    for p in stale:  # only once this save has succeeded
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _read(path):
    """All arrays and the validated header, or a :class:`CheckpointError`."""
    try:
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not a .npz archive")
        with f:
            arrays = {k: f[k] for k in f.files}  # reading every member checks its CRC-32
        if "header" not in arrays or arrays["header"].shape != () or arrays["header"].dtype.kind != "U":
            raise ValueError("no header string")
        header = json.loads(str(arrays.pop("header")))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, RecursionError,
            UnicodeError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupted "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if header.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {header.get('version')!r}, "
                              f"this library reads version {VERSION}")
    _check_header(path, header)
    return header, arrays


def _check_header(path, header):
    """Every header field of the right type, so nothing downstream meets a surprise."""
    epoch, impl = header.get("epoch"), header.get("key_impl")
    problems = [
        (not isinstance(header.get("net"), dict), f"net: expected a dict, got {header.get('net')!r}"),
        (isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0,
         f"epoch: expected an int >= 0, got {epoch!r}"),
        (not (impl is None or isinstance(impl, str)), f"key_impl: expected a name, got {impl!r}"),
        (not isinstance(header.get("metadata"), dict),
         f"metadata: expected a dict, got {type(header.get('metadata')).__name__}"),
    ]
    for bad, what in problems:
        if bad:
            raise CheckpointError(f"{path}: invalid header: {what[:200]}")


def read_metadata(path) -> dict:
    """A checkpoint's header: ``{"net", "epoch", "metadata", ...}``, without building arrays.

    Raises:
      CheckpointError: for a file that is not a readable checkpoint.
    """
    return _read(path)[0]


def load(path, optimizer, net: MLP | None = None) -> Checkpoint:
    """Read a checkpoint and rebuild its training state.

    Arrays keep their saved dtypes; float64 ones with ``jax_enable_x64`` off become float32,
    with a warning (enable x64 before loading to resume such a run exactly).

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
    narrowed = sorted({str(a.dtype) for a in arrays.values()
                       if jax.dtypes.canonicalize_dtype(a.dtype) != a.dtype})
    if narrowed:
        warnings.warn(f"{path}: {', '.join(narrowed)} arrays loaded as "
                      f"{jax.dtypes.canonicalize_dtype(np.float64)} because jax_enable_x64 is "
                      "off; enable it before loading to resume the run exactly", stacklevel=2)
    try:
        params = tuple({k: jnp.asarray(arrays[f"params/{l}/{k}"]) for k in layer}
                       for l, layer in enumerate(_layer_keys(saved)))
        check_params(saved, params)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: parameters do not match the network: {e}") from e
    template, treedef = jax.tree.flatten(optimizer.init(params))
    names = [k for k in arrays if k.startswith("opt_state/")]
    if sorted(names) != sorted(f"opt_state/{i}" for i in range(len(names))):
        raise CheckpointError(f"{path}: optimiser state members are not opt_state/0.."
                              f"{len(names) - 1}: {sorted(names)[:10]}")
    leaves = [arrays[f"opt_state/{i}"] for i in range(len(names))]
    canonical = jax.dtypes.canonicalize_dtype
    got = [(a.shape, canonical(a.dtype)) for a in leaves]
    want = [(np.shape(a), canonical(np.asarray(a).dtype)) for a in template]
    if got != want:
        raise CheckpointError(f"{path}: optimiser state does not match the optimiser (saved with "
                              f"other settings?): saved leaves {got}, expected {want}")
    state = TrainState(params, jax.tree.unflatten(treedef, [jnp.asarray(a) for a in leaves]),
                       _key(path, header.get("key_impl"), arrays))
    return Checkpoint(saved, state, header["epoch"], header["metadata"])


def _key(path, impl, arrays):
    """The shuffle key from its saved data: typed (with its implementation) or raw uint32."""
    data = arrays.get("key")
    if data is None or data.dtype != np.uint32:
        got = "none" if data is None else f"dtype {data.dtype}"
        raise CheckpointError(f"{path}: key: expected the key's uint32 data, got {got}")
    try:
        key = jax.random.wrap_key_data(data, impl=impl) if impl else jnp.asarray(data)
        check_key(key)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: key: not a key of implementation {impl!r}: "
                              f"{str(e)[:200]}") from e
    return key


def _layer_keys(net):
    return [("w", "b") if net.bias else ("w",)] * net.num_layers
