"""A table of bad inputs through every public function and every subcommand.

The rule: bad input gets a clear ``ValueError``/``TypeError`` naming the argument (with what was
expected and what was received) before any work; under ``jax.jit``, where values are traced, a
bad value gives NaN, never a plausible number; at the command line, one line on stderr and exit
status 2, never a traceback. Each row is ``(id, call, outcome)``; the id starts with the public
name it exercises, and :func:`test_every_public_name_has_a_row` fails when a new public name
has none, so that a new entry point cannot skip the rule.
"""

import inspect
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import handbackprop as hbp
from handbackprop import activations, checkpoint, cli, data, dp, losses, parallel, train


# Plain records (NamedTuples, result dataclasses) and exception types: they hold what they
# are given and compute nothing, so they have no bad input of their own.
_RECORDS = {"Activation", "Cache", "ClippedGrad", "CurvatureReport", "GradientReport", "KronFactors", "GradientStats", "Loss",
            "Optimizer", "SGDState", "TrainState", "activations.Activation", "checkpoint.Checkpoint",
            "checkpoint.CheckpointError", "data.Dataset", "dp.DPSGD", "losses.Loss",
            "train.Optimizer", "train.SGDState", "train.TrainState", "ShardedData", "train.ShardedData"}

NET = hbp.MLP((3, 4, 2), activation="tanh")
SOFTMAX = hbp.MLP((3, 4, 3), activation="tanh", loss="softmax_cross_entropy")
BCE = hbp.MLP((3, 4, 2), activation="tanh", loss="binary_cross_entropy")
KEY = jax.random.key(0)
P = hbp.init_params(KEY, NET, jnp.float64)
PS = hbp.init_params(KEY, SOFTMAX, jnp.float64)
X = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
Y = jnp.zeros((4, 2))
C = jnp.array([0, 1, 2, 1])  # softmax classes
T = jnp.array([[0.0, 1.0]] * 4)  # binary targets
OPT = train.sgd(0.1)
STATE = train.init_state(KEY, NET, OPT, jnp.float64)
MESH = parallel.data_parallel_mesh(1)
NP_X, NP_Y = np.asarray(X), np.asarray(Y)


def jit(f, *static):
    return jax.jit(f, static_argnums=static)


def _raises(errors, match):
    return ("raises", errors, match)


E = (ValueError, TypeError)
NAN = ("nan", None, None)


def _check(predicate):
    return ("check", predicate, None)


def _cli(message):
    return ("cli", None, message)


_FILES = {}  # per-session paths, made by the fixture below


def _file(name):
    return str(_FILES[name])


