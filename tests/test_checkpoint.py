"""Checkpoints: exact round trips and resumption, atomic writes, and clear errors for
truncated, corrupted, foreign or mismatched files."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import handbackprop as hbp
from handbackprop import checkpoint, data, train

NET = hbp.MLP((2, 6, 1), activation="tanh", loss="binary_cross_entropy", l2=1e-3)
OPT = train.sgd(0.1, momentum=0.9, nesterov=True)


def _leaves(tree):
    return [np.asarray(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                       else a) for a in jax.tree.leaves(tree)]


def _same(a, b):
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def run():
    ds = data.load("xor")

    def fit(**kw):
        return train.fit(NET, OPT, (ds.x_train, ds.y_train), batch_size=32, dtype=jnp.float64, **kw)
    return fit


@pytest.fixture(scope="module")
def saved(run, tmp_path_factory):
    state, history = run(key=jax.random.key(0), epochs=2)
    path = tmp_path_factory.mktemp("ckpt") / "run.npz"
    checkpoint.save(path, NET, state, 2, {"history": history, "note": "xor"})
    return path, state, history


def test_round_trip_and_exact_resume(run, saved):
    path, state, history = saved
    ckpt = checkpoint.load(path, OPT, NET)
    assert _same(ckpt.state, state) and ckpt.epoch == 2
    assert ckpt.metadata == {"history": history, "note": "xor"}
    assert checkpoint.net_config(ckpt.net) == checkpoint.net_config(NET)
    assert checkpoint.load(path, OPT).net.l2 == 1e-3  # the network is rebuilt from the file
    full, _ = run(key=jax.random.key(0), epochs=4)
    resumed, _ = run(state=ckpt.state, initial_epoch=ckpt.epoch, epochs=4)
    assert _same(resumed, full)
    assert checkpoint.read_metadata(path)["epoch"] == 2


def test_optax_state_round_trip(tmp_path):
    opt = optax.adam(1e-3)
    state = train.init_state(jax.random.key(0), NET, opt, jnp.float32)
    checkpoint.save(tmp_path / "a.npz", NET, state, 0)
    assert _same(checkpoint.load(tmp_path / "a.npz", opt, NET).state, state)


def test_write_is_atomic(saved, tmp_path, monkeypatch):
    path, state, _ = saved
    target = tmp_path / "run.npz"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()

    def broken_savez(f, **arrays):  # dies halfway through writing
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(target, NET, state, 3)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["run.npz"]


def test_truncated_corrupted_and_foreign_files(saved, tmp_path):
    raw = saved[0].read_bytes()
    cases = {
        "truncated.npz": raw[: len(raw) // 2],
        "empty.npz": b"",
        # one flipped byte inside the first array's data: its CRC-32 no longer matches
        "corrupted.npz": raw[:300] + bytes([raw[300] ^ 0xFF]) + raw[301:],
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupted"):
            checkpoint.load(tmp_path / name, OPT)
    np.savez(tmp_path / "foreign.npz", header=np.array('{"format": "other"}'))
    with pytest.raises(checkpoint.CheckpointError, match="not a handbackprop-checkpoint file"):
        checkpoint.load(tmp_path / "foreign.npz", OPT)
    np.savez(tmp_path / "pickled.npz", header=np.array([{"a": 1}], dtype=object))
    with pytest.raises(checkpoint.CheckpointError, match="allow_pickle"):
        checkpoint.load(tmp_path / "pickled.npz", OPT)


def test_mismatches(saved):
    path = saved[0]
    with pytest.raises(checkpoint.CheckpointError, match="does not match the expected"):
        checkpoint.load(path, OPT, hbp.MLP((2, 7, 1), activation="tanh", loss="binary_cross_entropy"))
    with pytest.raises(checkpoint.CheckpointError, match="optimiser state does not match"):
        checkpoint.load(path, train.sgd(0.1))  # no momentum buffer expected, one saved
    with pytest.raises(checkpoint.CheckpointError, match="optimiser state does not match"):
        checkpoint.load(path, optax.adam(1e-3))


def test_custom_activation_cannot_be_saved(tmp_path):
    net = hbp.MLP((2, 3, 1), activation=(jnp.sin, jnp.cos))
    state = train.init_state(jax.random.key(0), net, OPT)
    with pytest.raises(ValueError, match=r"net.activation: a custom 'sin' cannot be saved"):
        checkpoint.save(tmp_path / "c.npz", net, state, 0)
    assert os.listdir(tmp_path) == []


def _write_header(tmp_path, saved, name, edit):
    """A copy of the saved checkpoint with its JSON header replaced by ``edit(header)``."""
    with np.load(saved[0]) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(str(arrays["header"]))
    arrays["header"] = np.array(edit(header) if callable(edit) else edit)
    if not isinstance(arrays["header"].item(), str):
        arrays["header"] = np.array(json.dumps(arrays["header"].item()))
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


@pytest.mark.parametrize("name, edit, match", [
    ("list_metadata", lambda h: json.dumps({**h, "metadata": [1, 2]}), "metadata: expected a dict, got list"),
    ("epoch_negative", lambda h: json.dumps({**h, "epoch": -5}), r"epoch: expected an int >= 0, got -5"),
    ("epoch_float", lambda h: json.dumps({**h, "epoch": 2.7}), r"epoch: expected an int >= 0, got 2.7"),
    ("epoch_bool", lambda h: json.dumps({**h, "epoch": True}), r"epoch: expected an int >= 0, got True"),
    ("net_list", lambda h: json.dumps({**h, "net": [2, 6, 1]}), r"net: expected a dict"),
    ("sizes_text", lambda h: json.dumps({**h, "net": {**h["net"], "sizes": "261"}}), r"invalid network configuration: sizes"),
    ("key_impl", lambda h: json.dumps({**h, "key_impl": "nope"}), r"key: not a key of implementation 'nope'"),
    ("nested", "[" * 100_000 + "]" * 100_000, r"truncated or corrupted \(RecursionError"),
    ("not_json", "{nope", r"truncated or corrupted \(JSONDecodeError"),
])
def test_every_header_field_is_validated(saved, tmp_path, name, edit, match):
    path = _write_header(tmp_path, saved, f"{name}.npz", edit)
    with pytest.raises(checkpoint.CheckpointError, match=match):
        checkpoint.load(path, OPT)


def test_missing_members_and_npy_content(saved, tmp_path):
    with np.load(saved[0]) as f:
        arrays = {k: f[k] for k in f.files}
    np.savez(tmp_path / "nokey.npz", **{k: v for k, v in arrays.items() if k != "key"})
    with pytest.raises(checkpoint.CheckpointError, match="key: expected the key's uint32 data, got none"):
        checkpoint.load(tmp_path / "nokey.npz", OPT)
    np.savez(tmp_path / "noheader.npz", **{k: v for k, v in arrays.items() if k != "header"})
    with pytest.raises(checkpoint.CheckpointError, match="no header"):
        checkpoint.load(tmp_path / "noheader.npz", OPT)
    np.save(tmp_path / "array.npy", np.ones(3))
    os.replace(tmp_path / "array.npy", tmp_path / "array.npz")
    with pytest.raises(checkpoint.CheckpointError, match="a single .npy array"):
        checkpoint.load(tmp_path / "array.npz", OPT)


def test_random_bit_flips_are_caught_or_harmless(saved, tmp_path):
    """300 single-bit flips (fixed seed): each gives a CheckpointError, or (a flip in a zip
    field numpy does not read, such as a timestamp) the very same checkpoint."""
    raw = bytearray(saved[0].read_bytes())
    original = checkpoint.load(saved[0], OPT)
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "same": 0}
    for i, bit in enumerate(rng.integers(0, 8 * len(raw), 300)):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path = tmp_path / f"flip{i}.npz"
        path.write_bytes(bytes(flipped))
        try:
            ckpt = checkpoint.load(path, OPT)
        except checkpoint.CheckpointError:
            outcomes["error"] += 1
            continue
        assert _same(ckpt.state, original.state) and ckpt.epoch == original.epoch, bit
        assert ckpt.metadata == original.metadata and ckpt.net == original.net, bit
        outcomes["same"] += 1
    assert outcomes["error"] > 200, outcomes  # most bytes are array data, CRC-checked


def test_a_killed_save_leaves_files_the_next_save_removes(saved, tmp_path):
    _, state, _ = saved
    target = tmp_path / "run.npz"
    # Simulated kills: mkstemp's files, written partly, never replaced nor removed.
    for _ in range(3):
        fd, _tmp = tempfile.mkstemp(prefix=".run.npz.", suffix=".tmp", dir=tmp_path)
        os.write(fd, b"PK\x03\x04 partial")
        os.close(fd)
    other = tmp_path / ".run.npz.a.abcdefgh.tmp"  # another path's temporary: kept
    other.write_bytes(b"")
    assert len(os.listdir(tmp_path)) == 4
    checkpoint.save(target, NET, state, 2)
    assert sorted(os.listdir(tmp_path)) == [other.name, "run.npz"]
    assert checkpoint.load(target, OPT).epoch == 2


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(state="params"), TypeError, r"state: expected a TrainState\(params, opt_state, key\)"),
    (dict(epoch=-1), ValueError, r"epoch: expected an int >= 0, got -1"),
    (dict(epoch=2.0), TypeError, r"epoch: expected an int >= 0, got 2.0"),
    (dict(metadata=[1]), TypeError, r"metadata: expected a dict or None, got list"),
    (dict(metadata={"f": object()}), ValueError, r"metadata: expected JSON-serialisable data"),
])
def test_save_refuses_bad_arguments(saved, tmp_path, kwargs, error, match):
    _, state, _ = saved
    args = {"net": NET, "state": state, "epoch": 2, "metadata": None, **kwargs}
    if args["state"] == "params":
        args["state"] = state.params
    with pytest.raises(error, match=match):
        checkpoint.save(tmp_path / "x.npz", **args)
    assert os.listdir(tmp_path) == []


def test_float64_checkpoint_without_x64_warns(saved):
    """With x64 off a float64 checkpoint can only load as float32: said, not silent."""
    with jax.enable_x64(False):
        with pytest.warns(UserWarning, match=r"float64 arrays loaded as float32 because "
                                             r"jax_enable_x64 is off"):
            ckpt = checkpoint.load(saved[0], OPT)
        assert ckpt.state.params[0]["w"].dtype == jnp.float32
