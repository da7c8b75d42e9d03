"""Helper for tests/test_parallel.py, run as a subprocess (never collected by pytest).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/parallel_worker.py checks OUT
    python tests/parallel_worker.py process OUT PORT PROCESS_ID   # one of two, 2 CPU devices each

``checks`` computes every sharded result next to its single-device counterpart in one process
(JAX starts once) and writes ``OUT/checks.npz`` (arrays, ``case|sharded|i`` and
``case|single|i``) and ``OUT/checks.json`` (device counts, shardings, error messages).
``process`` joins a two-process ``jax.distributed`` run and trains :func:`problem` on all four
devices; each process writes ``OUT/process<i>.npz``. The test compares them with
:func:`train_single`, run in its own one-device process.
"""

import json
import pathlib
import sys

import jax
import numpy as np


def configure():
    """What tests/conftest.py sets in-process: float64 available, rank promotion an error."""
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")


def problem(dtype="float64"):
    """A small classification set, network and optimiser; batch 16 splits over 1, 2 or 4."""
    import handbackprop as hbp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(72, 5)).astype(dtype)  # 72 = 4 steps of 16, plus 8 sitting out
    y = (x[:, 0] + x[:, 1] ** 2 > 1).astype(np.int32) + (x[:, 2] > 0.5)
    net = hbp.MLP((5, 16, 3), activation="tanh", loss="softmax_cross_entropy", l2=1e-3)
    return net, hbp.sgd(0.1, momentum=0.9), (x, y)


def train_single(dtype="float64", epochs=3):
    """The one-device reference run: final parameters (leaves) and per-epoch losses."""
    import handbackprop as hbp

    net, opt, data = problem(dtype)
    state, history = hbp.fit(net, opt, data, epochs=epochs, batch_size=16, key=jax.random.key(0),
                             dtype=np.dtype(dtype))
    return [np.asarray(a) for a in jax.tree.leaves(state.params)], history["train_loss"]


