"""torchvision's RegionProposalNetwork.filter_proposals on static shapes, one image at a time (vmap over a batch).

Per level the top min(pre_nms_top_n, level size) objectness logits (sorted); their anchors decoded with weights
(1, 1, 1, 1) and clipped to the resized image; kept if w, h >= 1e-3 and sigmoid(logit) >= score_thresh; greedy NMS
within each level (ssdlite_jax.nms); the best post_nms_top_n over all levels by probability. The candidates keep
torchvision's order (level-major, then by logit), so ties among saturated probabilities resolve as its CPU kernel.
"""

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from ssdlite_jax import box_coder, boxes as box_ops
from ssdlite_jax.nms import per_class_nms

RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
MIN_SIZE = 1e-3


def num_proposals(level_sizes: Sequence[int], pre_nms_top_n: int, post_nms_top_n: int) -> int:
  """The static proposal count P (valid ones are a prefix of it)."""
  return min(post_nms_top_n, len(level_sizes) * min(pre_nms_top_n, max(level_sizes)))


def propose(objectness, deltas, anchors, image_size, level_sizes: Sequence[int], pre_nms_top_n: int,
            post_nms_top_n: int, nms_thresh: float, score_thresh: float) -> Dict[str, jax.Array]:
  """objectness [A] logits, deltas [A, 4], anchors [A, 4] xyxy px of the canvas (levels of `level_sizes` anchors,
  concatenated), image_size [2] (h, w) of the resized image -> {"boxes" [P, 4] xyxy px, "scores" [P] probabilities,
  "valid" [P] bool}, sorted by score (invalid rows zero)."""
  k = min(pre_nms_top_n, max(level_sizes))
  logits, index, valid = [], [], []
  start = 0
  for size in level_sizes:
    k_level = min(pre_nms_top_n, size)
    top, idx = lax.top_k(objectness[start:start + size], k_level)
    pad = k - k_level
    logits.append(jnp.pad(top, (0, pad), constant_values=-jnp.inf))
    index.append(jnp.pad(idx + start, (0, pad)))
    valid.append(jnp.arange(k) < k_level)
    start += size
  logits, index, valid = jnp.stack(logits), jnp.stack(index), jnp.stack(valid)          # [L, k]
  boxes = box_coder.decode(deltas[index], anchors[index], RPN_WEIGHTS)
  boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])
  prob = jax.nn.sigmoid(logits)
  wide = ((boxes[..., 2] - boxes[..., 0]) >= MIN_SIZE) & ((boxes[..., 3] - boxes[..., 1]) >= MIN_SIZE)
  valid = valid & wide & (prob >= score_thresh)
  keep = per_class_nms(boxes, valid, nms_thresh)
  scores, order = lax.top_k(jnp.where(keep, prob, -jnp.inf).reshape(-1),
                            num_proposals(level_sizes, pre_nms_top_n, post_nms_top_n))
  out_valid = scores > -jnp.inf
  return {"boxes": jnp.where(out_valid[:, None], boxes.reshape(-1, 4)[order], 0.0),
          "scores": jnp.where(out_valid, scores, 0.0), "valid": out_valid}
