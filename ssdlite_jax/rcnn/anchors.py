"""torchvision's AnchorGenerator for Faster R-CNN, on static shapes (numpy, float32).

Cell anchors: per aspect ratio ar (= h / w) and size s, round([-w, -h, w, h] / 2) with h = s sqrt(ar), w = s / sqrt(ar)
(round half to even), ratio-major. Grid: on a level of grid (gh, gw) over a padded batch (H, W), strides
(H // gh, W // gw) and shifts (x * stride_w, y * stride_h) with no half-cell offset; anchors in (y, x, anchor) order,
levels concatenated; not clipped.
"""

from typing import Sequence, Tuple

import numpy as np


def cell_anchors(sizes: Sequence[int], aspect_ratios: Sequence[float]) -> np.ndarray:
  """[len(ratios) * len(sizes), 4] xyxy px around (0, 0), ratio-major (index = r * len(sizes) + s)."""
  scales = np.asarray(sizes, np.float32)
  h_ratios = np.sqrt(np.asarray(aspect_ratios, np.float32))
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)).astype(np.float32)


def grid_anchors(grid_sizes: Sequence[Tuple[int, int]], canvas: Tuple[int, int], sizes: Sequence[int],
                 aspect_ratios: Sequence[float]) -> np.ndarray:
  """[sum_l gh_l * gw_l * A, 4] xyxy px of the padded batch canvas (H, W), for levels of grid (gh_l, gw_l). Every
  level uses the same cell anchors (the MobileNetV3 FPN models: 5 sizes x 3 ratios on each of three levels)."""
  base = cell_anchors(sizes, aspect_ratios)
  out = []
  for gh, gw in grid_sizes:
    stride_h, stride_w = canvas[0] // gh, canvas[1] // gw
    ys, xs = np.meshgrid(np.arange(gh) * stride_h, np.arange(gw) * stride_w, indexing="ij")
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4).astype(np.float32)
    out.append((shifts + base[None]).reshape(-1, 4))
  return np.concatenate(out)
