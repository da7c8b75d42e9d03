"""Training: the optimiser against optax, the scanned epoch against a Python loop of steps,
metrics against scikit-learn, determinism, resumption, trace counts, input errors, and
accuracy on shortened runs of the real data sets."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import handbackprop as hbp
from handbackprop import data, train

F64 = {"rtol": 1e-12, "atol": 1e-12}  # float64: a few ulps of accumulated rounding


def _leaves(tree):  # typed PRNG keys compare by their key data
    return [jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a
            for a in jax.tree.leaves(tree)]


def _tree_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def xor():
    return data.load("xor")


@pytest.fixture(scope="module")
def small():
    """A float64 xor network, data and one optimiser object (reused, so compiled once)."""
    return hbp.MLP((2, 8, 1), activation="tanh", loss="binary_cross_entropy"), train.sgd(0.1)


# -- the optimiser ---------------------------------------------------------------------


@pytest.mark.parametrize("momentum, nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("schedule", [False, True])
def test_sgd_matches_optax(momentum, nesterov, schedule):
    lr = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5) if schedule else 0.1
    ours, ref = train.sgd(lr, momentum, nesterov), optax.sgd(lr, momentum or None, nesterov)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    p, s, q, t = params, ours.init(params), params, ref.init(params)
    for k in jax.random.split(jax.random.key(0), 4):
        g = jax.tree.map(lambda a: jax.random.normal(k, a.shape, a.dtype), params)
        u, s = ours.update(g, s, p)
        v, t = ref.update(g, t, q)
        p, q = train.apply_updates(p, u), optax.apply_updates(q, v)
    chex.assert_trees_all_close(p, q, **F64)
    assert int(s.count) == 4


def test_sgd_is_the_notes_update():
    """No momentum: w <- w - eta * g exactly, dtype kept (a float64 schedule, float32 params)."""
    opt = train.sgd(lambda count: jnp.asarray(0.5, jnp.float64) ** count)
    params = (jnp.ones(3, jnp.float32),)
    u, state = opt.update((jnp.full(3, 2.0, jnp.float32),), opt.init(params))
    u, state = opt.update((jnp.full(3, 2.0, jnp.float32),), state)
    assert u[0].dtype == jnp.float32
    np.testing.assert_array_equal(u[0], np.full(3, -1.0, np.float32))  # eta_1 = 0.5, g = 2


def test_sgd_learning_rate_may_be_traced():
    """A learning rate traced by jit or grad (meta-learning) works as in optax.sgd."""
    def after_one_step(lr):
        opt = train.sgd(lr, momentum=0.5)
        params = {"w": jnp.ones(2)}
        updates, _ = opt.update({"w": jnp.full(2, 3.0)}, opt.init(params))
        return jnp.sum(train.apply_updates(params, updates)["w"])  # 2 (1 - 3 lr)

    assert float(jax.jit(after_one_step)(0.1)) == pytest.approx(1.4, rel=1e-12)
    assert float(jax.grad(after_one_step)(0.1)) == pytest.approx(-6.0, rel=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"learning_rate": 0.0}, "learning_rate: expected a positive finite number, got 0.0"),
    ({"learning_rate": -0.1}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": "0.1"}, "learning_rate"),
    ({"learning_rate": 0.1, "momentum": 1.0}, r"momentum: expected a number in \[0, 1\), got 1.0"),
    ({"learning_rate": 0.1, "momentum": -0.5}, "momentum"),
    ({"learning_rate": 0.1, "nesterov": True}, "nesterov"),
])
def test_sgd_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        train.sgd(**kwargs)


# -- the scanned epoch -----------------------------------------------------------------


def test_epoch_is_a_loop_of_steps(small, xor):
    """One scanned epoch equals its steps done one at a time in Python, same shuffle."""
    net, _ = small
    opt = train.sgd(0.1, momentum=0.9)
    x, y = train.check_data(net, xor.x_train, xor.y_train)
    state = train.init_state(jax.random.key(1), net, opt, jnp.float64)
    new, losses = train.train_epoch(net, opt, 64, state, x, y)  # compiled inside
    # Jitted from outside with the static positions earlier versions asked for: the same.
    again = jax.jit(train.train_epoch, static_argnums=(0, 1, 2, 6, 7))(net, opt, 64, state, x, y)
    assert _tree_equal(again, (new, losses))
    key, shuffle_key = jax.random.split(state.key)
    order = np.asarray(jax.random.permutation(shuffle_key, len(x)))
    params, opt_state, expected = state.params, state.opt_state, []

    @jax.jit
    def step(params, opt_state, xb, yb):  # the note's loop, one step per Python iteration
        value, grads = hbp.value_and_backprop(net, params, xb, yb)
        updates, opt_state = opt.update(grads, opt_state, params)
        return train.apply_updates(params, updates), opt_state, value

    for i in range(len(x) // 64):
        idx = order[64 * i: 64 * (i + 1)]
        params, opt_state, value = step(params, opt_state, x[idx], y[idx])
        expected.append(value)
    assert losses.shape == (len(x) // 64,)
    np.testing.assert_allclose(losses, expected, **F64)
    chex.assert_trees_all_close(new.params, params, **F64)
    chex.assert_trees_all_close(new.opt_state, opt_state, **F64)
    np.testing.assert_array_equal(jax.random.key_data(new.key), jax.random.key_data(key))


def test_dp_epoch_steps_are_dp_grad_with_fresh_keys(small, xor):
    """With ``dp``, each step's gradient is dp_grad with that step's noise key: checked on the
    last step of a 2-step epoch, replayed from the same keys (float64, a few ulps)."""
    net, opt = small
    x, y = train.check_data(net, xor.x_train, xor.y_train)
    x, y = x[:128], y[:128]
    state = train.init_state(jax.random.key(1), net, opt, jnp.float64)
    settings = hbp.dp.DPSGD(clip_norm=0.5, noise_multiplier=1.3)
    epoch = train.train_epoch
    new, losses = epoch(net, opt, 64, state, x, y, None, settings)
    key, shuffle_key, noise_key = jax.random.split(state.key, 3)
    order = np.asarray(jax.random.permutation(shuffle_key, 128)).reshape(2, 64)
    params = state.params
    for idx, k in zip(order, jax.random.split(noise_key, 2)):
        params = hbp.dp_sgd_step(net, params, x[idx], y[idx], k, 0.1, settings.clip_norm,
                                 settings.noise_multiplier)
    chex.assert_trees_all_close(new.params, params, **F64)
    np.testing.assert_array_equal(jax.random.key_data(new.key), jax.random.key_data(key))
    np.testing.assert_allclose(losses[0], hbp.loss(net, state.params, x[order[0]], y[order[0]]), **F64)
    # The noise is really there: another key moves the parameters by about lr sigma C / B.
    other, _ = epoch(net, opt, 64, state._replace(key=jax.random.key(7)), x, y, None, settings)
    assert not _tree_equal(other.params, new.params)


@pytest.mark.slow
def test_poisson_dp_epoch_steps(small, xor):
    """With ``dp.poisson``, step t draws poisson_batch(key_t) and takes the noisy clipped sum of
    the chosen examples over B; replayed here from the same keys (float64, a few ulps)."""
    net, opt = small
    x, y = train.check_data(net, xor.x_train, xor.y_train)
    x, y = x[:128], y[:128]
    state = train.init_state(jax.random.key(1), net, opt, jnp.float64)
    settings = hbp.dp.DPSGD(clip_norm=0.5, noise_multiplier=1.3, poisson=True)
    new, losses = train.train_epoch(net, opt, 32, state, x, y, None, settings)
    key, shuffle_key, noise_key = jax.random.split(state.key, 3)
    params, counts = state.params, []
    for t, (sk, nk) in enumerate(zip(jax.random.split(shuffle_key, 4), jax.random.split(noise_key, 4))):
        idx, mask = hbp.dp.poisson_batch(sk, 128, 32)
        chosen = np.asarray(idx)[np.asarray(mask)]
        counts.append(len(chosen))
        if t == 0:  # the reported loss: the chosen examples' mean
            np.testing.assert_allclose(losses[0], hbp.loss(net, params, x[chosen], y[chosen]), **F64)
        clipped = hbp.clipped_grad(net, params, x[chosen], y[chosen], 0.5).sum
        g = hbp.noisy_mean(net, params, clipped, 32, nk, 0.5, 1.3)  # over B, not the count
        params = jax.tree.map(lambda p, d: p - 0.1 * d, params, g)
    assert len(set(counts)) > 1  # the batch size varies
    chex.assert_trees_all_close(new.params, params, **F64)
    np.testing.assert_array_equal(jax.random.key_data(new.key), jax.random.key_data(key))


def test_poisson_with_the_whole_set_is_gradient_descent(small, xor):
    """B = n samples every example: no noise and no clipping give full-batch gradient descent."""
    net, opt = small
    n = len(xor.x_train)
    kwargs = dict(epochs=3, batch_size=n, key=jax.random.key(0), dtype=jnp.float64)
    dp, _ = train.fit(net, opt, (xor.x_train, xor.y_train), dp=(1e6, 0.0, True), **kwargs)
    gd, _ = train.fit(net, opt, (xor.x_train, xor.y_train), **kwargs)
    # float64, the same gradient summed in another order (clipped sum / B vs the mean): a few
    # ulps per step, so rtol 1e-12 with atol 1e-14 for entries near zero.
    chex.assert_trees_all_close(dp.params, gd.params, rtol=1e-12, atol=1e-14)


def test_fit_checks_dp_settings(small, xor):
    net, opt = small
    with pytest.raises(ValueError, match=r"clip_norm: expected a positive finite number, got -1.0"):
        train.fit(net, opt, (xor.x_train, xor.y_train), epochs=1, batch_size=8,
                  key=jax.random.key(0), dp=(-1.0, 1.0))
    with pytest.raises(TypeError, match=r"dp: expected DPSGD\(clip_norm, noise_multiplier, "
                                        r"poisson=False\) or a tuple of 2 or 3 of them, got \(1.0,\)"):
        train.fit(net, opt, (xor.x_train, xor.y_train), epochs=1, batch_size=8,
                  key=jax.random.key(0), dp=(1.0,))
    # Poisson sampling over a mesh (here of one device) trains as without one.
    kwargs = dict(epochs=1, batch_size=32, key=jax.random.key(0), dp=(1.0, 1.0, True),
                  dtype=jnp.float64)
    with_mesh, _ = train.fit(net, opt, (xor.x_train, xor.y_train), mesh=hbp.data_parallel_mesh(1),
                             **kwargs)
    without, _ = train.fit(net, opt, (xor.x_train, xor.y_train), **kwargs)
    chex.assert_trees_all_close(with_mesh.params, without.params, **F64)


@pytest.fixture
def fresh_epoch_cache():
    """The compiled epochs forgotten before and after: a trace count starts from none, and no
    program traced with a monkeypatched piece outlives the test."""
    train._epoch.clear_cache()
    yield
    train._epoch.clear_cache()


def test_fit_does_not_retrace_between_epochs(small, xor, monkeypatch, fresh_epoch_cache):
    net, opt = small
    # The step's gradient piece is looked up when the epoch is traced: it counts the traces.
    monkeypatch.setattr(train, "_gradient", chex.assert_max_traces(train._gradient, n=1))
    kwargs = dict(epochs=3, batch_size=32, test_data=(xor.x_test, xor.y_test))
    state, _ = train.fit(net, opt, (xor.x_train, xor.y_train), key=jax.random.key(0), **kwargs)
    # Continuing from a state (the resume path) must reuse the same trace too, and so must an
    # optimiser rebuilt with the same settings (small's is train.sgd(0.1)).
    train.fit(net, opt, (xor.x_train, xor.y_train), state=state, initial_epoch=1, **kwargs)
    assert train.sgd(0.1) == opt and hash(train.sgd(0.1)) == hash(opt)
    train.fit(net, train.sgd(0.1), (xor.x_train, xor.y_train), state=state, initial_epoch=1, **kwargs)
    assert train.sgd(0.2) != opt and train.sgd(0.1, momentum=0.5) != train.sgd(0.1, momentum=0.6)
    with pytest.raises(AssertionError):  # the guard works: a new batch size is a new trace
        train.fit(net, opt, (xor.x_train, xor.y_train), key=jax.random.key(0), epochs=1,
                  batch_size=16)


def test_same_seed_same_result_and_resume_is_exact(small, xor):
    net, opt = small
    run = lambda **kw: train.fit(net, opt, (xor.x_train, xor.y_train), batch_size=32,  # noqa: E731
                                 test_data=(xor.x_test, xor.y_test), dtype=jnp.float64, **kw)
    full, history = run(key=jax.random.key(3), epochs=4)
    again, history_again = run(key=jax.random.key(3), epochs=4)
    assert _tree_equal(full, again) and history == history_again
    half, first = run(key=jax.random.key(3), epochs=2)
    resumed, second = run(state=half, initial_epoch=2, epochs=4)
    assert _tree_equal(resumed, full)
    assert second["epoch"] == [3, 4]
    assert {k: first[k] + second[k] for k in history} == history
    other, _ = run(key=jax.random.key(4), epochs=4)
    assert not _tree_equal(other.params, full.params)


def test_fit_history_and_callback(small, xor):
    net, opt = small
    seen = []
    _, history = train.fit(net, opt, (xor.x_train, xor.y_train), epochs=2, batch_size=32,
                           key=jax.random.key(0), callback=lambda e, s, r: seen.append((e, r)))
    assert set(history) == {"epoch", "train_loss"} and history["epoch"] == [1, 2]
    assert [e for e, _ in seen] == [1, 2] and seen[1][1]["train_loss"] == history["train_loss"][1]


# -- evaluation ------------------------------------------------------------------------


def test_evaluate_classification_and_regression():
    from sklearn.metrics import mean_squared_error, r2_score

    rng = np.random.default_rng(0)
    evaluate = jax.jit(train.evaluate, static_argnums=0)
    x = rng.standard_normal((50, 4))
    for loss, k, y in [
        ("softmax_cross_entropy", 3, rng.integers(0, 3, 50)),
        ("binary_cross_entropy", 2, rng.integers(0, 2, (50, 2)) * 1.0),
        ("squared_error", 2, rng.standard_normal((50, 2))),
    ]:
        net = hbp.MLP((4, 5, k), loss=loss)
        params = jax.jit(hbp.init_params, static_argnums=(1, 2))(jax.random.key(2), net, jnp.float64)
        m = evaluate(net, params, x, y)
        o, value = jax.jit(lambda p: (hbp.forward(net, p, x), hbp.loss(net, p, x, y)))(params)
        o = np.asarray(o)
        np.testing.assert_allclose(m["loss"], value, **F64)
        if loss == "softmax_cross_entropy":
            assert m["accuracy"] == np.mean(o.argmax(1) == np.asarray(y))
            one_hot = np.eye(3)[np.asarray(y)]  # probability rows: the same accuracy
            assert evaluate(net, params, x, one_hot)["accuracy"] == m["accuracy"]
        elif loss == "binary_cross_entropy":
            assert m["accuracy"] == np.mean((o > 0.5) == (np.asarray(y) > 0.5))
        else:
            np.testing.assert_allclose(m["r2"], r2_score(y, o), **F64)
            np.testing.assert_allclose(m["mse"], mean_squared_error(y, o), **F64)
        assert set(m) == ({"loss", "r2", "mse"} if loss == "squared_error" else {"loss", "accuracy"})
        assert train.metric_name(net) in m


# -- bad input: errors before any computation ------------------------------------------


@pytest.fixture
def no_computation(monkeypatch):
    """Make any start of training an error, so that a check has to come first."""
    def fail(*args, **kwargs):
        raise AssertionError("training started before the inputs were checked")
    monkeypatch.setattr(train, "init_state", fail)
    monkeypatch.setattr(train, "_epoch", fail)


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, r"batch_size: expected an int in \[1, 320\], got 0"),
    ({"batch_size": 321}, r"batch_size: expected an int in \[1, 320\], got 321"),
    ({"batch_size": 2.0}, "batch_size"),
    ({"epochs": 0}, "epochs: expected an int >= 1, got 0"),
    ({"epochs": -3}, "epochs"),
    ({"epochs": True}, "epochs"),
    ({"initial_epoch": 6}, r"initial_epoch: expected an int in \[0, 5\], got 6"),
    ({"key": None}, "key, state: expected exactly one"),
])
def test_fit_rejects_bad_settings(small, xor, no_computation, kwargs, match):
    net, opt = small
    args = {"epochs": 5, "batch_size": 32, "key": jax.random.key(0), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        train.fit(net, opt, (xor.x_train, xor.y_train), **args)


@pytest.mark.parametrize("loss, k, y, match", [
    ("softmax_cross_entropy", 3, np.array([0, 1, 3, 2]), r"class labels in \[0, 3\), got 3 at index 2"),
    ("softmax_cross_entropy", 3, np.array([-1, 1, 0, 2]), r"in \[0, 3\)"),
    ("softmax_cross_entropy", 3, -np.ones((4, 3)), "probability rows"),
    ("binary_cross_entropy", 1, np.array([0, 1, 2, 1]), r"targets in \[0, 1\], got 2.0 at index \(2, 0\)"),
    ("binary_cross_entropy", 2, np.array([0, 1, 1, 0]), r"binary_cross_entropy expects floating targets of shape \(4, 2\), got shape \(4,\) dtype int"),
    ("binary_cross_entropy", 1, np.full((4, 1), 1.5), r"targets in \[0, 1\]"),
    ("squared_error", 1, np.array([0, 1, 1, 0]), r"squared_error expects floating targets of shape \(4, 1\), got shape \(4,\) dtype int"),
    ("squared_error", 2, np.ones((4, 3)), r"shape \(4, 2\), got shape \(4, 3\) dtype float64"),
    ("squared_error", 1, np.ones(5), r"expected 4 labels, one per row of x, got shape \(5,\)"),
])
def test_labels_that_do_not_fit_the_loss(no_computation, loss, k, y, match):
    net = hbp.MLP((2, 3, k), loss=loss)
    with pytest.raises(ValueError, match="train_data: y: .*" + match):
        train.fit(net, train.sgd(0.1), (np.ones((4, 2)), y), epochs=1, batch_size=2,
                  key=jax.random.key(0))


@pytest.mark.parametrize("x, match", [
    (np.ones((4, 3)), r"x: expected floating inputs of shape \(n, 2\).*got shape \(4, 3\)"),
    (np.ones((4, 2), np.int32), "dtype int32"),
    (np.full((4, 2), np.nan), "finite"),
])
def test_bad_inputs(no_computation, x, match):
    net = hbp.MLP((2, 3, 1), loss="squared_error")
    with pytest.raises(ValueError, match=match):
        train.fit(net, train.sgd(0.1), (x, np.ones(4)), epochs=1, batch_size=2,
                  key=jax.random.key(0), test_data=(x, np.ones(4)))


def test_targets_are_converted():
    bce = hbp.MLP((2, 3, 1), loss="binary_cross_entropy")
    x, y = train.check_data(bce, np.ones((3, 2)), np.array([0, 1, 1]))
    assert y.shape == (3, 1) and y.dtype == np.float64 and y[:, 0].tolist() == [0, 1, 1]
    _, y = train.check_data(hbp.MLP((2, 3, 1)), np.ones((3, 2)), np.arange(3.0))
    assert y.shape == (3, 1)


# -- optax: the hand-written gradients drive any optax optimiser -----------------------


def test_optax_optimisers(small, xor):
    net, ours = small
    args = ((xor.x_train, xor.y_train),)
    kwargs = dict(epochs=2, batch_size=32, key=jax.random.key(0), dtype=jnp.float64)
    a, _ = train.fit(net, ours, *args, **kwargs)
    b, _ = train.fit(net, optax.sgd(0.1), *args, **kwargs)
    chex.assert_trees_all_close(a.params, b.params, **F64)
    _, history = train.fit(net, optax.adam(0.05), *args, **{**kwargs, "epochs": 5})
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]


# -- real data, shortened runs (the full 50-epoch figures are in the README) ------------


def _default_run(name, epochs, seed=0):
    ds = data.load(name)
    net = hbp.MLP((ds.num_features, 128, 128, ds.num_outputs(ds.default_loss)),
                  loss=ds.default_loss)
    _, history = train.fit(net, train.sgd(0.1), (ds.x_train, ds.y_train), epochs=epochs,
                           batch_size=32, key=jax.random.key(seed),
                           test_data=(ds.x_test, ds.y_test))
    return ds, history


@pytest.mark.slow
def test_digits_and_breast_cancer_accuracy():
    # 10 of the 50 default epochs; over seeds 0..4 these reach >= 0.958 and >= 0.973.
    assert _default_run("digits", 10)[1]["test_accuracy"][-1] >= 0.95
    assert _default_run("breast_cancer", 10)[1]["test_accuracy"][-1] >= 0.95


@pytest.mark.slow
def test_diabetes_r2_close_to_scikit_learn():
    from sklearn.metrics import r2_score
    from sklearn.neural_network import MLPRegressor

    ds, history = _default_run("diabetes", 10)
    with warnings.catch_warnings():  # it stops at max_iter, as intended
        warnings.simplefilter("ignore")
        theirs = [r2_score(ds.y_test, MLPRegressor(
            hidden_layer_sizes=(128, 128), solver="sgd", learning_rate_init=0.1, momentum=0.0, batch_size=32,
            max_iter=10, alpha=0.0, n_iter_no_change=10, random_state=s,
        ).fit(ds.x_train, ds.y_train.ravel()).predict(ds.x_test)) for s in (1, 2, 3)]
    assert history["test_r2"][-1] >= np.median(theirs) - 0.05
    assert history["test_r2"][-1] > 0.4


# -- issue 11: each mistake a clear error naming the argument, before any work ---------


def test_fit_checks_targets_are_finite(no_computation):
    net = hbp.MLP((2, 3, 1))
    y = np.array([0.0, np.nan, 1.0, 2.0])
    with pytest.raises(ValueError, match="train_data: y: expected finite targets, got NaN"):
        train.fit(net, train.sgd(0.1), (np.ones((4, 2)), y), epochs=1, batch_size=2,
                  key=jax.random.key(0))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"callback": 3}, TypeError, "callback: expected a function callback(epoch, state, record) "
                                 "or None, got 3"),
    ({"optimizer": "sgd"}, TypeError, "optimizer: expected an Optimizer"),
    ({"train_data": np.ones((4, 2))}, TypeError,
     "train_data: expected a pair (x, y), got an array of shape (4, 2)"),
    ({"test_data": (np.ones((4, 2)),)}, TypeError, "test_data: expected a pair (x, y)"),
])
def test_fit_refuses_bad_arguments_before_any_work(no_computation, kwargs, error, match):
    net = hbp.MLP((2, 3, 1))
    args = {"optimizer": train.sgd(0.1), "train_data": (np.ones((4, 2)), np.ones(4)), **kwargs}
    with pytest.raises(error) as e:
        train.fit(net, args.pop("optimizer"), args.pop("train_data"), epochs=2, batch_size=2,
                  key=jax.random.key(0), **args)
    assert str(e.value).startswith(match)


def test_train_epoch_checks_its_arguments(small, xor):
    net, opt = small
    x, y = train.check_data(net, xor.x_train, xor.y_train)
    state = train.init_state(jax.random.key(1), net, opt, jnp.float64)
    with pytest.raises(ValueError, match=rf"y: expected {len(x)} labels, one per row of x, got "
                                         rf"shape \({len(x) - 1}, 1\)"):
        train.train_epoch(net, opt, 8, state, x, y[:-1])  # JAX would clamp the gather
    with pytest.raises(TypeError, match=r"batch_size: expected an int in \[1, 320\], got 8.0"):
        train.train_epoch(net, opt, 8.0, state, x, y)
    momentum = train.init_state(jax.random.key(1), net, train.sgd(0.1, momentum=0.9), jnp.float64)
    with pytest.raises(ValueError, match="state: its opt_state does not match the optimizer's"):
        train.train_epoch(net, opt, 8, momentum, x, y)
    with pytest.raises(ValueError, match="state: its opt_state does not match"):
        train.fit(net, opt, (xor.x_train, xor.y_train), epochs=1, batch_size=8, state=momentum)


def test_plain_sgd_refuses_a_momentum_state():
    params = {"w": jnp.ones(2)}
    plain, heavy = train.sgd(0.1), train.sgd(0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"state: sgd\(momentum=0.0\) expects an SGDState with no "
                                         r"momentum buffer"):
        plain.update(params, heavy.init(params))
    with pytest.raises(ValueError, match=r"state: sgd\(momentum=0.9\) expects an SGDState with a "
                                         "momentum buffer"):
        heavy.update(params, plain.init(params))


def test_assert_trees_close_checks_dtypes():
    from conftest import assert_trees_close

    expected = (jnp.ones(3, jnp.float64),)
    assert_trees_close((jnp.ones(3, jnp.float64),), expected, rtol=0, atol=0)
    with pytest.raises(AssertionError):  # equal values, another dtype
        assert_trees_close((jnp.ones(3, jnp.float32),), expected, rtol=0, atol=0)
