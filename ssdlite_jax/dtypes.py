"""The dtype policy: compute in the model dtype, keep parameters, statistics, sums and losses wide."""

import jax.numpy as jnp


def wide_dtype(dtype):
  """The dtype of parameters, statistics and sums for compute dtype `dtype`: float32, or float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)
