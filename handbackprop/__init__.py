"""handbackprop: classic backpropagation's delta recursion, by hand, in JAX.

A reference implementation and a verifier: every gradient is the note's delta recursion,
checked against ``jax.grad``, finite differences and a literal NumPy reference.
"""

from handbackprop import activations
from handbackprop import checkpoint
from handbackprop import curvature
from handbackprop import data
from handbackprop import dp
from handbackprop import losses
from handbackprop import parallel
from handbackprop import testing
from handbackprop import train
from handbackprop.activations import Activation
from handbackprop.backprop import backprop
from handbackprop.backprop import delta_recursion
from handbackprop.backprop import deltas
from handbackprop.backprop import loss
from handbackprop.backprop import value_and_backprop
from handbackprop.curvature import KronFactors
from handbackprop.curvature import diag_ggn
from handbackprop.curvature import diag_hessian
from handbackprop.curvature import ggn_vector_product
from handbackprop.curvature import hessian_vector_product
from handbackprop.curvature import kfac_factors
from handbackprop.curvature import per_example_diag_ggn
from handbackprop.curvature_check import CurvatureReport
from handbackprop.curvature_check import check_curvature
from handbackprop.dp import DPSGD
from handbackprop.dp import dp_epsilon
from handbackprop.dp import dp_grad
from handbackprop.dp import dp_sgd_step
from handbackprop.dp import noisy_mean
from handbackprop.dp import tree_normal
from handbackprop.finite_diff import numerical_grad
from handbackprop.losses import Loss
from handbackprop.mlp import MLP
from handbackprop.mlp import Cache
from handbackprop.mlp import forward
from handbackprop.mlp import forward_cache
from handbackprop.mlp import init_params
from handbackprop.parallel import data_parallel_mesh
from handbackprop.parallel import sharded_backprop
from handbackprop.parallel import sharded_clipped_grad
from handbackprop.parallel import sharded_dp_grad
from handbackprop.parallel import sharded_value_and_backprop
from handbackprop.per_example import ClippedGrad
from handbackprop.per_example import GradientStats
from handbackprop.per_example import clipped_grad
from handbackprop.per_example import gradient_stats
from handbackprop.per_example import per_example_grad_norms
from handbackprop.per_example import per_example_grads
from handbackprop.rules import verify_jvp
from handbackprop.rules import verify_rule
from handbackprop.rules import verify_vjp
from handbackprop.train import Optimizer
from handbackprop.train import SGDState
from handbackprop.train import ShardedData
from handbackprop.train import TrainState
from handbackprop.train import apply_updates
from handbackprop.train import evaluate
from handbackprop.train import fit
from handbackprop.train import init_state
from handbackprop.train import process_rows
from handbackprop.train import sgd
from handbackprop.train import shard_data
from handbackprop.train import train_epoch
from handbackprop.verify import GradientReport
from handbackprop.verify import check_backprop
from handbackprop.verify import verify_gradient

__version__ = "0.1.0"

__all__ = (
    "Activation",
    "Cache",
    "ClippedGrad",
    "CurvatureReport",
    "DPSGD",
    "GradientReport",
    "GradientStats",
    "KronFactors",
    "Loss",
    "MLP",
    "Optimizer",
    "SGDState",
    "ShardedData",
    "TrainState",
    "activations",
    "apply_updates",
    "backprop",
    "check_backprop",
    "check_curvature",
    "checkpoint",
    "clipped_grad",
    "curvature",
    "data",
    "data_parallel_mesh",
    "delta_recursion",
    "deltas",
    "diag_ggn",
    "diag_hessian",
    "dp",
    "dp_epsilon",
    "dp_grad",
    "dp_sgd_step",
    "evaluate",
    "fit",
    "forward",
    "forward_cache",
    "ggn_vector_product",
    "gradient_stats",
    "hessian_vector_product",
    "init_params",
    "init_state",
    "kfac_factors",
    "loss",
    "losses",
    "noisy_mean",
    "numerical_grad",
    "parallel",
    "per_example_diag_ggn",
    "per_example_grad_norms",
    "per_example_grads",
    "process_rows",
    "sgd",
    "shard_data",
    "sharded_backprop",
    "sharded_clipped_grad",
    "sharded_dp_grad",
    "sharded_value_and_backprop",
    "testing",
    "train",
    "train_epoch",
    "tree_normal",
    "value_and_backprop",
    "verify_gradient",
    "verify_jvp",
    "verify_rule",
    "verify_vjp",
)
