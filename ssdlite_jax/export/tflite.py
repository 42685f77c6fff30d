"""LiteRT / TFLite float32 export in the 4-tensor SSD layout of MediaPipe's ObjectDetector ("in-model NMS") and
the TF Object Detection API apps, built from TFLite builtin ops only (no custom op).

  input    images float32 [1, S, S, 3] RGB in [0, 1] at the model size (MediaPipe normalisation: mean 0, std 255)
  outputs  boxes [1, D, 4] (ymin, xmin, ymax, xmax) as fractions of the image; classes [1, D] float32 (label - 1,
           i.e. the index into the class names without background); scores [1, D]; num [1] float32
           (the valid detections come first, sorted by score; the other slots are zero)

The network, box decoding, clipping and softmax are the JAX model (jax2tf); the selection is TF builtins doing
what postprocess.py does: per class, the top `topk_candidates` scores above `score_thresh`; per class greedy
NMS (NON_MAX_SUPPRESSION_V5, one per class, so classes never interact, as torchvision); the best D overall.
TFLite's NMS suppresses at IoU >= nms_thresh where torchvision's suppresses at IoU > nms_thresh: the two
differ only for boxes whose IoU is exactly the threshold (tests/test_export.py). Needs TensorFlow to convert,
only ai-edge-litert (or TFLite) to run.
"""

from typing import Any, Dict, Tuple

import jax
import numpy as np

from ssdlite_jax import postprocess
from ssdlite_jax.models import Detector

# XLA's grouped and 1x1 convolutions become TFLite's DEPTHWISE_CONV_2D and CONV_2D (the CPU kernels' shift-and-add
# runs 12x slower in LiteRT, and their matmul form of the SE block's 1x1 convs does not convert).
KERNELS = "xla"


def _network_and_decode(detector: Detector, variables):
  """images [1, S, S, 3] -> postprocess.decode_and_score of the image: (boxes [A, 4] xyxy model px, clipped;
  foreground scores [A, K - 1])."""
  anchors = np.asarray(detector.anchors, np.float32)
  weights = tuple(detector.config.box_coder_weights)

  def fn(images):
    out = detector.module.apply(variables, images, train=False)
    return postprocess.decode_and_score(out["cls_logits"][0], out["bbox_regression"][0], anchors,
                                        detector.image_size, weights)
  return fn


def export(detector: Detector, variables: Dict[str, Any]) -> Tuple[bytes, Dict[str, Any]]:
  """(the .tflite flatbuffer, metadata extras) of the detector, batch 1, float32."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  cfg = detector.config
  size = detector.image_size
  network = jax2tf.convert(_network_and_decode(detector, jax.device_get(variables)), with_gradient=False)
  num_fg = cfg.num_classes - 1
  k = min(cfg.topk_candidates, len(detector.anchors))
  d = min(cfg.detections_per_img, num_fg * k)

  @tf.function(input_signature=[tf.TensorSpec((1,) + size + (3,), tf.float32, name="images")], autograph=False)
  def detect(images):
    boxes, scores = network(images)
    cand_scores, cand_idx = tf.math.top_k(tf.transpose(tf.where(scores > cfg.score_thresh, scores, -1.0)), k)
    kept_scores, kept_boxes = [], []
    for c in range(num_fg):
      cand_boxes = tf.gather(boxes, cand_idx[c])
      selected, _, count = tf.raw_ops.NonMaxSuppressionV5(
          boxes=cand_boxes, scores=cand_scores[c], max_output_size=k, iou_threshold=cfg.nms_thresh,
          score_threshold=0.0, soft_nms_sigma=0.0, pad_to_max_output_size=True)
      kept_scores.append(tf.where(tf.range(k) < count, tf.gather(cand_scores[c], selected), -1.0))
      kept_boxes.append(tf.gather(cand_boxes, selected))
    out_scores, order = tf.math.top_k(tf.concat(kept_scores, 0), d)
    out_boxes = tf.gather(tf.concat(kept_boxes, 0), order)
    valid = out_scores > 0.0
    x1, y1, x2, y2 = tf.unstack(out_boxes, axis=1)
    yxyx = tf.stack([y1 / size[0], x1 / size[1], y2 / size[0], x2 / size[1]], axis=1)
    # A tuple, not a dict: the outputs keep this order (MediaPipe reads boxes, classes, scores, num).
    return (tf.where(valid[:, None], yxyx, 0.0)[None], tf.where(valid, tf.cast(order // k, tf.float32), 0.0)[None],
            tf.where(valid, out_scores, 0.0)[None], tf.reduce_sum(tf.cast(valid, tf.float32))[None])

  converter = tf.lite.TFLiteConverter.from_concrete_functions([detect.get_concrete_function()], detect)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  flatbuffer = converter.convert()
  extras = {
      "inputs": {"images": [1, *size, 3, "float32 RGB in [0, 1], resized to the model size"]},
      "outputs": {"boxes": f"[1, {d}, 4] float32 (ymin, xmin, ymax, xmax) in [0, 1]",
                  "classes": f"[1, {d}] float32: label - 1", "scores": f"[1, {d}] float32",
                  "num": "[1] float32: valid detections, first"},
  }
  return flatbuffer, extras
