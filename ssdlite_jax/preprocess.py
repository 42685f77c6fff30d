"""Image preprocessing on device: torch's bilinear resize (align_corners=False, no antialias).

Images of different sizes share one compiled program: they are padded into a common uint8 canvas and
resized with per-image gather taps computed on the host with torch's float32 formula.
"""

import jax
import jax.numpy as jnp
import numpy as np


def bilinear_taps(in_size: int, out_size: int):
  """(i0, i1) int32 [out] source indices and w1 float32 [out] weights of torch's bilinear interpolation."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  i0 = src.astype(np.int32)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0).astype(np.int32)
  return i0, i1, w1


def _lerp(x, i0, i1, w1, axis):
  w1 = jnp.expand_dims(w1, tuple(range(1, x.ndim - axis)))
  return (1.0 - w1) * jnp.take(x, i0, axis=axis) + w1 * jnp.take(x, i1, axis=axis)


def resize_bilinear(image, taps_y, taps_x):
  """image [H, W, C] float, taps from bilinear_taps for each axis -> [out_h, out_w, C]."""
  return _lerp(_lerp(image, *taps_y, axis=0), *taps_x, axis=1)


def batch_taps(sizes, out_size):
  """Stacked taps for images of sizes [(h, w), ...] -> (taps_y, taps_x), each (i0, i1, w1) of [B, out]."""
  out_h, out_w = out_size
  ty = [bilinear_taps(h, out_h) for h, _ in sizes]
  tx = [bilinear_taps(w, out_w) for _, w in sizes]
  stack = lambda taps: tuple(np.stack(t) for t in zip(*taps))
  return stack(ty), stack(tx)


def resize_batch(canvas, taps_y, taps_x):
  """uint8 canvas [B, Hc, Wc, 3] (images top-left aligned) -> float32 [B, out_h, out_w, 3] in [0, 1]."""
  images = canvas.astype(jnp.float32) / 255.0
  return jax.vmap(resize_bilinear)(images, taps_y, taps_x)
