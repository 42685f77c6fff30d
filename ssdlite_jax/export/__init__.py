"""Deployment export of a detector with its weights baked in: one module per format.

  stablehlo   `jax.export` of the detect function (network + post-processing), batch-polymorphic (.jaxexport);
              the only format of the Faster R-CNN family (its transform included, for one input size)
  tflite      LiteRT float32, batch 1, MediaPipe's 4-output SSD layout, TFLite builtin ops only (.tflite)
  tflite-int8 the same with an int8 network calibrated on the config's train images, uint8 input
  saved_model the tflite graph as a TensorFlow SavedModel directory (TF Serving), float32 input
  onnx        ONNX opset 18, dynamic batch, NMS as NonMaxSuppression (onnxruntime); jax2onnx converts, in the
              separate venv of requirements-onnx.txt (.onnx)

Every file (or SavedModel directory) comes with `<file>.json`: the metadata (model variant, classes, input and
output layout, post-processing settings, where the weights came from) that a runtime needs to use it. OUT may be
in object storage (gs://...: files.py).
"""

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssdlite_jax import files
from ssdlite_jax.ssd import postprocess
from ssdlite_jax.detector import Detector
from ssdlite_jax.zoo import build_model

# Name scopes of the JAX part of the tflite and onnx graphs (the int8 converter keeps every tensor outside
# NETWORK_SCOPE in float32).
NETWORK_SCOPE, DECODE_SCOPE = "ssd_network", "ssd_decode"


def with_overrides(detector: Detector, kernels: str, score_thresh: Optional[float] = None,
                   max_detections: Optional[int] = None, image_size: Optional[int] = None) -> Detector:
  """The detector rebuilt for a format's `kernels` (model.kernels) with export-time post-processing / input-size
  overrides (None keeps the config's); the weights do not depend on any of them."""
  cfg = ml_collections.ConfigDict(detector.config.to_dict())
  if score_thresh is not None:
    if not 0.0 <= score_thresh < 1.0:
      raise ValueError(f"--score-thresh={score_thresh}: must be in [0, 1)")
    cfg[detector.SCORE_THRESH_FIELD] = float(score_thresh)
  if max_detections is not None:
    if max_detections < 1:
      raise ValueError(f"--max-detections={max_detections}: must be >= 1")
    cfg.detections_per_img = int(max_detections)
  if image_size is not None:
    if "image_size" not in cfg:
      raise ValueError(f"--image-size: a {cfg.family} model resizes each image to its own size (see --input-size)")
    if image_size < 32:
      raise ValueError(f"--image-size={image_size}: must be >= 32")
    cfg.image_size = int(image_size)
  cfg.kernels = kernels
  return build_model(cfg)


def network_and_decode(detector: Detector, variables):
  """The JAX part of the tflite and onnx graphs, `variables` baked in: images [B, S, S, 3] in [0, 1] -> (boxes
  [B, A, 4] xyxy model px, decoded and clipped; class logits [B, A, K] float32). Each format appends its own
  selection (scores, top-k, NMS) in its runtime's ops."""
  anchors = np.asarray(detector.anchors, np.float32)
  weights = tuple(detector.config.box_coder_weights)

  def fn(images):
    with jax.named_scope(NETWORK_SCOPE):
      out = detector.module.apply(variables, images, train=False)
    with jax.named_scope(DECODE_SCOPE):
      boxes = postprocess.decode_boxes(out["bbox_regression"], anchors, detector.image_size, weights)
    return boxes, out["cls_logits"].astype(jnp.float32)
  return fn


def metadata(detector: Detector, source: str, fmt: str, **extra) -> Dict[str, Any]:
  """What a runtime needs to know about an exported file (written next to it as JSON)."""
  cfg = detector.config
  model = {"family": cfg.get("family", "ssd"), "backbone": cfg.backbone, "head": cfg.head,
           "num_classes": cfg.num_classes, "class_names": list(detector.class_names)}
  if "image_size" in cfg:
    model["image_size"] = [cfg.image_size, cfg.image_size]
  return {"format": fmt, "source": source, "model": model, "postprocess": detector.postprocess_settings(), **extra}


def write_atomically(path: str, data: bytes, meta: Dict[str, Any]) -> None:
  """Writes `path` and `path`.json through temporary files, so that a failure never leaves a partial file."""
  if files.is_remote(path):   # each upload replaces its object whole; the metadata first, as below
    files.write_text_atomically(path + ".json", json.dumps(meta, indent=2))
    files.write_atomically(path, lambda tmp: _write_bytes(tmp, data))
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp, tmp_meta = path + ".tmp", path + ".json.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    with open(tmp_meta, "w") as f:
      json.dump(meta, f, indent=2)
    os.replace(tmp_meta, path + ".json")
    os.replace(tmp, path)
  finally:
    for p in (tmp, tmp_meta):
      if os.path.exists(p):
        os.remove(p)


def _write_bytes(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def write_directory_atomically(path: str, write: Callable[[str], None], meta: Dict[str, Any]) -> int:
  """Has `write` fill a temporary directory, then puts it at `path` (replacing an older one) and `path`.json:
  a failure never leaves a partial directory. In object storage the directory is uploaded file by file and
  `path`.json last: it marks the directory complete. Returns the directory's size in bytes."""
  if files.is_remote(path):
    with tempfile.TemporaryDirectory(prefix="ssdlite_jax_") as folder:
      write(os.path.join(folder, "export"))
      size = files.upload_tree(os.path.join(folder, "export"), path)
    files.write_text_atomically(path + ".json", json.dumps(meta, indent=2))
    return size
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp, tmp_meta, old = path + ".tmp", path + ".json.tmp", path + ".old"
  for leftover in (tmp, old):   # of an export that was killed
    shutil.rmtree(leftover, ignore_errors=True)
  try:
    write(tmp)
    with open(tmp_meta, "w") as f:
      json.dump(meta, f, indent=2)
    if os.path.exists(path):
      os.replace(path, old)
    try:
      os.replace(tmp, path)
    except OSError:
      if os.path.exists(old):
        os.replace(old, path)   # the previous export stays
      raise
    os.replace(tmp_meta, path + ".json")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(tmp_meta):
      os.remove(tmp_meta)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(path) for f in names)