ROWS = [
    # -- the network and its parameters --------------------------------------------------------
    ("MLP: sizes (3, 4.5, 2)", lambda: hbp.MLP((3, 4.5, 2)), _raises(TypeError, r"^sizes: ")),
    ("MLP: sizes '342'", lambda: hbp.MLP("342"), _raises(TypeError, r"^sizes: ")),
    ("MLP: sizes (3, 0)", lambda: hbp.MLP((3, 0)), _raises(ValueError, r"^sizes: ")),
    ("MLP: loss 'hinge'", lambda: hbp.MLP((3, 2), loss="hinge"), _raises(ValueError, r"^loss: ")),
    ("MLP: l2 -1", lambda: hbp.MLP((3, 2), l2=-1.0), _raises(ValueError, r"^l2: ")),
    ("MLP: l2 '0.1'", lambda: hbp.MLP((3, 2), l2="0.1"), _raises(TypeError, r"^l2: ")),
    ("MLP: bias 1", lambda: hbp.MLP((3, 2), bias=1), _raises(TypeError, r"^bias: ")),
    ("MLP: activation 'swish'", lambda: hbp.MLP((3, 4, 2), activation="swish"), _raises(ValueError, r"activation")),
    ("MLP: reduction 'max'", lambda: hbp.MLP((3, 2), reduction="max"), _raises(ValueError, r"^reduction: ")),
    ("init_params: key 0", lambda: hbp.init_params(0, NET), _raises(TypeError, r"^key: ")),
    ("init_params: net (3, 4, 2)", lambda: hbp.init_params(KEY, (3, 4, 2)), _raises(TypeError, r"^net: ")),
    ("init_params: dtype int32", lambda: hbp.init_params(KEY, NET, jnp.int32), _raises(TypeError, r"^dtype: ")),
    ("forward: x of 2 features", lambda: hbp.forward(NET, P, X[:, :2]), _raises(ValueError, r"^x: ")),
    ("forward: empty x", lambda: hbp.forward(NET, P, X[:0]), _raises(ValueError, r"^x: .*empty")),
    ("forward: ragged nested list x", lambda: hbp.forward(NET, P, [[1.0, 2, 3], [1.0]]), _raises(ValueError, r"^x: .*ragged")),
    ("forward_cache: params of 1 layer", lambda: hbp.forward_cache(NET, P[:1], X), _raises(ValueError, r"^params: ")),
    ("forward_cache: integer x", lambda: hbp.forward_cache(NET, P, X.astype(int)), _raises(TypeError, r"^x: ")),
    ("forward_cache: net a tuple", lambda: hbp.forward_cache((3, 4, 2), P, X), _raises(TypeError, r"^net: ")),
    # -- losses and gradients: labels, batch, shapes -------------------------------------------
    ("loss: label 7 of 3 classes", lambda: hbp.loss(SOFTMAX, PS, X, C.at[0].set(7)), _raises(ValueError, r"^y: softmax_cross_entropy needs class labels in \[0, 3\), got 7 at index 0")),
    ("loss: label -1", lambda: hbp.loss(SOFTMAX, PS, X, C.at[1].set(-1)), _raises(ValueError, r"^y: .*got -1 at index 1")),
    ("loss: bce target 1.5", lambda: hbp.loss(BCE, P, X, T.at[0, 0].set(1.5)), _raises(ValueError, r"^y: binary_cross_entropy needs targets in \[0, 1\]")),
    ("loss: probability row summing to 2", lambda: hbp.loss(SOFTMAX, PS, X, jnp.ones((4, 3)) * 2 / 3), _raises(ValueError, r"^y: .*probability rows")),
    ("loss: empty batch", lambda: hbp.loss(NET, P, X[:0], Y[:0]), _raises(ValueError, r"^x: .*empty")),
    ("loss: y of 3 rows", lambda: hbp.loss(NET, P, X, Y[:3]), _raises(ValueError, r"^y: ")),
    ("loss: traced label 7 gives NaN", lambda: jit(hbp.loss, 0)(SOFTMAX, PS, X, C.at[0].set(7)), NAN),
    ("backprop: empty batch", lambda: hbp.backprop(NET, P, X[:0], Y[:0]), _raises(ValueError, r"^x: .*empty")),
    ("backprop: label 7 of 3 classes", lambda: hbp.backprop(SOFTMAX, PS, X, C.at[0].set(7)), _raises(ValueError, r"^y: ")),
    ("backprop: traced bce target -1 gives NaN", lambda: jit(hbp.backprop, 0)(BCE, P, X, T.at[2, 1].set(-1.0)), NAN),
    ("backprop: mixed float32/bfloat16 params keep their dtypes", lambda: hbp.backprop(NET, (P[0], jax.tree.map(lambda a: a.astype(jnp.bfloat16), P[1])), X, Y), _check(lambda g: g[1]["w"].dtype == jnp.bfloat16)),
    ("value_and_backprop: label 3 of 3 classes", lambda: hbp.value_and_backprop(SOFTMAX, PS, X, C.at[3].set(3)), _raises(ValueError, r"^y: ")),
    ("value_and_backprop: traced label 3 gives NaN", lambda: jit(hbp.value_and_backprop, 0)(SOFTMAX, PS, X, C.at[3].set(3)), NAN),
    ("deltas: label -2", lambda: hbp.deltas(SOFTMAX, PS, X, C.at[0].set(-2)), _raises(ValueError, r"^y: ")),
    ("deltas: x as a string", lambda: hbp.deltas(NET, P, "x", Y), _raises(E, r"^x: ")),
    ("delta_recursion: unchecked label 7 gives NaN", lambda: hbp.delta_recursion(SOFTMAX, PS, hbp.forward_cache(SOFTMAX, PS, X), C.at[0].set(7)), NAN),
    ("per_example_grads: label 7", lambda: hbp.per_example_grads(SOFTMAX, PS, X, C.at[0].set(7)), _raises(ValueError, r"^y: ")),
    ("per_example_grads: method 'loop'", lambda: hbp.per_example_grads(NET, P, X, Y, method="loop"), _raises(ValueError, r"^method: ")),
    ("per_example_grads: traced label 7 gives NaN", lambda: jit(hbp.per_example_grads, 0)(SOFTMAX, PS, X, C.at[0].set(7)), NAN),
    ("per_example_grad_norms: empty batch", lambda: hbp.per_example_grad_norms(NET, P, X[:0], Y[:0]), _raises(ValueError, r"^x: .*empty")),
    ("per_example_grad_norms: label 9", lambda: hbp.per_example_grad_norms(SOFTMAX, PS, X, C.at[2].set(9)), _raises(ValueError, r"^y: ")),
    ("clipped_grad: clip_norm -1", lambda: hbp.clipped_grad(NET, P, X, Y, -1.0), _raises(ValueError, r"^clip_norm: ")),
    ("clipped_grad: empty batch", lambda: hbp.clipped_grad(NET, P, X[:0], Y[:0], 1.0), _raises(ValueError, r"^x: .*empty")),
    ("clipped_grad: label 7", lambda: hbp.clipped_grad(SOFTMAX, PS, X, C.at[0].set(7), 1.0), _raises(ValueError, r"^y: ")),
    ("clipped_grad: traced label 7 gives NaN", lambda: jit(hbp.clipped_grad, 0)(SOFTMAX, PS, X, C.at[0].set(7), 1.0).sum, NAN),
    ("clipped_grad: weights of 3", lambda: hbp.clipped_grad(NET, P, X, Y, 1.0, weights=jnp.ones(3)), _raises(ValueError, r"^weights: ")),
    ("clipped_grad: weights above 1", lambda: hbp.clipped_grad(NET, P, X, Y, 1.0, weights=jnp.full(4, 2.0)), _raises(ValueError, r"^weights: ")),
    ("clipped_grad: NaN weights", lambda: hbp.clipped_grad(NET, P, X, Y, 1.0, weights=jnp.full(4, jnp.nan)), _raises(ValueError, r"^weights: ")),
    ("clipped_grad: a NaN example is dropped, not spread", lambda: hbp.clipped_grad(NET, P, X.at[0, 0].set(jnp.nan), Y, 1.0), _check(lambda g: g.dropped == 1 and all(np.isfinite(a).all() for a in jax.tree.leaves(g.sum)))),
    ("gradient_stats: empty batch", lambda: hbp.gradient_stats(NET, P, X[:0], Y[:0]), _raises(ValueError, r"^x: .*empty")),
    ("gradient_stats: label 7", lambda: hbp.gradient_stats(SOFTMAX, PS, X, C.at[0].set(7)), _raises(ValueError, r"^y: ")),
    # -- DP-SGD --------------------------------------------------------------------------------
    ("dp_grad: empty batch", lambda: hbp.dp_grad(NET, P, X[:0], Y[:0], KEY, 1.0, 1.0), _raises(ValueError, r"^x: .*empty")),
    ("dp_grad: key 0", lambda: hbp.dp_grad(NET, P, X, Y, 0, 1.0, 1.0), _raises(TypeError, r"^key: ")),
    ("dp_grad: noise_multiplier -1", lambda: hbp.dp_grad(NET, P, X, Y, KEY, 1.0, -1.0), _raises(ValueError, r"^noise_multiplier: ")),
    ("dp_grad: label 7", lambda: hbp.dp_grad(SOFTMAX, PS, X, C.at[0].set(7), KEY, 1.0, 1.0), _raises(ValueError, r"^y: ")),
    ("dp_sgd_step: learning_rate 0", lambda: hbp.dp_sgd_step(NET, P, X, Y, KEY, 0.0, 1.0, 1.0), _raises(ValueError, r"^learning_rate: ")),
    ("dp_sgd_step: label 7", lambda: hbp.dp_sgd_step(SOFTMAX, PS, X, C.at[0].set(7), KEY, 0.1, 1.0, 1.0), _raises(ValueError, r"^y: ")),
    ("noisy_mean: batch -2", lambda: hbp.noisy_mean(NET, P, P, -2, KEY, 1.0, 1.0), _raises(ValueError, r"^batch: ")),
    ("noisy_mean: batch 0", lambda: hbp.noisy_mean(NET, P, P, 0, KEY, 1.0, 1.0), _raises(ValueError, r"^batch: ")),
    ("tree_normal: key 0", lambda: hbp.tree_normal(0, P), _raises(TypeError, r"^key: ")),
    ("tree_normal: an empty tree", lambda: hbp.tree_normal(KEY, ()), _raises(E, r"^tree: ")),
    ("dp_epsilon: sampling_rate 2", lambda: hbp.dp_epsilon(1.0, 2.0, 10, 1e-5), _raises(E, r"^sampling_rate: ")),
    ("dp.poisson_capacity: batch_size above n", lambda: dp.poisson_capacity(10, 11), _raises(ValueError, r"^batch_size: ")),
    ("dp.poisson_batch: key 0", lambda: dp.poisson_batch(0, 10, 2), _raises(TypeError, r"^key: ")),
    ("DPSGD: clip_norm 0", lambda: hbp.DPSGD(0.0, 1.0).check(), _raises(ValueError, r"^clip_norm: ")),
    # -- training ------------------------------------------------------------------------------
    ("sgd: learning_rate -1", lambda: hbp.sgd(-1.0), _raises(ValueError, r"^learning_rate: ")),
    ("sgd: momentum 1.5", lambda: hbp.sgd(0.1, momentum=1.5), _raises(ValueError, r"^momentum: ")),
    ("sgd: a momentum state given to plain SGD", lambda: hbp.sgd(0.1).update(P, train.sgd(0.1, 0.9).init(P), P), _raises(E, r"state")),
    ("apply_updates: another structure", lambda: hbp.apply_updates(P, P[:1]), _raises(E, r"updates")),
    ("init_state: key 0", lambda: hbp.init_state(0, NET, OPT), _raises(TypeError, r"^key: ")),
    ("init_state: net a tuple", lambda: hbp.init_state(KEY, (3, 4, 2), OPT), _raises(TypeError, r"^net: ")),
    ("train_epoch: batch_size 0", lambda: hbp.train_epoch(NET, OPT, 0, STATE, NP_X, NP_Y), _raises(E, r"^batch_size: ")),
    ("train_epoch: batch_size=8.0", lambda: hbp.train_epoch(NET, OPT, 8.0, STATE, NP_X, NP_Y), _raises(TypeError, r"^batch_size: ")),
    ("train_epoch: y shorter than x", lambda: hbp.train_epoch(NET, OPT, 2, STATE, NP_X, NP_Y[:3]), _raises(ValueError, r"y")),
    ("evaluate: empty batch", lambda: hbp.evaluate(NET, P, X[:0], Y[:0]), _raises(ValueError, r"^x: .*empty")),
    ("evaluate: label 7", lambda: hbp.evaluate(SOFTMAX, PS, X, C.at[0].set(7)), _raises(ValueError, r"^y: ")),
    ("train.metric_name: net a tuple", lambda: train.metric_name((3, 2)), _raises(TypeError, r"^net: ")),
    ("train.check_data: label 7", lambda: train.check_data(SOFTMAX, NP_X, np.array([0, 1, 2, 7])), _raises(ValueError, r"y: ")),
    ("fit: epochs 0", lambda: hbp.fit(NET, OPT, (NP_X, NP_Y), epochs=0, batch_size=2), _raises(ValueError, r"^epochs: ")),
    ("fit: y shorter than x", lambda: hbp.fit(NET, OPT, (NP_X, NP_Y[:3]), epochs=1, batch_size=2), _raises(ValueError, r"y")),
    ("fit: NaN in y", lambda: hbp.fit(NET, OPT, (NP_X, np.full((4, 2), np.nan)), epochs=1, batch_size=2), _raises(ValueError, r"y")),
    ("fit: dp=(1.0,)", lambda: hbp.fit(NET, OPT, (NP_X, NP_Y), epochs=1, batch_size=2, key=KEY, dp=(1.0,)), _raises(TypeError, r"^dp: ")),
    ("fit: callback=3", lambda: hbp.fit(NET, OPT, (NP_X, NP_Y), epochs=1, batch_size=2, key=KEY, callback=3), _raises(TypeError, r"^callback: ")),
    ("fit: x alone as train_data", lambda: hbp.fit(NET, OPT, NP_X, epochs=1, batch_size=2, key=KEY), _raises(E, r"^train_data: ")),
    # -- the verifier --------------------------------------------------------------------------
    ("check_backprop: label 7 of 3 classes", lambda: hbp.check_backprop(SOFTMAX, PS, X, C.at[0].set(7)), _raises(ValueError, r"^y: ")),
    ("check_backprop: num_directions 0", lambda: hbp.check_backprop(NET, P, X, Y, num_directions=0), _raises(ValueError, r"^num_directions: ")),
    ("verify_gradient: num_directions 0", lambda: hbp.verify_gradient(lambda p: jnp.sum(p ** 2), lambda p: 2 * p, jnp.ones(3), num_directions=0), _raises(ValueError, r"^num_directions: ")),
    ("verify_gradient: a vector loss", lambda: hbp.verify_gradient(lambda p: p, lambda p: p, jnp.ones(3)), _raises(E, r"^loss_fn: ")),
    ("verify_vjp: vjp_fn returns a bare array", lambda: hbp.verify_vjp(jnp.sin, lambda p, g: g, jnp.ones(3)), _raises(ValueError, r"^vjp_fn: expected a tuple")),
    ("verify_jvp: argnums out of range", lambda: hbp.verify_jvp(jnp.sin, lambda p, t: (p, t), jnp.ones(3), argnums=1), _raises(ValueError, r"^argnums: ")),
    ("verify_rule: order 3", lambda: hbp.verify_rule(jnp.sin, jnp.ones(3), order=3), _raises(ValueError, r"^order: ")),
    ("verify_rule: an integer primal only", lambda: hbp.verify_rule(jnp.sin, jnp.arange(3)), _raises(TypeError, r"^primals: ")),
    ("numerical_grad: method 'sideways'", lambda: hbp.numerical_grad(lambda p: jnp.sum(p), jnp.ones(3), method="sideways"), _raises(ValueError, r"^method: ")),
    # -- several devices -----------------------------------------------------------------------
    ("data_parallel_mesh: 0 devices", lambda: hbp.data_parallel_mesh(0), _raises(ValueError, r"^num_devices: ")),
    ("data_parallel_mesh: more devices than there are", lambda: hbp.data_parallel_mesh(64), _raises(ValueError, r"^num_devices: ")),
    ("parallel.initialize: devices 0", lambda: parallel.initialize(0), _raises(E, r"^devices: ")),
    ("process_rows: n 0", lambda: hbp.process_rows(0, MESH), _raises(ValueError, r"^n: ")),
    ("process_rows: not a mesh", lambda: hbp.process_rows(4, "mesh"), _raises(E, r"mesh")),
    ("shard_data: x alone", lambda: hbp.shard_data(NET, NP_X, MESH), _raises(TypeError, r"^train_data: expected a pair")),
    ("shard_data: label 7", lambda: hbp.shard_data(SOFTMAX, (NP_X, np.array([7, 0, 1, 2])), MESH), _raises(ValueError, r"^train_data: y: ")),
    ("parallel.check_batch: not a mesh", lambda: parallel.check_batch("x", 4, "mesh"), _raises(E, r"mesh")),
    ("parallel.replicate: not a mesh", lambda: parallel.replicate(P, "mesh"), _raises(E, r"mesh")),
    ("parallel.shard_batch: not a mesh", lambda: parallel.shard_batch(X, "mesh"), _raises(E, r"mesh")),
    ("sharded_value_and_backprop: empty batch", lambda: hbp.sharded_value_and_backprop(NET, P, X[:0], Y[:0], MESH), _raises(ValueError, r"^x: .*empty")),
    ("sharded_backprop: label 7", lambda: hbp.sharded_backprop(SOFTMAX, PS, X, C.at[0].set(7), MESH), _raises(ValueError, r"^y: ")),
    ("sharded_clipped_grad: clip_norm nan", lambda: hbp.sharded_clipped_grad(NET, P, X, Y, float("nan"), MESH), _raises(ValueError, r"^clip_norm: ")),
    ("parallel.sharded_sums: label 7", lambda: parallel.sharded_sums(SOFTMAX, PS, X, C.at[0].set(7), MESH), _raises(ValueError, r"^y: ")),
    ("parallel.sharded_sums: weights above 1", lambda: parallel.sharded_sums(NET, P, X, Y, MESH, 1.0, jnp.full(4, 2.0)), _raises(ValueError, r"^weights: ")),
    ("parallel.sharded_sums: clip_norm -1", lambda: parallel.sharded_sums(NET, P, X, Y, MESH, -1.0), _raises(ValueError, r"^clip_norm: ")),
    ("parallel.sharded_sums: not a mesh", lambda: parallel.sharded_sums(NET, P, X, Y, "mesh"), _raises(TypeError, r"^mesh: ")),
    ("parallel.sharded_sums: traced label 7 gives NaN", lambda: jax.jit(parallel.sharded_sums, static_argnums=(0, 4, 5))(SOFTMAX, PS, X, C.at[0].set(7), MESH, 1.0).grads, NAN),
    ("sharded_dp_grad: empty batch", lambda: hbp.sharded_dp_grad(NET, P, X[:0], Y[:0], KEY, 1.0, 1.0, MESH), _raises(ValueError, r"^x: .*empty")),
    # -- small modules -------------------------------------------------------------------------
    ("activations.get: 'gelu'", lambda: activations.get("gelu"), _raises(ValueError, r"^activation: unknown activation 'gelu'")),
    ("activations.get: 3", lambda: activations.get(3), _raises(TypeError, r"^activation: ")),
    ("losses.get: 'mse'", lambda: losses.get("mse"), _raises(ValueError, r"^loss: unknown loss 'mse'")),
    ("losses.labels_ok: label 7 is not ok", lambda: losses.labels_ok("softmax_cross_entropy", C.at[0].set(7), 3), _check(lambda ok: np.array_equal(ok, [False, True, True, True]))),
    ("losses.row_sum_tolerance: an integer dtype", lambda: losses.row_sum_tolerance(3, jnp.int32), _raises(ValueError, r"int32")),
    ("losses.output_delta: unchecked label 7 gives NaN", lambda: losses.output_delta(losses.softmax_cross_entropy, activations.softmax, X, jax.nn.softmax(X), C.at[0].set(7)), NAN),
    ("data.load: 'mnist'", lambda: data.load("mnist"), _raises(ValueError, r"^name: unknown data set 'mnist'")),
    ("data.load: test_size 1.0", lambda: data.load("xor", test_size=1.0), _raises(ValueError, r"^test_size: ")),
    ("data.load: a directory named .csv", lambda: data.load(_file("dir.csv")), _raises(ValueError, r"^data file .*dir.csv: not a readable CSV")),
    ("data.load: a truncated .npz", lambda: data.load(_file("cut.npz")), _raises(ValueError, r"^data file .*cut.npz: not a readable .npz")),
    ("data.load: 383 integral labels", lambda: data.load(_file("ages.csv")), _raises(ValueError, r"^task: .*383 distinct")),
    ("data.load: a single class", lambda: data.load(_file("one_class.npz")), _raises(ValueError, r"y: classification needs at least 2 classes")),
    ("data.load: complex X", lambda: data.load(_file("complex.npz")), _raises(ValueError, r"X: expected finite real numbers")),
    ("data.infer_task: text labels", lambda: data.infer_task(__import__("pathlib").Path("a.csv"), np.array(["a", "b"])), _check(lambda task: task == "regression")),
    ("checkpoint.save: state=params", lambda: checkpoint.save(_file("out.npz"), NET, P, 0), _raises(TypeError, r"^state: ")),
    ("checkpoint.save: epoch -1", lambda: checkpoint.save(_file("out.npz"), NET, STATE, -1), _raises(ValueError, r"^epoch: ")),
    ("checkpoint.load: no key member", lambda: checkpoint.load(_file("nokey.npz"), OPT), _raises(checkpoint.CheckpointError, r"key: ")),
    ("checkpoint.load: .npy content", lambda: checkpoint.load(_file("npy.npz"), OPT), _raises(checkpoint.CheckpointError, r"single .npy")),
    ("checkpoint.load: epoch true", lambda: checkpoint.load(_file("epoch_true.npz"), OPT), _raises(checkpoint.CheckpointError, r"epoch: ")),
    ("checkpoint.read_metadata: a truncated .npz", lambda: checkpoint.read_metadata(_file("cut.npz")), _raises(checkpoint.CheckpointError, r"truncated or corrupted")),
    ("checkpoint.net_config: net a tuple", lambda: checkpoint.net_config((3, 2)), _raises(TypeError, r"^net: ")),
    ("checkpoint.net_from_config: sizes '32'", lambda: checkpoint.net_from_config({**checkpoint.net_config(NET), "sizes": "32"}), _raises(TypeError, r"^sizes: ")),
    # -- the command line ----------------------------------------------------------------------
    ("cli train: --seed beyond int64", ["train", "--seed", str(2**64)], _cli("--seed")),
    ("cli train: --epochs 0", ["train", "--epochs", "0"], _cli("--epochs")),
    ("cli train: --plot a folder", lambda: ["train", "--dataset", "xor", "--plot", _file("")], _cli("--plot: ")),
    ("cli train: --save in a missing folder", ["train", "--dataset", "xor", "--save", "/no/such/run.npz"], _cli("--save: ")),
    ("cli train: --dataset a directory named .csv", lambda: ["train", "--dataset", _file("dir.csv")], _cli("dir.csv: not a readable CSV")),
    ("cli train: --dataset a truncated .npz", lambda: ["train", "--dataset", _file("cut.npz")], _cli("cut.npz: not a readable .npz")),
    ("cli train: --resume without a key member", lambda: ["train", "--resume", _file("nokey.npz")], _cli("key: ")),
    ("cli train: --resume with list metadata", lambda: ["train", "--resume", _file("list_meta.npz")], _cli("metadata: expected a dict")),
    ("cli train: --resume with batch_size 0 saved", lambda: ["train", "--resume", _file("batch0.npz")], _cli("settings: batch_size")),
    ("cli train: --sizes 2,x", ["train", "--sizes", "2,x"], _cli("--sizes")),
    ("cli verify: --activation gelu", ["verify", "--activation", "gelu"], _cli("activation")),
    ("cli verify: --sizes 3", ["verify", "--sizes", "3"], _cli("sizes")),
    ("cli verify: --directions 0", ["verify", "--directions", "0"], _cli("directions")),
    ("cli verify: --batch 0", ["verify", "--batch", "0"], _cli("batch")),
    ("cli verify: --batch -1", ["verify", "--batch", "-1"], _cli("batch")),
    ("cli verify: --dtype float16", ["verify", "--dtype", "float16"], _cli("--dtype")),
    ("cli verify-rule: --shapes 4xa", ["verify-rule", "jax.numpy:sin", "--shapes", "4xa"], _cli("--shapes: ")),
    ("cli verify-rule: no such module", ["verify-rule", "no_such_module_xyz:f", "--shapes", "4"], _cli("MODULE:FUNCTION: cannot import")),
    # -- curvature ------------------------------------------------------------------------------
    ("ggn_vector_product: v of 1 layer", lambda: hbp.ggn_vector_product(NET, P, X, Y, P[:1]), _raises(ValueError, r"^v: expected a pytree like params")),
    ("hessian_vector_product: v transposed", lambda: hbp.hessian_vector_product(NET, P, X, Y, (P[0], {**P[1], "w": P[1]["w"].T})), _raises(ValueError, r"^v: \[1\]\['w'\] has shape")),
    ("diag_ggn: mc without key", lambda: hbp.diag_ggn(NET, P, X, Y, method="mc"), _raises(ValueError, r"^key: method='mc'")),
    ("diag_ggn: method 'fisher'", lambda: hbp.diag_ggn(NET, P, X, Y, method="fisher"), _raises(ValueError, r"^method: ")),
    ("per_example_diag_ggn: samples 0", lambda: hbp.per_example_diag_ggn(NET, P, X, Y, method="mc", key=KEY, samples=0), _raises(ValueError, r"^samples: ")),
    ("kfac_factors: kfac without key", lambda: hbp.kfac_factors(NET, P, X, Y, kind="kfac"), _raises(ValueError, r"^key: kind='kfac'")),
    ("diag_hessian: y of 3 rows", lambda: hbp.diag_hessian(NET, P, X, Y[:3]), _raises(ValueError, r"^y: ")),
    ("check_curvature: too many parameters", lambda: hbp.check_curvature(hbp.MLP((100, 50, 2)), hbp.init_params(KEY, hbp.MLP((100, 50, 2))), jnp.ones((1, 100)), jnp.ones((1, 2))), _raises(ValueError, r"^net: check_curvature forms P x P")),
]
ROW_IDS = [r[0] for r in ROWS]
assert len(set(ROW_IDS)) == len(ROW_IDS), "row ids must be unique"


