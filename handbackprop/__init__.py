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
from handbackprop.losses import Loss
from handbackprop.mlp import MLP
from handbackprop.mlp import Cache
from handbackprop.mlp import forward
from handbackprop.mlp import forward_cache
from handbackprop.mlp import init_params

__version__ = "0.1.0"

__all__ = (
    "Activation",
    "Cache",
    "Loss",
    "MLP",
    "activations",
    "backprop",
    "delta_recursion",
    "deltas",
    "forward",
    "forward_cache",
    "init_params",
    "loss",
    "losses",
    "value_and_backprop",
)
