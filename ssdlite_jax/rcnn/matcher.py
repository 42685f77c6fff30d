"""torchvision's Matcher and BalancedPositiveNegativeSampler for Faster R-CNN training, on static shapes.

Ground truth is padded to a fixed count with a validity mask. Padded rows take no part anywhere, the low-quality
step included: a zero box has IoU 0 with every candidate, so torchvision's rule ("every candidate whose IoU equals
a ground truth's best gets its own best match") would otherwise make every candidate a match.
"""

import jax
import jax.numpy as jnp

from ssdlite_jax import boxes as box_ops

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def match(gt_boxes, gt_valid, candidates, high: float, low: float, allow_low_quality_matches: bool):
  """gt_boxes [M, 4] xyxy, gt_valid [M] bool, candidates [N, 4] xyxy -> [N] int32: the matched ground-truth index,
  BELOW_LOW_THRESHOLD (max IoU < low) or BETWEEN_THRESHOLDS (low <= max IoU < high); with
  allow_low_quality_matches, every candidate whose IoU with a ground truth equals that ground truth's best IoU gets
  its own best match back (torchvision's set_low_quality_matches_). No valid ground truth: all BELOW_LOW."""
  iou = jnp.where(gt_valid[:, None], box_ops.box_iou(gt_boxes, candidates), -1.0)        # [M, N]
  best, matches = iou.max(axis=0), jnp.argmax(iou, axis=0).astype(jnp.int32)
  out = jnp.where(best < low, BELOW_LOW_THRESHOLD, jnp.where(best < high, BETWEEN_THRESHOLDS, matches))
  if allow_low_quality_matches:
    best_per_gt = iou.max(axis=1, keepdims=True)
    update = ((iou == best_per_gt) & gt_valid[:, None]).any(axis=0)
    out = jnp.where(update, matches, out)
  return out


def _first_by_key(key, candidates, count):
  """[N] bool: `count` of the `candidates` (bool [N]), uniformly at random (the lowest uniform draws)."""
  draws = jnp.where(candidates, jax.random.uniform(key, candidates.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(draws))
  return candidates & (rank < count)


def balanced_sample(key, positive, negative, batch_size_per_image: int, positive_fraction: float):
  """positive, negative [N] bool -> (sampled positives, sampled negatives) [N] bool, as torchvision's
  BalancedPositiveNegativeSampler: min(#positive, int(batch_size_per_image * positive_fraction)) positives and
  min(#negative, batch_size_per_image - positives taken) negatives, each a uniform random subset."""
  num_pos = jnp.minimum(positive.sum(), int(batch_size_per_image * positive_fraction))
  num_neg = jnp.minimum(negative.sum(), batch_size_per_image - num_pos)
  pos_key, neg_key = jax.random.split(key)
  return _first_by_key(pos_key, positive, num_pos), _first_by_key(neg_key, negative, num_neg)
