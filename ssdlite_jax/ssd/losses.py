"""SSD multibox loss with torchvision's SSD.compute_loss semantics (matching included).

Smooth L1 (beta 1) on the (10, 10, 5, 5)-coded offsets of foreground anchors, plus softmax cross
entropy over the positives and the 3·|P_i| hardest negatives of each image; both summed and divided
by max(1, N), N the number of foreground anchors in the batch given (call it per replica for
torchvision's per-GPU normaliser). Everything is computed in float32 (float64 for float64 logits).
"""

import jax
import jax.numpy as jnp

from ssdlite_jax import box_coder
from ssdlite_jax.ssd.matcher import match_anchors
from ssdlite_jax.dtypes import wide_dtype


def _smooth_l1(x):
  """Elementwise smooth L1 with beta 1, written as torch.nn.functional.smooth_l1_loss."""
  n = jnp.abs(x)
  return jnp.where(n < 1.0, 0.5 * n * n, n - 0.5)


def _hard_negative_ce(ce, positive, neg_to_pos_ratio):
  """Sum over images of the CE [B, A] of the anchors ranked below neg_to_pos_ratio·|P_i| -> scalar.

  Anchors are ranked by CE, descending, with positives at -inf, as torchvision does. When the count
  exceeds the negatives, positives are selected too and so counted a second time; which positives
  then depends on the order of the -inf ties, which torch's unstable sort leaves unspecified: here
  the lowest anchor indices come first (stable sort).
  """
  num_selected = neg_to_pos_ratio * positive.sum(axis=1, keepdims=True).astype(ce.dtype)
  order = jnp.argsort(-jnp.where(positive, -jnp.inf, ce), axis=1, stable=True)
  ranked_ce = jnp.take_along_axis(ce, order, axis=1)
  rank = jnp.arange(ce.shape[1], dtype=ce.dtype)
  return jnp.sum(jnp.where(rank < num_selected, ranked_ce, 0.0))


def multibox_loss(cls_logits, bbox_regression, anchors, boxes, labels, mask, neg_to_pos_ratio=3.0):
  """torchvision's SSD losses for a batch.

  Args:
    cls_logits: [B, A, K] class logits (class 0 = background); any float dtype.
    bbox_regression: [B, A, 4] predicted box offsets.
    anchors: [A, 4] xyxy px.
    boxes: [B, M, 4] xyxy px ground truth, padded to M.
    labels: [B, M] int class ids; anchors whose label is > 0 are the positives.
    mask: [B, M] bool, False on padded slots.
    neg_to_pos_ratio: negatives kept per positive in each image.

  Returns:
    {"bbox_regression": scalar, "classification": scalar, "num_positives": scalar}: the two losses
    (already divided by max(1, N)) and N, the count of foreground (matched) anchors, all float32
    (float64 for float64 logits).
  """
  dtype = wide_dtype(cls_logits.dtype)
  anchors = jnp.asarray(anchors, dtype)
  cls_logits = cls_logits.astype(dtype)
  bbox_regression = bbox_regression.astype(dtype)
  matched = jax.vmap(match_anchors, in_axes=(0, 0, None))(boxes, mask, anchors)    # [B, A]
  foreground = matched >= 0
  gt_index = jnp.maximum(matched, 0)
  num_foreground = foreground.sum().astype(dtype)
  normalizer = jnp.maximum(1.0, num_foreground)

  matched_boxes = jnp.take_along_axis(boxes.astype(dtype), gt_index[..., None], axis=1)
  # Background anchors regress onto themselves: zero targets instead of log(0) from padded boxes.
  matched_boxes = jnp.where(foreground[..., None], matched_boxes, anchors)
  box_error = _smooth_l1(bbox_regression - box_coder.encode(matched_boxes, anchors))
  box_loss = jnp.sum(jnp.where(foreground[..., None], box_error, 0.0))

  cls_targets = jnp.where(foreground, jnp.take_along_axis(labels, gt_index, axis=1), 0)
  log_probs = jax.nn.log_softmax(cls_logits, axis=-1)
  ce = -jnp.take_along_axis(log_probs, cls_targets[..., None], axis=-1)[..., 0]      # [B, A]
  positive = cls_targets > 0
  cls_loss = (jnp.sum(jnp.where(positive, ce, 0.0))
              + _hard_negative_ce(ce, positive, neg_to_pos_ratio))
  return {
      "bbox_regression": box_loss / normalizer,
      "classification": cls_loss / normalizer,
      "num_positives": num_foreground,
  }
