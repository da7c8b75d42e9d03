"""The hand-written gradients drive optax optimisers unchanged.

    pip install 'handbackprop[train,optax]'
    python examples/optax_example.py

Three ways to train the same digits network, each step's gradient from the delta recursion:
the library's own SGD, ``optax.sgd`` (the same update, so the same result) and ``optax.adam``
in a hand-written loop, the note's three steps spelled out.
"""

import jax
import jax.numpy as jnp
import optax

import handbackprop as hbp

ds = hbp.data.load("digits")
net = hbp.MLP((64, 128, 128, 10), loss="softmax_cross_entropy")
train_data, test_data = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)

# 1. fit() takes any optimiser in the optax style: hbp.sgd, optax.sgd, optax.adam, ...
for name, opt in [("hbp.sgd(0.1)", hbp.sgd(0.1)), ("optax.sgd(0.1)", optax.sgd(0.1))]:
    _, history = hbp.fit(net, opt, train_data, epochs=10, batch_size=32, key=jax.random.key(0),
                         test_data=test_data)
    print(f"{name:16s} test accuracy after 10 epochs: {history['test_accuracy'][-1]:.4f}")

# 2. Or a loop of your own: loss and gradient by hand backprop, then optax's update.
opt = optax.adam(1e-3)
params = hbp.init_params(jax.random.key(0), net)
opt_state = opt.init(params)
x, y = jnp.asarray(ds.x_train, jnp.float32), jnp.asarray(ds.y_train)


@jax.jit
def step(params, opt_state, xb, yb):
    loss, grads = hbp.value_and_backprop(net, params, xb, yb)  # the delta recursion, no autodiff
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


key = jax.random.key(1)
for epoch in range(10):
    key, sub = jax.random.split(key)
    order = jax.random.permutation(sub, len(x))
    for i in range(len(x) // 32):
        idx = order[32 * i: 32 * (i + 1)]
        params, opt_state, loss = step(params, opt_state, x[idx], y[idx])
metrics = hbp.evaluate(net, params, ds.x_test, ds.y_test)
print(f"{'optax.adam(1e-3)':16s} test accuracy after 10 epochs: {float(metrics['accuracy']):.4f}")
