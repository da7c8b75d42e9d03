"""The note's numerical gradient (section 2.2), literally: perturb one weight at a time.

``f`` is any function of a sequence of ``{"w", "b"}`` dicts returning a float; each weight costs
one (forward) or two (central) evaluations, so the whole gradient costs O(n) forward passes of
O(n) each: O(n^2), the cost backpropagation removes.
"""

import copy

import numpy as np


def _coordinates(params):
    for l, layer in enumerate(params):
        for name in sorted(layer):
            for index in np.ndindex(np.shape(layer[name])):
                yield l, name, index


def _float64(params):
    return [{k: np.array(v, np.float64) for k, v in layer.items()} for layer in params]


def forward_difference_gradient(f, params, h=1e-7):
    """dL/dw ~ (L(w + h e_w) - L(w)) / h, one weight at a time (the note's formula)."""
    base = _float64(params)
    f0 = f(base)
    grads = [{k: np.zeros_like(v) for k, v in layer.items()} for layer in base]
    for l, name, index in _coordinates(base):
        bumped = copy.deepcopy(base)
        bumped[l][name][index] += h
        grads[l][name][index] = (f(bumped) - f0) / h
    return tuple(grads)


def central_difference_gradient(f, params, h=None):
    """dL/dw ~ (L(w + h e_w) - L(w - h e_w)) / 2h, one weight at a time.

    The default step, cbrt(eps) * max(1, |w|) ~ 6e-6 in float64, balances the truncation error
    (h^2 |f'''| / 6) against the round-off (eps |f| / h): both about 1e-11 for O(1) values.
    """
    base = _float64(params)
    grads = [{k: np.zeros_like(v) for k, v in layer.items()} for layer in base]
    for l, name, index in _coordinates(base):
        step = h if h is not None else np.cbrt(np.finfo(np.float64).eps) * max(1.0, abs(base[l][name][index]))
        up, down = copy.deepcopy(base), copy.deepcopy(base)
        up[l][name][index] += step
        down[l][name][index] -= step
        grads[l][name][index] = (f(up) - f(down)) / (up[l][name][index] - down[l][name][index])
    return tuple(grads)
