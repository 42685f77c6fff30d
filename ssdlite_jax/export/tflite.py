"""LiteRT / TFLite export, float32 or int8, in the 4-tensor SSD layout of MediaPipe's ObjectDetector ("in-model
NMS") and the TF Object Detection API apps, built from TFLite builtin ops only (no custom op), with MediaPipe
metadata (mediapipe_metadata.py) so that its ObjectDetector runs the file unchanged.

  input    float32: images [1, S, S, 3] RGB in [0, 1] at the model size (MediaPipe normalisation: mean 0, std 255)
           int8:    images [1, S, S, 3] uint8 RGB pixels at the model size (no input quantisation parameters)
  outputs  boxes [1, D, 4] (ymin, xmin, ymax, xmax) as fractions of the image; classes [1, D] float32 (label - 1,
           i.e. the index into the class names without background); scores [1, D]; num [1] float32
           (the valid detections come first, sorted by score; the other slots are zero)

The network and box decoding + clipping are the JAX model (jax2tf); the scores and the selection are TF builtins
doing what postprocess.select does (`select`): foreground softmax; per class, the top `topk_candidates` scores
above `score_thresh`; per class greedy NMS (NON_MAX_SUPPRESSION_V5, one per class, so classes never interact, as
torchvision); the best D overall. Where LiteRT's NMS alone would differ from torchvision, the graph decides:
score ties (the NMS ranks candidates by position), zero-area boxes (kept, outside the NMS) and IoUs at exactly
the threshold (the float32 threshold given to it). The detections are the Predictor's, one to one, up to the
float rounding of the network (tests/test_export_selection.py, tests/test_export.py).

int8 (post-training, calibrated on the images given): the network runs in int8 (convolutions, activations, SE
blocks); box decoding, scores, top-k and NMS stay float32, so scores keep their resolution (a 0.001 threshold is
below one int8 step of a [0, 1] score). Needs TensorFlow to convert, only ai-edge-litert (or TFLite) to run.
"""

from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np

from ssdlite_jax import nms
from ssdlite_jax.ssd import postprocess
from ssdlite_jax.export import NETWORK_SCOPE, mediapipe_metadata, network_and_decode
from ssdlite_jax.detector import Detector

# XLA's grouped and 1x1 convolutions become TFLite's DEPTHWISE_CONV_2D and CONV_2D (the CPU kernels' shift-and-add
# runs 12x slower in LiteRT, and their matmul form of the SE block's 1x1 convs does not convert).
KERNELS = "xla"
# TF-side ops the int8 quantiser would otherwise quantise (by op type: their TF names carry no scope).
FLOAT_OPS = ["TOPK_V2", "GATHER", "NON_MAX_SUPPRESSION_V5", "SCATTER_ND"]
OUTPUTS = ("boxes", "classes", "scores", "num")


