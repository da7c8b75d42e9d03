"""Test configuration: float64 available, rank promotion an error (a (n,1) vs (n,) slip
fails loudly), one CPU device for this process."""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
