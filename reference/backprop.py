"""The note's equations, literally: loops over layers, nodes and examples, in float64.

Networks are described by plain arguments (no library objects): ``params`` is a sequence of
dicts ``{"w": (d_{l-1}, d_l)[, "b": (d_l,)]}``, ``activations`` one name per layer 1..L.
"""

import math

import numpy as np

LEAKY_SLOPE = 0.01
ELU_ALPHA = 1.0


def _sigmoid(z):
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


# g and g' for a single node, from S alone.
G = {
    "identity": (lambda z: z, lambda z: 1.0),
    "logistic": (_sigmoid, lambda z: _sigmoid(z) * (1 - _sigmoid(z))),
    "tanh": (math.tanh, lambda z: 1 - math.tanh(z) ** 2),
    "relu": (lambda z: z if z > 0 else 0.0, lambda z: 1.0 if z > 0 else 0.0),  # g'(0) = 0
    "leaky_relu": (lambda z: z if z >= 0 else LEAKY_SLOPE * z, lambda z: 1.0 if z >= 0 else LEAKY_SLOPE),
    "softplus": (lambda z: max(z, 0) + math.log1p(math.exp(-abs(z))), _sigmoid),
    "elu": (lambda z: z if z > 0 else ELU_ALPHA * math.expm1(z), lambda z: 1.0 if z > 0 else ELU_ALPHA * math.exp(z)),
}


def forward(params, x, activations, bias=True):
    """One example at a time: ``S[l][j] = sum_i w_ij x_i + b_j``, ``x[l][j] = g(S[l][j])``.

    Returns ``(xs, ss)``: per example b, ``xs[b][l]`` (l = 0..L) and ``ss[b][l]`` (l = 1..L,
    stored at index l - 1) as lists of floats.
    """
    all_xs, all_ss = [], []
    for xb in np.asarray(x, np.float64):
        xs, ss = [list(xb)], []
        for layer, name in zip(params, activations):
            w = np.asarray(layer["w"], np.float64)
            d_in, d_out = w.shape
            s = []
            for j in range(d_out):
                total = sum(w[i, j] * xs[-1][i] for i in range(d_in))  # S_j = sum_i w_ij x_i
                if bias:
                    total += float(layer["b"][j])  # ... + b_j
                s.append(total)
            if name == "softmax":  # x_j = e^{S_j} / sum_k e^{S_k}, shifted by max S for range
                m = max(s)
                z = sum(math.exp(v - m) for v in s)
                out = [math.exp(v - m) / z for v in s]
            else:
                out = [G[name][0](v) for v in s]  # x_j = g(S_j)
            ss.append(s)
            xs.append(out)
        all_xs.append(xs)
        all_ss.append(ss)
    return all_xs, all_ss


def _targets(y, k):
    """Per example target rows; integer classes become one-hot rows."""
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer):
        return [[1.0 if c == int(yb) else 0.0 for c in range(k)] for yb in y]
    return [list(map(float, row)) for row in y]


def example_loss(s, o, t, loss):
    """e for one example from its logits ``s``, output ``o`` and target row ``t``."""
    if loss == "squared_error":  # e = 1/2 sum_k (o_k - y_k)^2
        return 0.5 * sum((ok - tk) ** 2 for ok, tk in zip(o, t))
    if loss == "binary_cross_entropy":  # e = -sum_k y log o + (1 - y) log(1 - o), from S
        return sum(max(sk, 0) - sk * tk + math.log1p(math.exp(-abs(sk))) for sk, tk in zip(s, t))
    if loss == "softmax_cross_entropy":  # e = -sum_k p_k log softmax(S)_k
        m = max(s)
        lse = m + math.log(sum(math.exp(v - m) for v in s))
        return -sum(tk * (sk - lse) for sk, tk in zip(s, t))
    raise ValueError(loss)


def loss(params, x, y, activations, loss, bias=True, l2=0.0, reduction="mean"):
    """The scalar loss: reduced per-example losses plus (l2/2) sum of squared weights."""
    xs, ss = forward(params, x, activations, bias)
    ts = _targets(y, len(xs[0][-1]))
    total = sum(example_loss(ss[b][-1], xs[b][-1], ts[b], loss) for b in range(len(ts)))
    if reduction == "mean":
        total /= len(ts)
    penalty = sum(float(w) ** 2 for layer in params for w in np.ravel(layer["w"]))
    return total + 0.5 * l2 * penalty


def _output_delta(s, o, t, activation, loss):
    """Base case (3.4): delta_i^(L) = de/dS_i^(L) for one example."""
    k = len(o)
    fused = {("identity", "squared_error"), ("logistic", "binary_cross_entropy")}
    if (activation, loss) in fused:
        return [o[i] - t[i] for i in range(k)]  # o - y
    if (activation, loss) == ("softmax", "softmax_cross_entropy"):
        return [sum(t) * o[i] - t[i] for i in range(k)]  # softmax(S) - p
    assert loss == "squared_error", (activation, loss)
    dedo = [o[i] - t[i] for i in range(k)]  # de/do_i for e = 1/2 sum (o - y)^2
    if activation == "softmax":  # de/dS_i = sum_k de/do_k o_k (1[k = i] - o_i)
        return [sum(dedo[m] * o[m] * ((m == i) - o[i]) for m in range(k)) for i in range(k)]
    return [dedo[i] * G[activation][1](s[i]) for i in range(k)]  # (o_i - y_i) g'(S_i)


def deltas(params, x, y, activations, loss, bias=True):
    """Per-example deltas: ``out[l][b, j] = delta_j^(l+1)`` for example b, unreduced."""
    xs, ss = forward(params, x, activations, bias)
    ts = _targets(y, len(xs[0][-1]))
    n_layers = len(params)
    out = [np.zeros((len(ts), np.shape(p["w"])[1])) for p in params]
    for b in range(len(ts)):
        delta = _output_delta(ss[b][-1], xs[b][-1], ts[b], activations[-1], loss)
        out[-1][b] = delta
        for l in range(n_layers - 1, 0, -1):  # from layer l+1 (index l) down to layer l (index l-1)
            w = np.asarray(params[l]["w"], np.float64)
            g_prime = G[activations[l - 1]][1]
            # Inductive step (3.5): delta_i^(l) = g'(S_i^(l)) sum_j w_ij^(l+1) delta_j^(l+1)
            delta = [
                g_prime(ss[b][l - 1][i]) * sum(w[i, j] * delta[j] for j in range(len(delta)))
                for i in range(w.shape[0])
            ]
            out[l - 1][b] = delta
    return out


def backprop(params, x, y, activations, loss, bias=True, l2=0.0, reduction="mean"):
    """The gradient of :func:`loss`: de/dw_ij^(l) = sum_b x_i^(l-1) delta_j^(l) (3.6)."""
    xs, _ = forward(params, x, activations, bias)
    ds = deltas(params, x, y, activations, loss, bias)
    batch = len(xs)
    scale = 1.0 / batch if reduction == "mean" else 1.0
    grads = []
    for l, layer in enumerate(params):
        w = np.asarray(layer["w"], np.float64)
        gw = np.zeros_like(w)
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                # Gradient (3.6): de/dw_ij^(l) = x_i^(l-1) delta_j^(l), summed over examples
                gw[i, j] = scale * sum(xs[b][l][i] * ds[l][b, j] for b in range(batch)) + l2 * w[i, j]
        g = {"w": gw}
        if bias:
            g["b"] = np.array([scale * sum(ds[l][b, j] for b in range(batch)) for j in range(w.shape[1])])
        grads.append(g)
    return tuple(grads)
