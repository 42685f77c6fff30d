"""SSD default boxes (anchors) with torchvision's DefaultBoxGenerator semantics.

Anchors are static: computed once in numpy from the feature-map sizes and returned as [A, 4] xyxy
pixels of the model input (not clipped to the image; only w/h are clamped to [0, 1]). As torchvision,
the normalised centres and (w, h) pairs are float32 and the pixel boxes are formed in the model's
dtype (float32, or float64 for a float64 model).
"""

import math
from typing import Optional, Sequence, Tuple

import numpy as np


def anchor_scales(num_levels: int, min_ratio: float, max_ratio: float) -> list:
  """The s_k of the SSD paper, with 1.0 appended (len num_levels + 1)."""
  if num_levels == 1:
    return [min_ratio, max_ratio]
  step = (max_ratio - min_ratio) / (num_levels - 1.0)
  return [min_ratio + step * k for k in range(num_levels)] + [1.0]


def wh_pairs(scales: Sequence[float], aspect_ratios: Sequence[Sequence[float]]) -> list:
  """Per level, the [n_k, 2] float32 (w, h) pairs normalised to the image side, in torchvision order."""
  pairs = []
  for k, ratios in enumerate(aspect_ratios):
    s_k = scales[k]
    s_prime = math.sqrt(scales[k] * scales[k + 1])
    level = [[s_k, s_k], [s_prime, s_prime]]
    for ar in ratios:
      sq = math.sqrt(ar)
      w, h = s_k * sq, s_k / sq
      level.extend([[w, h], [h, w]])
    pairs.append(np.asarray(level, dtype=np.float64).astype(np.float32))
  return pairs


def num_anchors_per_location(aspect_ratios: Sequence[Sequence[float]]) -> Tuple[int, ...]:
  return tuple(2 + 2 * len(r) for r in aspect_ratios)


def default_boxes(feature_sizes: Sequence[Tuple[int, int]],
                  image_size: Tuple[int, int],
                  aspect_ratios: Sequence[Sequence[float]],
                  min_ratio: float = 0.15,
                  max_ratio: float = 0.9,
                  scales: Optional[Sequence[float]] = None,
                  steps: Optional[Sequence[int]] = None,
                  clip: bool = True,
                  dtype=np.float32) -> np.ndarray:
  """Anchors [A, 4] xyxy pixels (`dtype`) for feature maps [(h, w), ...] of an image (H, W).

  Order: level, then row-major cell (y outer, x inner), then the level's (w, h) pairs.
  """
  if len(aspect_ratios) != len(feature_sizes):
    raise ValueError(f"aspect_ratios has {len(aspect_ratios)} levels but the backbone gives "
                     f"{len(feature_sizes)} feature maps")
  if scales is None:
    scales = anchor_scales(len(feature_sizes), min_ratio, max_ratio)
  elif len(scales) != len(feature_sizes) + 1:
    raise ValueError(f"scales needs {len(feature_sizes) + 1} values, got {len(scales)}")
  if steps is not None and len(steps) != len(feature_sizes):
    raise ValueError(f"steps needs {len(feature_sizes)} values, got {len(steps)}")
  img_h, img_w = image_size
  pairs = wh_pairs(scales, aspect_ratios)
  out = []
  for k, (f_h, f_w) in enumerate(feature_sizes):
    if steps is not None:
      x_fk, y_fk = img_w / steps[k], img_h / steps[k]
    else:
      y_fk, x_fk = f_h, f_w
    shifts_x = ((np.arange(f_w, dtype=np.float32) + np.float32(0.5)) / np.float32(x_fk))
    shifts_y = ((np.arange(f_h, dtype=np.float32) + np.float32(0.5)) / np.float32(y_fk))
    sy, sx = np.meshgrid(shifts_y, shifts_x, indexing="ij")
    centers = np.stack([sx.reshape(-1), sy.reshape(-1)], axis=-1).astype(dtype)   # [HW, 2]
    wh = (np.clip(pairs[k], 0.0, 1.0) if clip else pairs[k]).astype(dtype)          # [n, 2]
    centers = np.repeat(centers, len(wh), axis=0)                                   # [HW*n, 2]
    wh = np.tile(wh, (f_h * f_w, 1))
    size = np.asarray([img_w, img_h], dtype=dtype)
    # torchvision 0.29's order: the normalised corners (c -/+ w/2), then scaled to pixels.
    half = np.asarray(0.5, dtype) * wh
    out.append(np.concatenate([(centers - half) * size, (centers + half) * size], axis=-1))
  return np.concatenate(out, axis=0).astype(dtype)