def _error(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def checks(out):
    import jax.numpy as jnp

    import handbackprop as hbp
    from handbackprop import parallel

    mesh4, mesh2 = hbp.data_parallel_mesh(), hbp.data_parallel_mesh(2)
    arrays, meta = {}, {"device_count": jax.device_count(), "mesh4": dict(mesh4.shape),
                        "mesh2": dict(mesh2.shape)}

    def record(case, sharded, single):
        for i, (a, b) in enumerate(zip(jax.tree.leaves(sharded), jax.tree.leaves(single))):
            arrays[f"{case}|sharded|{i}"] = np.asarray(a)
            arrays[f"{case}|single|{i}"] = np.asarray(b)

    nets = {  # (network, whether to check clipping and DP too): one compilation each
        "softmax_mean_l2": (hbp.MLP((5, 12, 8, 3), activation="tanh",
                                    loss="softmax_cross_entropy", l2=0.1), True),
        "squared_sum_l2_nobias": (hbp.MLP((5, 12, 2), activation="relu", l2=0.05,
                                          reduction="sum", bias=False), False),
        "binary": (hbp.MLP((5, 12, 1), activation="elu", loss="binary_cross_entropy"), False),
    }

    def both(net, with_dp, params, x, y, key, other_key):
        """Every sharded result and its single-device counterpart, in one compiled program."""
        out = {"grad": (hbp.sharded_value_and_backprop(net, params, x, y, mesh4),
                        hbp.value_and_backprop(net, params, x, y))}
        if not with_dp:
            return out
        clip_norm = jnp.median(hbp.per_example_grad_norms(net, params, x, y))  # half clipped
        out["clip"] = (hbp.sharded_clipped_grad(net, params, x, y, clip_norm, mesh4),
                       hbp.clipped_grad(net, params, x, y, clip_norm))
        out["dp"] = (hbp.sharded_dp_grad(net, params, x, y, key, clip_norm, 1.1, mesh4),
                     hbp.dp_grad(net, params, x, y, key, clip_norm, 1.1))
        out["dp_other_key"] = hbp.dp_grad(net, params, x, y, other_key, clip_norm, 1.1)
        # Poisson DP-SGD: a padded batch of expected size 12, capacity a multiple of 4.
        idx, mask = hbp.dp.poisson_batch(other_key, 32, 12, multiple_of=4)
        xb, yb = x[idx], y[idx]
        sums = parallel.sharded_sums(net, params, xb, yb, mesh4, clip_norm, mask)
        single = hbp.clipped_grad(net, params, xb, yb, clip_norm, weights=mask)
        out["poisson"] = tuple((hbp.noisy_mean(net, params, total, 12, key, clip_norm, 1.1), n)
                               for total, n in ((sums.grads, sums.dropped),
                                                (single.sum, single.dropped)))
        out["poisson_mask"] = mask
        out["clipped_fraction"] = jnp.mean(out["clip"][0].norms > clip_norm)
        return out

    run = jax.jit(both, static_argnums=(0, 1))
    for dtype in ("float32", "float64"):
        for name, (net, with_dp) in nets.items():
            kp, kx, ky = jax.random.split(jax.random.key(1), 3)
            params = hbp.init_params(kp, net, jnp.dtype(dtype))
            x = jax.random.normal(kx, (32, 5), dtype)
            k = net.sizes[-1]
            y = {"softmax_cross_entropy": lambda: jax.random.randint(ky, (32,), 0, k),
                 "squared_error": lambda: jax.random.normal(ky, (32, k), dtype),
                 "binary_cross_entropy":
                     lambda: jax.random.bernoulli(ky, 0.5, (32, k)).astype(dtype)}[net.loss]()
            case = f"{dtype}/{name}"
            res = run(net, with_dp, params, x, y, jax.random.key(7), jax.random.key(8))
            if with_dp:  # a mesh of 2 of the 4 devices: its own program (one mesh per jit)
                res["grad2"] = (jax.jit(hbp.sharded_value_and_backprop, static_argnums=(0, 4))(
                    net, params, x, y, mesh2), res["grad"][1])
            for what in ("grad", "grad2", "clip", "dp", "poisson"):
                if what in res:
                    record(f"{what}/{case}", *res[what])
            meta[f"shardings/{case}"] = {
                "grads": str(res["grad"][0][1][0]["w"].sharding.spec),
                "grads_devices": len(res["grad"][0][1][0]["w"].sharding.device_set)}
            if with_dp:
                arrays[f"dp_other_key/{case}"] = np.asarray(jax.tree.leaves(res["dp_other_key"])[0])
                norms = res["clip"][0].norms
                meta[f"shardings/{case}"].update(
                    norms=str(norms.sharding.spec), norms_devices=len(norms.sharding.device_set),
                    clipped_fraction=float(res["clipped_fraction"]),
                    poisson_capacity=len(res["poisson_mask"]),
                    poisson_count=int(res["poisson_mask"].sum()))
    for dtype in ("float32", "float64"):
        net, opt, data = problem(dtype)
        state, history = hbp.fit(net, opt, data, epochs=3, batch_size=16, key=jax.random.key(0),
                                 dtype=np.dtype(dtype), mesh=mesh4)
        single, losses = train_single(dtype)
        record(f"train/{dtype}", (jax.tree.leaves(state.params), history["train_loss"]),
               (single, losses))
        meta[f"train/{dtype}/devices"] = len(jax.tree.leaves(state.params)[0].sharding.device_set)

    net, opt, (x, y) = problem()
    params = hbp.init_params(jax.random.key(0), net, jnp.float64)
    meta["errors"] = {
        "value_and_backprop": _error(lambda: hbp.sharded_value_and_backprop(
            net, params, x[:10], y[:10], mesh4)),
        "clipped_grad": _error(lambda: hbp.sharded_clipped_grad(net, params, x[:6], y[:6], 1.0,
                                                                mesh4)),
        "dp_grad": _error(lambda: hbp.sharded_dp_grad(net, params, x[:6], y[:6],
                                                      jax.random.key(0), 1.0, 1.0, mesh4)),
        "fit": _error(lambda: hbp.fit(net, opt, (x, y), epochs=1, batch_size=10,
                                      key=jax.random.key(0), mesh=mesh4)),
        "shard_batch": _error(lambda: parallel.shard_batch({"x": x[:10]}, mesh4)),
        "y_global": _error(lambda: hbp.sharded_value_and_backprop(net, params, x[:8], y[:9],
                                                                  mesh4)),
        "num_devices": _error(lambda: hbp.data_parallel_mesh(5)),
        "mesh": _error(lambda: hbp.sharded_backprop(net, params, x[:8], y[:8], "mesh")),
    }
    placed = parallel.shard_batch((x[:8], y[:8]), mesh4)
    meta["shard_batch_shards"] = [s.data.shape[0] for s in placed[0].addressable_shards]
    np.savez(out / "checks.npz", **arrays)
    (out / "checks.json").write_text(json.dumps(meta, indent=2))


def process(out, port, process_id):
    import handbackprop as hbp

    hbp.parallel.initialize(devices=2, coordinator=f"127.0.0.1:{port}", num_processes=2,
                            process_id=process_id)
    net, opt, data = problem()
    mesh = hbp.data_parallel_mesh()
    state, history = hbp.fit(net, opt, data, epochs=3, batch_size=16, key=jax.random.key(0),
                             dtype=np.float64, mesh=mesh)
    # Every leaf is replicated on all four devices: this process reads its own copy.
    leaves = [np.asarray(a.addressable_data(0)) for a in jax.tree.leaves(state.params)]
    np.savez(out / f"process{process_id}.npz", *leaves, losses=np.array(history["train_loss"]),
             devices=np.array([jax.device_count(), jax.local_device_count(), jax.process_count(),
                               len(mesh.devices.flat)]))
    jax.distributed.shutdown()


if __name__ == "__main__":
    configure()
    mode, out = sys.argv[1], pathlib.Path(sys.argv[2])
    if mode == "checks":
        checks(out)
    elif mode == "process":
        process(out, int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(f"unknown mode {mode!r}")
