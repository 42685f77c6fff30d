"""SSD box coding: xyxy boxes <-> (tx, ty, tw, th) offsets relative to anchors.

torchvision's BoxCoder with weights (wx, wy, ww, wh) = (10, 10, 5, 5) and the decode clamp
ln(1000 / 16); everything in absolute pixels of the model input.
"""

import math

import jax.numpy as jnp

DEFAULT_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _centers(boxes):
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes, anchors, weights=DEFAULT_WEIGHTS):
  """Offsets of `boxes` [..., A, 4] xyxy px relative to `anchors` [A, 4] xyxy px -> [..., A, 4]."""
  wx, wy, ww, wh = weights
  acx, acy, aw, ah = _centers(anchors)
  gcx, gcy, gw, gh = _centers(boxes)
  return jnp.stack([
      wx * (gcx - acx) / aw,
      wy * (gcy - acy) / ah,
      ww * jnp.log(gw / aw),
      wh * jnp.log(gh / ah),
  ], axis=-1)


def decode(rel_codes, anchors, weights=DEFAULT_WEIGHTS):
  """Boxes [..., A, 4] xyxy px from offsets [..., A, 4] and anchors [A, 4] xyxy px."""
  wx, wy, ww, wh = weights
  anchors = anchors.astype(rel_codes.dtype)
  acx, acy, aw, ah = _centers(anchors)
  dx = rel_codes[..., 0] / wx
  dy = rel_codes[..., 1] / wy
  dw = jnp.minimum(rel_codes[..., 2] / ww, BBOX_XFORM_CLIP)
  dh = jnp.minimum(rel_codes[..., 3] / wh, BBOX_XFORM_CLIP)
  cx = dx * aw + acx
  cy = dy * ah + acy
  w = jnp.exp(dw) * aw
  h = jnp.exp(dh) * ah
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
