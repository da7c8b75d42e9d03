"""Checkpoints: exact round trips and resumption, atomic writes, and clear errors for
truncated, corrupted, foreign or mismatched files."""

import os

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
