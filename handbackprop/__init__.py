"""handbackprop: classic backpropagation's delta recursion, by hand, in JAX.

A reference implementation and a verifier: every gradient is the note's delta recursion,
checked against ``jax.grad``, finite differences and a literal NumPy reference.
"""

from handbackprop import activations
from handbackprop import losses
from handbackprop.activations import Activation
from handbackprop.backprop import backprop
from handbackprop.backprop import delta_recursion
from handbackprop.backprop import deltas
from handbackprop.backprop import loss
from handbackprop.backprop import value_and_backprop
from handbackprop.dp import dp_epsilon
from handbackprop.dp import dp_grad
from handbackprop.dp import dp_sgd_step
from handbackprop.losses import Loss
from handbackprop.mlp import MLP
from handbackprop.mlp import Cache
from handbackprop.mlp import forward
from handbackprop.mlp import forward_cache
from handbackprop.mlp import init_params
from handbackprop.per_example import ClippedGrad
from handbackprop.per_example import GradientStats
from handbackprop.per_example import clipped_grad
from handbackprop.per_example import gradient_stats
from handbackprop.per_example import per_example_grad_norms
from handbackprop.per_example import per_example_grads

__version__ = "0.1.0"

__all__ = (
    "Activation",
    "Cache",
    "ClippedGrad",
    "GradientStats",
    "Loss",
    "MLP",
    "activations",
    "backprop",
    "clipped_grad",
    "delta_recursion",
    "deltas",
    "dp_epsilon",
    "dp_grad",
    "dp_sgd_step",
    "forward",
    "forward_cache",
    "gradient_stats",
    "init_params",
    "loss",
    "losses",
    "per_example_grad_norms",
    "per_example_grads",
    "value_and_backprop",
)
