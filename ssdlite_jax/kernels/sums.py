"""Per-channel sums as matrix-vector products (XLA:CPU's column reductions are several times slower)."""

import jax.numpy as jnp
from jax import lax

from ssdlite_jax.dtypes import wide_dtype


def channel_sum(x):
  """Sum of x [..., C] over all but the last axis -> [C] in wide_dtype(x.dtype), as a ones-vector GEMV."""
  c, dtype = x.shape[-1], wide_dtype(x.dtype)
  x2 = x.reshape(-1, c).astype(dtype)
  ones = jnp.ones((x2.shape[0],), dtype)
  return lax.dot_general(ones, x2, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=dtype)
