"""torchvision.ops.roi_align with aligned=False, as its C++/CUDA kernel computes it, as gathers on static shapes.

Per RoI (x1, y1, x2, y2) * spatial_scale: size max(x2 - x1, 1) x max(y2 - y1, 1), cut into out x out bins, each
sampled on a sampling_ratio x sampling_ratio grid at the sub-bin centres; a sample with y < -1, y > H, x < -1 or
x > W contributes 0 (and still counts in the average), others are clamped at 0 from below and interpolated
bilinearly (at or past the last row/column, the last one); each bin is the mean of its samples.
"""

import jax
import jax.numpy as jnp


def _axis_samples(start, size, out: int, ratio: int, limit: int):
  """Sample coordinates along one axis for RoIs [R] -> (low [R, S] int32, high [R, S] int32, frac [R, S], inside
  [R, S] bool), S = out * ratio, in bin-major order."""
  bin_size = size / out
  bins = jnp.repeat(jnp.arange(out, dtype=start.dtype), ratio)
  sub = jnp.tile(jnp.arange(ratio, dtype=start.dtype) + 0.5, out)
  pos = start[:, None] + bins[None] * bin_size[:, None] + sub[None] * bin_size[:, None] / ratio
  inside = (pos >= -1.0) & (pos <= limit)
  pos = jnp.maximum(pos, 0.0)
  low = jnp.floor(pos).astype(jnp.int32)
  last = low >= limit - 1
  low = jnp.where(last, limit - 1, low)
  high = jnp.where(last, limit - 1, low + 1)
  pos = jnp.where(last, low.astype(pos.dtype), pos)
  return low, high, pos - low, inside


def roi_align(features, rois, batch_index, spatial_scale: float, output_size: int = 7, sampling_ratio: int = 2):
  """features [B, H, W, C], rois [R, 4] xyxy px of the input, batch_index [R] int32 -> [R, out, out, C]."""
  _, h, w, _ = features.shape
  boxes = rois.astype(features.dtype) * spatial_scale
  x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
  ylo, yhi, ly, yin = _axis_samples(y1, jnp.maximum(y2 - y1, 1.0), output_size, sampling_ratio, h)
  xlo, xhi, lx, xin = _axis_samples(x1, jnp.maximum(x2 - x1, 1.0), output_size, sampling_ratio, w)
  hy, hx = 1.0 - ly, 1.0 - lx

  def one(b, ylo, yhi, ly, hy, yin, xlo, xhi, lx, hx, xin):
    at = lambda ys, xs: features[b, ys[:, None], xs[None, :]]                # [S, S, C], one gather under vmap
    w = lambda a, b: (a[:, None] * b[None, :])[..., None]
    v = (w(hy, hx) * at(ylo, xlo) + w(hy, lx) * at(ylo, xhi) + w(ly, hx) * at(yhi, xlo) + w(ly, lx) * at(yhi, xhi))
    v = jnp.where((yin[:, None] & xin[None, :])[..., None], v, 0.0)
    s = v.shape[0] // sampling_ratio
    v = v.reshape(s, sampling_ratio, s, sampling_ratio, -1)
    return v.sum(axis=(1, 3)) / (sampling_ratio * sampling_ratio)

  return jax.vmap(one)(batch_index, ylo, yhi, ly, hy, yin, xlo, xhi, lx, hx, xin)
