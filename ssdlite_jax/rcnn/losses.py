"""Faster R-CNN's training targets and losses (torchvision's RegionProposalNetwork.compute_loss and
roi_heads.fastrcnn_loss) on static shapes, given the sampled masks (matcher.balanced_sample draws them).

RPN: anchors matched at 0.7 / 0.3 with low-quality matches; BCE with logits, mean over the sampled anchors of the
batch; smooth L1 (beta 1/9) on the positives' (1, 1, 1, 1)-coded deltas, summed and divided by the sampled count.
RoI heads: proposals matched at 0.5 / 0.5; cross entropy, mean over the sampled RoIs; smooth L1 (beta 1/9) on the
positives' deltas of their own class, (10, 10, 5, 5)-coded, summed and divided by the sampled count. Counts pool
over the batch given (call it per replica, as torchvision's per-GPU losses).
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from ssdlite_jax import box_coder
from ssdlite_jax.dtypes import wide_dtype
from ssdlite_jax.rcnn import matcher
from ssdlite_jax.rcnn.proposals import RPN_WEIGHTS

BETA = 1.0 / 9.0


def smooth_l1(x, beta: float = BETA):
  """torch's smooth_l1_loss elementwise: 0.5 x^2 / beta below beta, |x| - beta / 2 above."""
  n = jnp.abs(x)
  return jnp.where(n < beta, 0.5 * n * n / beta, n - 0.5 * beta)


def _coded(gt_boxes, matches, candidates, positive, weights):
  """The positives' matched ground truth coded against their candidates; zeros elsewhere, where a degenerate
  candidate (a padded zero box appended to the proposals) would code to NaN and poison the loss's gradient."""
  return jnp.where(positive[:, None], box_coder.encode(gt_boxes[jnp.maximum(matches, 0)], candidates, weights), 0.0)


def rpn_targets(gt_boxes, gt_valid, anchors) -> Tuple[jax.Array, jax.Array]:
  """gt_boxes [M, 4] xyxy px (padded), gt_valid [M], anchors [A, 4] -> (labels [A] float32: 1 matched, 0
  background, -1 ignored; regression targets [A, 4], zero where not matched)."""
  matches = matcher.match(gt_boxes, gt_valid, anchors, 0.7, 0.3, allow_low_quality_matches=True)
  labels = jnp.where(matches >= 0, 1.0, jnp.where(matches == matcher.BETWEEN_THRESHOLDS, -1.0, 0.0))
  return labels, _coded(gt_boxes, matches, anchors, matches >= 0, RPN_WEIGHTS)


def rpn_loss(objectness, deltas, targets, sampled_pos, sampled_neg) -> Dict[str, jax.Array]:
  """objectness [B, A] logits, deltas [B, A, 4], targets [B, A, 4], sampled_pos / sampled_neg [B, A] bool ->
  {"loss_objectness", "loss_rpn_box_reg"} (scalars; float32, float64 for float64 inputs)."""
  wide = wide_dtype(objectness.dtype)
  sampled = sampled_pos | sampled_neg
  count = jnp.maximum(sampled.sum(), 1).astype(wide)
  x, y = objectness.astype(wide), sampled_pos.astype(wide)
  bce = jnp.maximum(x, 0.0) - x * y + jnp.log1p(jnp.exp(-jnp.abs(x)))
  box = smooth_l1(deltas.astype(wide) - targets)
  return {"loss_objectness": jnp.sum(jnp.where(sampled, bce, 0.0)) / count,
          "loss_rpn_box_reg": jnp.sum(jnp.where(sampled_pos[..., None], box, 0.0)) / count}


def roi_targets(gt_boxes, gt_labels, gt_valid, proposals, weights=box_coder.DEFAULT_WEIGHTS):
  """gt_boxes [M, 4], gt_labels [M] int, gt_valid [M], proposals [R, 4] -> (labels [R] int32: the matched class or
  0 for background, regression targets [R, 4], zero for background)."""
  matches = matcher.match(gt_boxes, gt_valid, proposals, 0.5, 0.5, allow_low_quality_matches=False)
  labels = jnp.where(matches >= 0, gt_labels[jnp.maximum(matches, 0)], 0).astype(jnp.int32)
  return labels, _coded(gt_boxes, matches, proposals, matches >= 0, weights)


def roi_loss(class_logits, box_deltas, labels, targets, sampled) -> Dict[str, jax.Array]:
  """class_logits [B, R, K], box_deltas [B, R, K, 4], labels [B, R] int, targets [B, R, 4], sampled [B, R] bool ->
  {"loss_classifier", "loss_box_reg"} (scalars; float32, float64 for float64 inputs)."""
  wide = wide_dtype(class_logits.dtype)
  count = jnp.maximum(sampled.sum(), 1).astype(wide)
  logp = jax.nn.log_softmax(class_logits.astype(wide), axis=-1)
  ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  own = jnp.take_along_axis(box_deltas.astype(wide), labels[..., None, None], axis=-2)[..., 0, :]
  positive = sampled & (labels > 0)
  box = smooth_l1(own - targets)
  return {"loss_classifier": jnp.sum(jnp.where(sampled, ce, 0.0)) / count,
          "loss_box_reg": jnp.sum(jnp.where(positive[..., None], box, 0.0)) / count}
