"""Box utilities shared by matching, coding and post-processing (xyxy boxes)."""

import jax.numpy as jnp


def box_area(boxes):
  """[..., 4] xyxy -> [...] area, no +1 offset (torchvision.ops.box_area)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _unfused(p):
  """Keeps a product from being contracted into a fused multiply-add by XLA CPU (a no-op on values),
  so IoUs round exactly as torch's and tied matches resolve identically."""
  return jnp.where(p != p, jnp.nan, p)


def box_iou(boxes1, boxes2):
  """Pairwise IoU as torchvision.ops.box_iou, bit-identical under jit: [..., N, 4], [..., M, 4] -> [..., N, M]."""
  area1 = _unfused(box_area(boxes1))[..., :, None]
  area2 = _unfused(box_area(boxes2))[..., None, :]
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = _unfused(wh[..., 0] * wh[..., 1])
  return inter / (area1 + area2 - inter)


def clip_boxes(boxes, height, width):
  """Clamps [..., 4] xyxy boxes to [0, width] x [0, height]."""
  x = jnp.clip(boxes[..., 0::2], 0.0, width)
  y = jnp.clip(boxes[..., 1::2], 0.0, height)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)
