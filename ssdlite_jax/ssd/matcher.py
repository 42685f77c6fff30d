"""Anchor matching with torchvision's SSDMatcher semantics, for fixed-size (padded) ground truth."""

import jax.numpy as jnp

from ssdlite_jax.boxes import box_iou


def match_anchors(gt_boxes, gt_mask, anchors, iou_threshold=0.5):
  """Index of the GT matched to each anchor: [M, 4] xyxy px, [M] bool, [A, 4] xyxy px -> [A] int32.

  -1 marks background. As torchvision's SSDMatcher (CPU): each anchor takes its best GT (first GT on
  ties) when IoU >= iou_threshold; then every GT is forced onto its single best anchor (first anchor on
  ties, anchor 0 when it overlaps nothing), the higher GT index winning a shared anchor. Slots with
  gt_mask False take part in neither step, so an image without valid boxes is all background.
  """
  num_gt, num_anchors = gt_boxes.shape[0], anchors.shape[0]
  iou = jnp.where(gt_mask[:, None], box_iou(gt_boxes, anchors), -1.0)            # [M, A]
  matched = jnp.where(iou.max(axis=0) >= iou_threshold, jnp.argmax(iou, axis=0), -1)
  # Padded rows would argmax to anchor 0: send them out of range so the scatter drops them.
  best_anchor = jnp.where(gt_mask, jnp.argmax(iou, axis=1), num_anchors)         # [M]
  forced = jnp.full((num_anchors,), -1, jnp.int32).at[best_anchor].max(
      jnp.arange(num_gt, dtype=jnp.int32), mode="drop")
  return jnp.where(forced >= 0, forced, matched).astype(jnp.int32)
