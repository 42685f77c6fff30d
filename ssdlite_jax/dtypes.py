"""The dtype policy: compute in the model dtype, keep parameters, statistics, sums and losses wide."""

import jax
import jax.numpy as jnp


def wide_dtype(dtype):
  """The dtype of parameters, statistics and sums for compute dtype `dtype`: float32, or float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def compute_dtype(name: str):
  """The jnp dtype of a model config's `dtype` field; a clear error for an unknown name or float64 without x64."""
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r}; known: {sorted(DTYPES)}")
  if DTYPES[name] == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 or "
                     "jax.config.update('jax_enable_x64', True) first")
  return DTYPES[name]