@pytest.fixture(scope="module", autouse=True)
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    _FILES[""] = d
    (d / "dir.csv").mkdir()
    _FILES["dir.csv"] = d / "dir.csv"
    np.savez(d / "ok.npz", X=np.ones((10, 2)), y=np.arange(10) % 2)
    (d / "cut.npz").write_bytes((d / "ok.npz").read_bytes()[:200])
    np.savetxt(d / "ages.csv", np.column_stack([np.ones((766, 1)), np.arange(766) % 383]), delimiter=",")
    np.savez(d / "one_class.npz", X=np.ones((10, 2)), y=np.zeros(10, int))
    np.savez(d / "complex.npz", X=np.ones((10, 2)) * 1j, y=np.arange(10) % 2)
    np.save(d / "a.npy", np.ones(3))
    os.replace(d / "a.npy", d / "npy.npz")
    # What `train --dataset xor --sizes 2,4,1 --activation tanh` would save, so that --resume
    # gets past the network comparison to the damage.
    settings = {"dataset": "xor", "sizes": [2, 4, 1], "activation": "tanh", "batch_size": 2}
    net = hbp.MLP((2, 4, 1), activation="tanh", loss="binary_cross_entropy")
    checkpoint.save(d / "good.npz", net, train.init_state(KEY, net, OPT), 1, {"settings": settings})
    with np.load(d / "good.npz") as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(str(arrays["header"]))
    np.savez(d / "nokey.npz", **{k: v for k, v in arrays.items() if k != "key"})
    for name, edit in [("epoch_true", {"epoch": True}), ("list_meta", {"metadata": [1]}),
                       ("batch0", {"metadata": {"settings": {**settings, "batch_size": 0}}})]:
        np.savez(d / f"{name}.npz", **{**arrays, "header": np.array(json.dumps({**header, **edit}))})
    for name in ("out.npz", "nokey.npz", "npy.npz", "epoch_true.npz", "list_meta.npz", "batch0.npz",
                 "cut.npz", "ages.csv", "one_class.npz", "complex.npz"):
        _FILES[name] = d / name
    return d


