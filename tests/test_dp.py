"""DP-SGD: the noise's distribution, the noiseless step, jit, errors, and the accounting.

float64 comparisons use rtol = 1e-10, atol = 1e-12: the same sums in other orders (see
test_per_example.py). The noise test is statistical, with a fixed seed; its bounds are
derived where they are used.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, make_problem

import handbackprop as hbp

EXACT64 = dict(rtol=1e-10, atol=1e-12)
NET = hbp.MLP((4, 6, 3), activation="tanh", loss="softmax_cross_entropy", l2=0.05)
BATCH = 9


def _flat(tree, lead=()):
    return np.concatenate([np.reshape(a, lead + (-1,)) for a in jax.tree.leaves(tree)], -1)


def _plus_l2(grads, params, l2):
    return tuple({**g, "w": g["w"] + l2 * p["w"]} for g, p in zip(grads, params))


def test_noise_has_the_stated_mean_and_std():
    """Noise on the clipped sum has std sigma C, so on the returned mean sigma C / B."""
    params, x, y = make_problem(NET, BATCH)
    clip, sigma, draws = 0.5, 1.3, 200
    noisy = jax.jit(jax.vmap(hbp.dp_grad, in_axes=(None, None, None, None, 0, None, None)),
                    static_argnums=0)
    keys = jax.random.split(jax.random.key(42), draws)
    exact = hbp.clipped_grad(NET, params, x, y, clip).mean
    noise = _flat(noisy(NET, params, x, y, keys, clip, sigma), (draws,)) - _flat(
        _plus_l2(exact, params, NET.l2)
    )[None, :]
    z = noise / (sigma * clip / BATCH)  # should be i.i.d. N(0, 1): 200 draws x 51 parameters
    n = z.size
    # The mean of n standard normals has standard error 1/sqrt(n) ~ 0.0099, their sample std
    # 1/sqrt(2n) ~ 0.0070. Five standard errors: a false failure has probability ~1e-6, while
    # sigma C added to the mean (the known bug: B = 9 times too large) or noise calibrated to
    # the mean's sensitivity C / B (9 times too small) misses by over a hundred.
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.std() - 1) < 5 / np.sqrt(2 * n)
    # Independent across parameters and across keys: each sample correlation is about
    # N(0, 1/200) resp. N(0, 1/51); a key reused for two leaves would give exactly 1.
    assert abs(np.corrcoef(z[:, 0], z[:, -1])[0, 1]) < 5 / np.sqrt(draws)
    assert abs(np.corrcoef(z[0], z[1])[0, 1]) < 5 / np.sqrt(z.shape[1])


def test_same_key_same_noise():
    params, x, y = make_problem(NET, BATCH)
    a, b, c = (hbp.dp_grad(NET, params, x, y, jax.random.key(k), 1.0, 1.0) for k in (7, 7, 8))
    np.testing.assert_array_equal(_flat(a), _flat(b))
    assert np.all(_flat(a) != _flat(c))
    raw = hbp.dp_grad(NET, params, x, y, jax.random.PRNGKey(7), 1.0, 1.0)  # a raw key works too
    np.testing.assert_array_equal(_flat(raw), _flat(a))


def test_tree_normal_is_one_draw_cut_into_leaves():
    tree = ({"w": jnp.zeros((2, 3), jnp.float64), "b": jnp.zeros(3, jnp.float64)},
            {"w": jnp.zeros((3, 1), jnp.float32)})
    key = jax.random.key(5)
    z = hbp.tree_normal(key, tree)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), z) == jax.tree.map(
        lambda a: (a.shape, a.dtype), tree)
    # Leaves in jax.tree order take consecutive pieces of one float64 draw of all 12 numbers.
    whole = jax.random.normal(key, (12,), jnp.float64)
    np.testing.assert_array_equal(_flat(z)[:9], whole[:9])
    np.testing.assert_array_equal(_flat(z)[9:], whole[9:].astype(jnp.float32))
    with pytest.raises(TypeError, match="key: expected one jax.random key"):
        hbp.tree_normal(jnp.zeros(3), tree)


def test_poisson_batches_include_each_example_with_probability_b_over_n():
    n, b, draws = 200, 20, 2000
    size = hbp.dp.poisson_capacity(n, b)
    assert size == int(np.ceil(b + 6 * np.sqrt(b * (1 - b / n)))) + 1 == 47
    assert hbp.dp.poisson_capacity(10, 10) == 10  # q = 1: everything, no padding
    idx, mask = jax.jit(jax.vmap(lambda k: hbp.dp.poisson_batch(k, n, b)))(
        jax.random.split(jax.random.key(9), draws))
    idx, mask = np.asarray(idx), np.asarray(mask)
    counts = mask.sum(1)
    for i, m, c in zip(idx[:50], mask[:50], counts[:50]):  # chosen first, increasing; then padding
        assert np.all(m[:c]) and not np.any(m[c:]) and np.all(i[c:] == 0)
        assert np.all(np.diff(i[:c]) > 0) and 0 <= i.min() and i.max() < n
    # The count is Binomial(n, q), q = b / n: mean 20, variance 18 (a shuffle's is 0). Standard
    # errors over 2000 draws: 0.095 for the mean, about 0.57 for the variance; five of each.
    assert abs(counts.mean() - 20) < 5 * 0.095 and abs(counts.var() - 18) < 5 * 0.57
    # Each example's inclusion frequency: 0.1 with standard error 0.0067; five of them for the
    # largest of 200 deviations (a false failure ~ 1e-4).
    freq = np.bincount(idx[mask], minlength=n) / draws
    assert np.max(np.abs(freq - 0.1)) < 5 * 0.0067
    with pytest.raises(ValueError, match=r"batch_size: expected an int in \[1, 10\], got 11"):
        hbp.dp.poisson_capacity(10, 11)
    with pytest.raises(TypeError, match="poisson: expected a bool, got 1"):
        hbp.DPSGD(1.0, 1.0, 1).check()


@pytest.mark.parametrize("reduction", ("mean", "sum"))
def test_noiseless_step_is_clipped_sgd(reduction):
    net = hbp.MLP((4, 6, 3), activation="relu", loss="squared_error", l2=0.05,
                  reduction=reduction)
    params, x, y = make_problem(net, BATCH, seed=1)
    key, lr = jax.random.key(0), 0.3
    clip = float(np.median(hbp.per_example_grad_norms(net, params, x, y)))  # clips about half
    want = _plus_l2(hbp.clipped_grad(net, params, x, y, clip).mean, params, net.l2)
    assert_trees_close(hbp.dp_grad(net, params, x, y, key, clip, 0.0), want, **EXACT64)
    # A traced sigma = 0 (a jit argument) draws the noise and scales it by 0; a known one skips it.
    traced = jax.jit(hbp.dp_grad, static_argnums=0)(net, params, x, y, key, clip, 0.0)
    assert_trees_close(traced, want, **EXACT64)
    step = hbp.dp_sgd_step(net, params, x, y, key, lr, clip, 0)
    assert_trees_close(step, jax.tree.map(lambda p, g: p - lr * g, params, want), **EXACT64)
    # A bound above every norm: the batch-mean gradient, whatever net.reduction.
    mean_net = hbp.MLP((4, 6, 3), activation="relu", loss="squared_error", l2=0.05)
    assert_trees_close(hbp.dp_grad(net, params, x, y, key, 1e6, 0.0),
                       hbp.backprop(mean_net, params, x, y), **EXACT64)


@pytest.mark.parametrize("dtype", (jnp.float32, jnp.float64))
def test_jit_and_dtypes(dtype):
    params, x, y = make_problem(NET, BATCH, seed=2)
    params, x = jax.tree.map(lambda a: a.astype(dtype), (params, x))
    key, args = jax.random.key(3), (0.1, 0.5, 1.1)  # learning rate, clip, noise multiplier
    eager = hbp.dp_sgd_step(NET, params, x, y, key, *args)

    @jax.jit  # NET is a closure constant (static); one compile for both forms
    def steps(params, x, y, key, lr, clip, sigma):
        return (hbp.dp_sgd_step(NET, params, x, y, key, *args),  # constants: value-checked
                hbp.dp_sgd_step(NET, params, x, y, key, lr, clip, sigma))  # traced

    got = steps(params, x, y, key, *args)
    # float32: jit may fuse and reorder float32 sums: a few eps32 (6e-8) of O(1) values.
    tol = EXACT64 if dtype == jnp.float64 else dict(rtol=1e-5, atol=1e-6)
    assert_trees_close(got, (eager, eager), **tol)
    assert all(a.dtype == dtype for a in jax.tree.leaves(got))


def test_errors_name_the_argument():
    params, x, y = make_problem(NET, 3)
    key = jax.random.key(0)
    cases = [
        (dict(clip_norm=0.0), ValueError, "clip_norm: expected a positive finite number, got 0.0"),
        (dict(clip_norm=-1.0), ValueError, "clip_norm: expected a positive finite number, got -1.0"),
        (dict(noise_multiplier=-0.5), ValueError,
         "noise_multiplier: expected a finite number >= 0, got -0.5"),
        (dict(noise_multiplier=jnp.ones(3)), TypeError, "noise_multiplier: expected a finite"),
        (dict(learning_rate=0), ValueError, "learning_rate: expected a positive finite number"),
        (dict(key=0), TypeError, r"key: expected one jax.random key .*got shape \(\)"),
        (dict(key=jax.random.split(key, 2)), TypeError, r"key: .*got shape \(2,\)"),
    ]
    good = dict(key=key, learning_rate=0.1, clip_norm=1.0, noise_multiplier=1.0)
    for bad, error, msg in cases:
        with pytest.raises(error, match=msg):
            hbp.dp_sgd_step(NET, params, x, y, **{**good, **bad})
    with pytest.raises(ValueError, match="y: integer class labels must have shape"):
        hbp.dp_sgd_step(NET, params, x, y[:2], **good)


def test_epsilon_with_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    args = dict(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=1000, delta=1e-5)
    eps = hbp.dp_epsilon(**args)
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(
        256 / 60000, dp_accounting.GaussianDpEvent(1.1)), 1000)
    assert eps == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert 0 < hbp.dp_epsilon(**args, accountant="pld") < eps  # PLD is the tighter bound
    # More steps or a larger sampling rate spend more; more noise spends less; none: infinite.
    assert hbp.dp_epsilon(**{**args, "steps": 2000}) > eps
    assert hbp.dp_epsilon(**{**args, "sampling_rate": 0.01}) > eps
    assert hbp.dp_epsilon(**{**args, "noise_multiplier": 2.0}) < eps
    assert hbp.dp_epsilon(**{**args, "noise_multiplier": 0}) == float("inf")


def test_epsilon_without_dp_accounting(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"dp-accounting package: pip install 'handbackprop\[dp\]'"):
        hbp.dp_epsilon(1.1, 0.01, 100, 1e-5)


def test_epsilon_errors():
    good = dict(noise_multiplier=1.1, sampling_rate=0.01, steps=100, delta=1e-5)
    for bad, error, msg in [
        (dict(sampling_rate=1.5), ValueError, r"sampling_rate: expected a number in \(0, 1\]"),
        (dict(sampling_rate=0), ValueError, "sampling_rate: expected a positive finite number"),
        (dict(steps=0), ValueError, "steps: expected an int >= 1, got 0"),
        (dict(steps=10.5), TypeError, "steps: expected an int >= 1, got 10.5"),
        (dict(delta=1.0), ValueError, r"delta: expected a number in \(0, 1\), got 1.0"),
        (dict(noise_multiplier=-1), ValueError, "noise_multiplier: expected a finite number >= 0"),
        (dict(accountant="gdp"), ValueError, r"accountant: expected one of \('rdp', 'pld'\)"),
    ]:
        with pytest.raises(error, match=msg):
            hbp.dp_epsilon(**{**good, **bad})


def test_noisy_mean_and_tree_normal_check_their_arguments():
    """noisy_mean checked nothing: batch -2 flipped the step, 0 gave Inf; tree_normal(key, ())
    failed inside jax.random. Now each is a clear error naming the argument."""
    params, x, y = make_problem(NET, 3)
    key, total = jax.random.key(0), jax.tree.map(jnp.zeros_like, params)
    good = dict(clipped_sum=total, batch=3, key=key, clip_norm=1.0, noise_multiplier=1.0)
    cases = [
        (dict(batch=-2), ValueError, "batch: expected an int >= 1, got -2"),
        (dict(batch=0), ValueError, "batch: expected an int >= 1, got 0"),
        (dict(batch=3.0), TypeError, "batch: expected an int >= 1, got 3.0"),
        (dict(clipped_sum=total[:1]), ValueError, "clipped_sum: expected a tree like params"),
        (dict(clipped_sum=None), ValueError, "clipped_sum: expected a tree like params"),
        (dict(key=0), TypeError, "key: expected one jax.random key"),
        (dict(clip_norm=-1.0), ValueError, "clip_norm: expected a positive finite number"),
        (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier: expected a finite number"),
    ]
    for bad, error, msg in cases:
        with pytest.raises(error, match=msg):
            hbp.noisy_mean(NET, params, **{**good, **bad})
    with pytest.raises(ValueError, match=r"params: expected a tuple of 2 layers, got 1"):
        hbp.noisy_mean(NET, params[:1], **good)
    with pytest.raises(ValueError, match=r"tree: expected a pytree of floating arrays \(at least "
                                         r"one\), got \(\)"):
        hbp.tree_normal(key, ())
    with pytest.raises(TypeError, match=r"tree: .*got leaf dtypes \['int64'\]"):
        hbp.tree_normal(key, {"a": jnp.arange(3)})


def test_poisson_capacity_rounds_up_to_a_multiple_of_the_devices():
    assert hbp.dp.poisson_capacity(1000, 32) == 67
    assert hbp.dp.poisson_capacity(1000, 32, multiple_of=4) == 68
    assert hbp.dp.poisson_capacity(10, 10, multiple_of=4) == 12  # beyond n: padding only
    idx, mask = hbp.dp.poisson_batch(jax.random.key(0), 10, 10, multiple_of=4)
    assert idx.shape == (12,) and int(mask.sum()) == 10 and not bool(mask[10:].any())
    with pytest.raises(ValueError, match="multiple_of: expected an int >= 1, got 0"):
        hbp.dp.poisson_capacity(10, 5, multiple_of=0)