def select(boxes, logits, config, inclusive_nms: bool = True):
  """postprocess.select in TF builtin ops, for one image: boxes [A, 4] xyxy model px (decoded, clipped), logits
  [A, K] -> (boxes [D, 4] xyxy model px, class indices [D] int32 (label - 1), scores [D], valid [D] bool), zero
  where invalid, valid first by descending score. `inclusive_nms`: the graph runs on LiteRT, whose
  NON_MAX_SUPPRESSION_V5 suppresses at IoU >= its threshold (TensorFlow's kernel: IoU > it); either way the
  threshold given makes the decision torchvision's (nms.float32_iou_threshold)."""
  import tensorflow as tf

  num_fg = config.num_classes - 1
  k, d = postprocess.selection_sizes(config, boxes.shape[0])
  # softmax(logits)[:, 1:], written without a SOFTMAX op: TFLite's quantiser puts int8 on whatever consumes a
  # SOFTMAX, denylisted or not, which would round every score to a multiple of 1/256.
  scores = tf.exp(logits[:, 1:] - tf.reduce_logsumexp(logits, axis=1, keepdims=True))
  cand_scores, cand_idx = tf.math.top_k(tf.transpose(tf.where(scores > config.score_thresh, scores, -1.0)), k)
  cand_boxes = tf.gather(boxes, cand_idx)                                                    # [C, k, 4]
  x1, y1, x2, y2 = tf.unstack(cand_boxes, axis=2)
  valid = cand_scores >= 0.0
  zero_area = (x2 - x1) * (y2 - y1) <= 0.0
  # The NMS ranks the candidates by their position, not their score: ties then go to the lower position, as in
  # postprocess.select, where LiteRT's priority queue would pick any. Zero-area candidates stay out of it (-1 is
  # below its score threshold) and are kept: torchvision never suppresses them, nor by them, while LiteRT selects
  # one again and again (its IoU with itself is 0, where any other box's is 1) until the output is full.
  rank = tf.cast(tf.range(k, 0, -1), tf.float32)
  nms_scores = tf.where(valid & ~zero_area, rank[None], -1.0)
  threshold = float(nms.float32_iou_threshold(config.nms_thresh, inclusive_nms))
  selected = []
  for c in range(num_fg):
    indices, _, count = tf.raw_ops.NonMaxSuppressionV5(
        boxes=cand_boxes[c], scores=nms_scores[c], max_output_size=k, iou_threshold=threshold,
        score_threshold=0.0, soft_nms_sigma=0.0, pad_to_max_output_size=True)
    selected.append(tf.where(tf.range(k) < count, indices + c * k, num_fg * k))   # padding -> a spare slot
  kept = tf.scatter_nd(tf.reshape(tf.stack(selected), [-1, 1]), tf.ones([num_fg * k]), [num_fg * k + 1])
  keep = (tf.reshape(kept[:-1], [num_fg, k]) > 0.0) | (valid & zero_area)
  out_scores, order = tf.math.top_k(tf.reshape(tf.where(keep, cand_scores, -1.0), [-1]), d)
  out_valid = out_scores >= 0.0
  return (tf.where(out_valid[:, None], tf.gather(tf.reshape(cand_boxes, [-1, 4]), order), 0.0),
          tf.where(out_valid, order // k, 0), tf.where(out_valid, out_scores, 0.0), out_valid)


def detect_function(detector: Detector, variables: Dict[str, Any], int8: bool = False, inclusive_nms: bool = True):
  """(tf.function images [1, S, S, 3] -> the four OUTPUTS as a tuple, in that order; metadata extras): the
  network (jax2tf) and `select`, float32 input in [0, 1] or, with int8, uint8 pixels. `inclusive_nms`: for LiteRT
  (True) or TensorFlow (False), see `select`."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  size = detector.image_size
  jax_part = network_and_decode(detector, jax.device_get(variables))
  network = jax2tf.convert(lambda images: tuple(x[0] for x in jax_part(images)), with_gradient=False)
  input_dtype = tf.uint8 if int8 else tf.float32

  @tf.function(input_signature=[tf.TensorSpec((1,) + size + (3,), input_dtype, name="images")], autograph=False)
  def detect(images):
    boxes, logits = network(tf.cast(images, tf.float32) / 255.0 if int8 else images)
    out_boxes, classes, scores, valid = select(boxes, logits, detector.config, inclusive_nms)
    x1, y1, x2, y2 = tf.unstack(out_boxes, axis=1)
    yxyx = tf.stack([y1 / size[0], x1 / size[1], y2 / size[0], x2 / size[1]], axis=1)
    # A tuple, not a dict: the outputs keep this order (MediaPipe reads boxes, classes, scores, num).
    return (yxyx[None], tf.cast(classes, tf.float32)[None], scores[None],
            tf.reduce_sum(tf.cast(valid, tf.float32))[None])

  _, d = postprocess.selection_sizes(detector.config, len(detector.anchors))
  extras = {
      "inputs": {"images": [1, *size, 3, ("uint8 RGB pixels" if int8 else "float32 RGB in [0, 1]")
                            + ", resized to the model size"]},
      "outputs": {"boxes": f"[1, {d}, 4] float32 (ymin, xmin, ymax, xmax) in [0, 1]",
                  "classes": f"[1, {d}] float32: label - 1", "scores": f"[1, {d}] float32",
                  "num": "[1] float32: valid detections, first"},
  }
  return detect, extras


def export(detector: Detector, variables: Dict[str, Any], calibration: Optional[np.ndarray] = None
           ) -> Tuple[bytes, Dict[str, Any]]:
  """(the .tflite flatbuffer, metadata extras) of the detector, batch 1: float32, or int8 calibrated on
  `calibration` [N, S, S, 3] uint8 images at the model size (pipeline.calibration_images)."""
  import tensorflow as tf

  int8 = calibration is not None
  detect, extras = detect_function(detector, variables, int8)
  converter = tf.lite.TFLiteConverter.from_concrete_functions([detect.get_concrete_function()], detect)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  flatbuffer = converter.convert()
  if int8:
    flatbuffer = _quantize(converter, flatbuffer, calibration)
  extras["mediapipe"] = "ObjectDetector metadata: labels.txt, " + (
      "uint8 input" if int8 else "float32 input normalised with mean 0, std 255")
  return mediapipe_metadata.populate(flatbuffer, detector.class_names, float_input=not int8), extras


def _quantize(converter, float_flatbuffer: bytes, calibration: np.ndarray) -> bytes:
  """The int8 model of `converter` (whose float32 model is `float_flatbuffer`): calibrated on `calibration`,
  every tensor outside NETWORK_SCOPE, and the FLOAT_OPS, kept float32."""
  import tensorflow as tf
  from ai_edge_litert.interpreter import Interpreter

  if len(calibration) == 0:
    raise ValueError("int8 export needs at least one calibration image")
  names = [t["name"] for t in Interpreter(model_content=float_flatbuffer).get_tensor_details()]
  keep_float = [n for n in names if NETWORK_SCOPE not in n]
  images = np.asarray(calibration, np.uint8)
  dataset = lambda: ([image[None]] for image in images)
  converter.optimizations = [tf.lite.Optimize.DEFAULT]
  converter.representative_dataset = dataset
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
  options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep_float, denylisted_ops=FLOAT_OPS)
  debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset,
                                                       debug_options=options)
  return debugger.get_nondebug_quantized_model()