def _error_lines(err):
    return [line for line in err.splitlines() if ": error:" in line]


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_bad_input(row, capsys):
    row_id, call, (kind, what, match) = row
    if kind == "raises":
        with pytest.raises(what) as e:
            call()
        message = str(e.value)
        assert __import__("re").search(match, message), (match, message)
    elif kind == "nan":
        out = call()
        assert any(np.isnan(np.asarray(a, np.float64)).any() for a in jax.tree.leaves(out)), out
    elif kind == "check":
        assert what(call())
    else:  # the command line: one line on stderr, exit 2, before any work
        argv = call() if callable(call) else call
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse's own one-line usage error
            rc = e.code
        out, err = capsys.readouterr()
        assert rc == 2 and "Traceback" not in err, err
        lines = _error_lines(err)
        assert len(lines) == 1 and match in lines[0], err
        assert "gradient check" not in out + err


def _public_names():
    """``__all__``'s callables, and the public modules' own functions and classes."""
    names = {n for n in hbp.__all__ if not isinstance(getattr(hbp, n), types.ModuleType)}
    for module in (activations, checkpoint, data, dp, losses, parallel, train):
        short = module.__name__.rsplit(".", 1)[1]
        for n, obj in vars(module).items():
            if (not n.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                    and obj.__module__ == module.__name__ and not hasattr(hbp, n)):
                names.add(f"{short}.{n}")
    return names


def test_every_public_name_has_a_row():
    """A new public function without a row here fails: give it its bad inputs."""
    covered = {r.split(":", 1)[0] for r in ROW_IDS}
    missing = sorted(_public_names() - covered - _RECORDS)
    assert not missing, f"public names without a bad-input row: {missing}"
    assert {"train", "verify"} <= {r.split(":")[0].split()[1] for r in ROW_IDS if r.startswith("cli ")}


def test_a_real_subprocess_gives_one_line_and_exit_2(tmp_path):
    """No traceback from the installed entry point either (a fresh interpreter, real stderr)."""
    (tmp_path / "dir.csv").mkdir()
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-m", "handbackprop", "train", "--dataset",
                          str(tmp_path / "dir.csv")], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "not a readable CSV" in out.stderr


def test_counts():
    """The table's size, as the issue's closing note reports it."""
    kinds = [r[2][0] for r in ROWS]
    print(f"\nbad inputs tried: {len(ROWS)}; clear errors expected: {kinds.count('raises')}; "
          f"documented NaN: {kinds.count('nan')}; other outcomes: {kinds.count('check')}; "
          f"command lines: {kinds.count('cli')}")
    assert len(ROWS) >= 100
