"""torchvision's GeneralizedRCNNTransform for inference, split into a host plan and a device program.

Per image (h, w): scale = min(min_size / min(h, w), max_size / max(h, w)) in float64 and the resized size
(int(h * scale), int(w * scale)) (truncated: the short side can come out one pixel short, 319 for 320); bilinear
resize without antialias (torch's taps between the integer sizes, preprocess.bilinear_taps); ImageNet
normalisation; the batch padded with zeros (in normalised space) to a canvas of multiples of size_divisible
over the largest resized image. The canvas shape is the compiled program's: one program per canvas.
"""

import math
from typing import Dict, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from ssdlite_jax import preprocess


def resized_size(h: int, w: int, min_size: int, max_size: int) -> Tuple[int, int]:
  """(h', w') of an h x w image, as torchvision computes it (float64 scale, truncation)."""
  scale = min(float(min_size) / min(h, w), float(max_size) / max(h, w))
  return int(math.floor(h * scale)), int(math.floor(w * scale))


def plan(sizes: Sequence[Tuple[int, int]], min_size: int, max_size: int, size_divisible: int) -> Dict[str, np.ndarray]:
  """Host side for images of `sizes` [(h, w), ...]: bilinear taps onto the canvas (past an image's resized size
  they read pixel 0; normalize masks them), and image_sizes int32 [B, 2] (h', w')."""
  resized = [resized_size(h, w, min_size, max_size) for h, w in sizes]
  canvas = [-(-max(s[i] for s in resized) // size_divisible) * size_divisible for i in (0, 1)]
  taps = ([], [])
  for (h, w), new in zip(sizes, resized):
    for axis, (n, m) in enumerate(((h, new[0]), (w, new[1]))):
      i0, i1, w1 = preprocess.bilinear_taps(n, m)
      pad = canvas[axis] - m
      taps[axis].append((np.pad(i0, (0, pad)), np.pad(i1, (0, pad)), np.pad(w1, (0, pad))))
  stack = lambda t: tuple(np.stack(x) for x in zip(*t))
  return {"taps_y": stack(taps[0]), "taps_x": stack(taps[1]), "image_sizes": np.asarray(resized, np.int32)}


def apply(canvas, plan, mean, std):
  """uint8 canvas [B, Hc, Wc, 3] (images top-left aligned) -> the normalised, zero-padded batch [B, H, W, 3]."""
  return normalize(preprocess.resize_batch(canvas, plan["taps_y"], plan["taps_x"]), plan["image_sizes"], mean, std)


def normalize(images, image_sizes, mean, std):
  """Resized images [B, H, W, 3] in [0, 1] on their canvas, image_sizes int32 [B, 2] (h', w') -> ImageNet-normalised,
  zero (in normalised space) past each image's size, as torchvision's batch padding."""
  images = (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  rows = jnp.arange(images.shape[1]) < image_sizes[:, :1]                               # [B, H]
  cols = jnp.arange(images.shape[2]) < image_sizes[:, 1:]                               # [B, W]
  return jnp.where(rows[:, :, None, None] & cols[:, None, :, None], images, 0.0)
