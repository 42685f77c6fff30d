"""Greedy non-maximum suppression as torchvision's NMS kernel decides it, on static shapes: suppress IoU > threshold
(the float32 IoU against the float64 threshold), groups (classes, levels) independent, invalid entries neither kept
nor suppressing. A zero-area box has IoU 0 or 0/0 = NaN with every box, so it never suppresses and is never
suppressed."""

import jax.numpy as jnp
import numpy as np
from jax import lax

from ssdlite_jax import boxes as box_ops


def float32_iou_threshold(threshold: float, inclusive: bool = False) -> np.float32:
  """The float32 t for which a float32 IoU test `iou > t` (inclusive: `iou >= t`, as LiteRT's NMS) decides as
  torchvision's NMS kernel, which compares the float32 IoU with the float64 `threshold`: t is the largest float32
  <= threshold (inclusive: the next float32 above that). For 0.55, float32(0.55) is above 0.55, so an IoU of exactly
  float32(0.55) is suppressed, which `iou > float32(0.55)` would keep."""
  t = np.float32(threshold)
  if float(t) > threshold:   # in float64 (numpy would compare in float32)
    t = np.nextafter(t, np.float32(-np.inf))
  return np.nextafter(t, np.float32(np.inf)) if inclusive else t


# Above this many [C, T, T] IoU entries the IoUs are computed one row per greedy step instead of up front (same
# values): 150 proposals x 90 classes precompute 2M, 1000 x 90 would hold 90M.
PRECOMPUTE_LIMIT = 1 << 23


def per_class_nms(boxes, valid, iou_threshold: float):
  """Greedy NMS in each class (or level) independently.

  boxes [C, T, 4] sorted by descending score within each class, valid [C, T] bool -> keep [C, T] bool.
  Up to PRECOMPUTE_LIMIT, the [C, T, T] "j is suppressed by i" mask is computed once up front (the IoU of
  torchvision's NMS kernel); the sequential greedy pass then only ORs its rows, which makes the T-step loop ~4x
  cheaper on CPU than computing IoUs inside it. Above it, each step computes its row.
  """
  num = boxes.shape[1]
  idx = jnp.arange(num)
  threshold = float32_iou_threshold(iou_threshold)
  if boxes.shape[0] * num * num <= PRECOMPUTE_LIMIT:
    overlaps = (box_ops.box_iou(boxes, boxes) > threshold) & (idx[None, :] > idx[:, None])[None]
    row = lambda i: overlaps[:, i]
  else:
    row = lambda i: (box_ops.box_iou(lax.dynamic_slice_in_dim(boxes, i, 1, axis=1), boxes)[:, 0] > threshold) & (
        idx > i)[None]

  def body(i, state):
    keep, suppressed = state
    keep_i = valid[:, i] & ~suppressed[:, i]
    suppressed = suppressed | (keep_i[:, None] & row(i))
    return keep.at[:, i].set(keep_i), suppressed

  keep, _ = lax.fori_loop(0, num, body, (jnp.zeros_like(valid), jnp.zeros_like(valid)))
  return keep
