"""Detection post-processing as torchvision's SSD.postprocess_detections, batched with static shapes.

Per image: softmax scores; boxes decoded from every anchor and clipped to the model input; for each
foreground class, scores > score_thresh, top `topk_candidates`; exact per-class greedy NMS (ssdlite_jax.nms);
the best `detections_per_img` overall, sorted by descending score; boxes rescaled to the original image size.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ssdlite_jax import box_coder, boxes as box_ops
from ssdlite_jax.nms import per_class_nms


def decode_boxes(bbox_regression, anchors, image_size, weights=box_coder.DEFAULT_WEIGHTS):
  """bbox_regression [..., A, 4] -> boxes [..., A, 4] xyxy px decoded from the anchors [A, 4] and clipped to the
  (H, W) = image_size model input (also the tflite and onnx exports' JAX part)."""
  return box_ops.clip_boxes(box_coder.decode(bbox_regression, anchors, weights), *image_size)


def selection_sizes(config, num_anchors: int):
  """(k, D) of `config`'s selection over `num_anchors` anchors, as select() takes them: k = min(topk_candidates, A)
  candidates per foreground class, D = min(detections_per_img, (num_classes - 1) * k) detections. The export
  graphs' static sizes."""
  k = min(config.topk_candidates, num_anchors)
  return k, min(config.detections_per_img, (config.num_classes - 1) * k)


def select(boxes, cls_logits, score_thresh, nms_thresh, topk_candidates, detections_per_img):
  """One image's selection: boxes [A, 4] xyxy model px (decoded, clipped), cls_logits [A, K] -> dict of boxes
  [D, 4] model px, scores [D], labels [D] int32, valid [D] bool (invalid slots zero), sorted by score. Per foreground
  class, the top `topk_candidates` scores > score_thresh, greedy NMS; then the best D overall, ties to the lower
  (class, candidate) index. Every export format builds this in its runtime's ops."""
  scores = jax.nn.softmax(cls_logits.astype(jnp.float32), axis=-1)[:, 1:].T           # [C, A] foreground
  masked = jnp.where(scores > score_thresh, scores, -jnp.inf)
  k = min(topk_candidates, masked.shape[1])
  cand_scores, cand_idx = lax.top_k(masked, k)                                        # [C, k]
  cand_valid = cand_scores > -jnp.inf
  cand_boxes = boxes[cand_idx]                                                         # [C, k, 4]
  keep = per_class_nms(cand_boxes, cand_valid, nms_thresh)
  flat_scores = jnp.where(keep, cand_scores, -jnp.inf).reshape(-1)
  d = min(detections_per_img, flat_scores.shape[0])
  out_scores, order = lax.top_k(flat_scores, d)
  out_valid = out_scores > -jnp.inf
  return {
      "boxes": jnp.where(out_valid[:, None], cand_boxes.reshape(-1, 4)[order], 0.0),
      "scores": jnp.where(out_valid, out_scores, 0.0),
      "labels": jnp.where(out_valid, (order // k + 1).astype(jnp.int32), 0),
      "valid": out_valid,
  }


def _postprocess_one(cls_logits, bbox_regression, anchors, orig_size, image_size, score_thresh, nms_thresh,
                     topk_candidates, detections_per_img, weights):
  img_h, img_w = image_size
  boxes = decode_boxes(bbox_regression, anchors, image_size, weights)
  out = select(boxes, cls_logits, score_thresh, nms_thresh, topk_candidates, detections_per_img)
  orig_h, orig_w = orig_size[0].astype(jnp.float32), orig_size[1].astype(jnp.float32)
  ratio = jnp.stack([orig_w / img_w, orig_h / img_h] * 2)
  return {**out, "boxes": out["boxes"] * ratio}


def postprocess(cls_logits, bbox_regression, anchors, orig_sizes, image_size, score_thresh=0.001,
                nms_thresh=0.55, topk_candidates=300, detections_per_img=300,
                weights=box_coder.DEFAULT_WEIGHTS):
  """Batched detections from head outputs.

  cls_logits [B, A, K], bbox_regression [B, A, 4], anchors [A, 4] xyxy px of the (H, W) = image_size model
  input, orig_sizes [B, 2] (height, width) -> dict of boxes [B, D, 4] xyxy original pixels, scores [B, D],
  labels [B, D] int32, valid [B, D] bool (D = detections_per_img; invalid slots are zero), sorted by score.
  """
  fn = functools.partial(_postprocess_one, anchors=anchors, image_size=image_size, score_thresh=score_thresh,
                         nms_thresh=nms_thresh, topk_candidates=topk_candidates,
                         detections_per_img=detections_per_img, weights=weights)
  return jax.vmap(fn)(cls_logits, bbox_regression, orig_size=orig_sizes)
