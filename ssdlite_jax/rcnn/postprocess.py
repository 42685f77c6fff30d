"""torchvision's RoIHeads.postprocess_detections on static shapes, one image at a time (vmap over a batch).

Every proposal's box decoded for every class with (10, 10, 5, 5) and clipped to the resized image; softmax
scores; background dropped; candidates kept if score > box_score_thresh and w, h >= 1e-2 (no per-class top-k);
greedy NMS within each class (ssdlite_jax.nms); the best detections_per_img by score. Padded proposals
(valid False) give no candidate.
"""

from typing import Dict

import jax
import jax.numpy as jnp
from jax import lax

from ssdlite_jax import box_coder, boxes as box_ops
from ssdlite_jax.nms import per_class_nms

MIN_SIZE = 1e-2


def detections(class_logits, box_deltas, proposals, proposal_valid, image_size, score_thresh: float,
               nms_thresh: float, detections_per_img: int, weights=box_coder.DEFAULT_WEIGHTS) -> Dict[str, jax.Array]:
  """class_logits [P, K], box_deltas [P, K, 4], proposals [P, 4] xyxy px, proposal_valid [P], image_size [2] (h, w)
  -> {"boxes" [D, 4] xyxy px of the resized image, "scores" [D], "labels" [D] int32, "valid" [D]} sorted by score
  (invalid rows zero), D = min(detections_per_img, P * (K - 1))."""
  boxes = box_coder.decode(box_deltas.astype(jnp.float32), proposals[:, None, :], weights)[:, 1:]   # [P, C, 4]
  boxes = box_ops.clip_boxes(boxes, image_size[0], image_size[1])
  scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:]                        # [P, C]
  wide = ((boxes[..., 2] - boxes[..., 0]) >= MIN_SIZE) & ((boxes[..., 3] - boxes[..., 1]) >= MIN_SIZE)
  valid = proposal_valid[:, None] & (scores > score_thresh) & wide
  # Per class, the candidates by descending score (ties: lower proposal first), as NMS takes them.
  cand_scores, order = lax.top_k(jnp.where(valid, scores, -jnp.inf).T, scores.shape[0])             # [C, P]
  cand_boxes = jnp.take_along_axis(boxes.transpose(1, 0, 2), order[..., None], axis=1)            # [C, P, 4]
  keep = per_class_nms(cand_boxes, cand_scores > -jnp.inf, nms_thresh)
  d = min(detections_per_img, keep.size)
  out_scores, flat = lax.top_k(jnp.where(keep, cand_scores, -jnp.inf).reshape(-1), d)
  out_valid = out_scores > -jnp.inf
  return {"boxes": jnp.where(out_valid[:, None], cand_boxes.reshape(-1, 4)[flat], 0.0),
          "scores": jnp.where(out_valid, out_scores, 0.0),
          "labels": jnp.where(out_valid, (flat // scores.shape[0] + 1).astype(jnp.int32), 0),
          "valid": out_valid}
